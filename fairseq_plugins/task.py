"""Task ``translation_soft_beam``: fairseq's ``translation`` with a soft-beam generator and the
settings of the search used in training by the ``soft_beam`` criterion.

(No ``from __future__ import annotations`` here: fairseq reads the config's field types at runtime.)
"""

import sys
from dataclasses import dataclass, field

from fairseq.dataclass import ChoiceEnum
from fairseq.tasks import register_task
from fairseq.tasks.translation import TranslationConfig, TranslationTask

from soft_beam.search import SearchConfig

from .generator import SoftBeamGenerator, check_generation_args


@dataclass
class TranslationSoftBeamConfig(TranslationConfig):
    soft_beam_size: int = field(default=4, metadata={"help": "beam size k of the search inside training"})
    soft_beam_epsilon: float = field(
        default=0.01,
        metadata={
            "help": "entropic regularisation of the SOFT top-k in training (relative to a per-step cost "
            "normalised to [0, 1]); smaller is closer to hard beam search"
        },
    )
    soft_beam_candidates: int = field(
        default=0,
        metadata={
            "help": "candidates (beam, token) per sentence kept by a hard top-k before the soft top-k; 0 means 2 * k * k; at least 2 * k"
        },
    )
    soft_beam_tol: float = field(default=1e-4, metadata={"help": "solver tolerance: relative marginal error of the soft top-k"})
    soft_beam_state_grad: ChoiceEnum(["full", "values"]) = field(
        default="values",
        metadata={
            "help": "'full': the exact gradient of the relaxed search, also through the soft-top-k weights "
            "that mix the next decoder inputs and states; 'values': those mixtures pass gradient to the "
            "mixed values only (the weights still get it through beam scores and the loss). 'full' compounds "
            "over decoding steps: 1e4 to 4e5 per token on a trained model, against about 1 for MLE"
        },
    )
    soft_beam_gen_epsilon: float = field(
        default=0.0,
        metadata={"help": "epsilon of the generator (fairseq-generate, --eval-bleu); 0 is exactly fairseq's beam search"},
    )


def _check_search_options(cfg) -> None:
    k = cfg.soft_beam_size
    if k < 1:
        raise ValueError(f"--soft-beam-size must be >= 1, got {k}")
    if not cfg.soft_beam_epsilon > 0:
        raise ValueError(f"--soft-beam-epsilon must be > 0 for training through the search, got {cfg.soft_beam_epsilon}")
    if cfg.soft_beam_gen_epsilon < 0:
        raise ValueError(f"--soft-beam-gen-epsilon must be >= 0 (0 = hard beam search), got {cfg.soft_beam_gen_epsilon}")
    if cfg.soft_beam_candidates and cfg.soft_beam_candidates < 2 * k:
        raise ValueError(f"--soft-beam-candidates ({cfg.soft_beam_candidates}) must be at least 2 * --soft-beam-size ({2 * k})")
    if not cfg.soft_beam_tol > 0:
        raise ValueError(f"--soft-beam-tol must be > 0, got {cfg.soft_beam_tol}")


@register_task("translation_soft_beam", dataclass=TranslationSoftBeamConfig)
class TranslationSoftBeamTask(TranslationTask):
    """``translation`` whose generator (fairseq-generate, --eval-bleu) is the soft-beam one."""

    cfg: TranslationSoftBeamConfig

    def __init__(self, cfg, src_dict, tgt_dict):
        _check_search_options(cfg)
        eos = tgt_dict.eos()
        if eos is None or not 0 <= eos < len(tgt_dict) or tgt_dict[eos] != tgt_dict.eos_word:
            raise ValueError(f"the target dictionary has no EOS symbol {tgt_dict.eos_word!r}; beam search needs one")
        super().__init__(cfg, src_dict, tgt_dict)

    def training_search_config(self) -> SearchConfig:
        k = self.cfg.soft_beam_size
        return SearchConfig(
            beam=k,
            epsilon=self.cfg.soft_beam_epsilon,
            candidates=self.cfg.soft_beam_candidates or 2 * k * k,
            tol=self.cfg.soft_beam_tol,
            state_grad=str(self.cfg.soft_beam_state_grad),
        )

    def build_generator(self, models, args, seq_gen_cls=None, extra_gen_cls_kwargs=None, prefix_allowed_tokens_fn=None):
        check_generation_args(args)
        if prefix_allowed_tokens_fn is not None:
            raise ValueError("the soft-beam generator does not support prefix_allowed_tokens_fn")
        beam = getattr(args, "beam", 5)
        cfg = SearchConfig(
            beam=beam,
            epsilon=self.cfg.soft_beam_gen_epsilon,
            candidates=max(self.cfg.soft_beam_candidates, 2 * beam),
            lenpen=getattr(args, "lenpen", 1.0),
            max_len_a=getattr(args, "max_len_a", 0.0),
            max_len_b=getattr(args, "max_len_b", 200),
            max_len_cap=getattr(args, "max_len", 0) or sys.maxsize,
            min_len=getattr(args, "min_len", 1),
            unk_penalty=getattr(args, "unkpen", 0.0),
            tol=self.cfg.soft_beam_tol,
        )
        return SoftBeamGenerator(models, self.target_dictionary, cfg)
