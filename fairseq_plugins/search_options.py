"""The bridge from fairseq's options to ``soft_beam``'s settings (``SearchConfig``, ``LossOptions``,
the training search's ``EpsilonSchedule``), their one validator: bad values are reported under the
option's own name."""

from __future__ import annotations

import dataclasses
import math

from soft_beam.search import SearchConfig, SettingError

from .decoding import unwrap_model


def validated(option_names: dict[str, str], config_class=SearchConfig, **settings):
    """config_class(**settings), a SearchConfig, LossOptions or EpsilonSchedule; a bad setting raises ValueError
    naming its option, from option_names (field -> command-line option)."""
    try:
        return config_class(**settings)
    except SettingError as e:
        raise ValueError(f"{option_names.get(e.setting, e.setting)}: {e}") from None


@dataclasses.dataclass(frozen=True)
class EpsilonSchedule:
    """The training search's epsilon over updates. Without ``epsilon_final``, ``epsilon`` always.
    With it, the geometric interpolation epsilon * (epsilon_final / epsilon) ** (u / N) at update u
    over N = ``epsilon_anneal_updates`` updates, then epsilon_final: from a larger epsilon (smoother
    plans, gradients spread over near-ties) to a smaller one (closer to the hard search used at test
    time), as Goyal et al. (2018) anneal their peaked softmax. Geometric because epsilon acts on a
    log scale (the plan's sharpness goes as 1 / epsilon). Validated here, once; a bad setting raises
    SettingError naming its field (``epsilon`` itself is SearchConfig's)."""

    epsilon: float
    epsilon_final: float | None = None
    epsilon_anneal_updates: int = 0

    def __post_init__(self):
        final, updates = self.epsilon_final, self.epsilon_anneal_updates
        if not (isinstance(updates, int) and not isinstance(updates, bool) and updates >= 0):
            raise SettingError("epsilon_anneal_updates", f"epsilon_anneal_updates must be an integer >= 0, got {updates!r}")
        if final is None:
            if updates:
                raise SettingError("epsilon_final", f"epsilon_anneal_updates = {updates} needs epsilon_final (the value to anneal to)")
            return
        if not (isinstance(final, (int, float)) and not isinstance(final, bool) and 0 < final < math.inf):
            raise SettingError("epsilon_final", f"epsilon_final must be a finite number > 0, got {final!r}")
        if not updates:
            raise SettingError("epsilon_anneal_updates", "epsilon_anneal_updates must be >= 1 when epsilon_final is set")
        if not self.epsilon > 0:
            raise SettingError("epsilon", f"epsilon must be > 0 to anneal to epsilon_final (0 is the hard search), got {self.epsilon!r}")

    def at(self, update: int) -> float:
        """epsilon after ``update`` (>= 0) updates."""
        if not (isinstance(update, int) and not isinstance(update, bool) and update >= 0):
            raise ValueError(f"update must be an integer >= 0, got {update!r}")
        if self.epsilon_final is None:
            return self.epsilon
        if update >= self.epsilon_anneal_updates:
            return self.epsilon_final
        return self.epsilon * (self.epsilon_final / self.epsilon) ** (update / self.epsilon_anneal_updates)


def length_capped(cfg: SearchConfig, model) -> SearchConfig:
    """cfg with the model's positions limit, as fairseq's generator takes it
    (``max_decoder_positions()``), unless cfg already has one: a decoder with learned positions
    cannot go past its table."""
    if cfg.max_len_cap is not None:
        return cfg
    return dataclasses.replace(cfg, max_len_cap=unwrap_model(model).max_decoder_positions())


def check_target_dictionary(tgt_dict) -> None:
    """Beam search ends hypotheses at EOS: refuse a target dictionary without one."""
    eos = tgt_dict.eos()
    if eos is None or not 0 <= eos < len(tgt_dict) or tgt_dict[eos] != tgt_dict.eos_word:
        raise ValueError(f"the target dictionary has no EOS symbol {tgt_dict.eos_word!r}; beam search needs one")
