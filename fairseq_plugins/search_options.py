"""The bridge from fairseq's options to ``soft_beam``'s settings (``SearchConfig``, ``LossOptions``),
their one validator: bad values are reported under the option's own name."""

from __future__ import annotations

import dataclasses

from soft_beam.search import SearchConfig, SettingError

from .decoding import unwrap_model


def validated(option_names: dict[str, str], config_class=SearchConfig, **settings):
    """config_class(**settings), a SearchConfig or LossOptions; a bad setting raises ValueError
    naming its option, from option_names (field -> command-line option)."""
    try:
        return config_class(**settings)
    except SettingError as e:
        raise ValueError(f"{option_names.get(e.setting, e.setting)}: {e}") from None


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
