"""Task ``translation_soft_beam``: fairseq's ``translation`` whose generator (fairseq-generate,
--eval-bleu) is the soft-beam one. The training search's options belong to the ``soft_beam``
criterion; the task keeps only what its generator needs.

(No ``from __future__ import annotations`` here: fairseq reads the config's field types at runtime.)
"""

from dataclasses import dataclass, field

from fairseq.tasks import register_task
from fairseq.tasks.translation import TranslationConfig, TranslationTask

from .checks import check_nbest_within_beam
from .generator import SoftBeamGenerator, check_generation_args
from .search_options import check_target_dictionary, validated

# SearchConfig field -> the generation option, for error messages
OPTION_NAMES = {
    "beam": "--beam",
    "epsilon": "--soft-beam-gen-epsilon",
    "lenpen": "--lenpen",
    "max_len_a": "--max-len-a",
    "max_len_b": "--max-len-b",
    "min_len": "--min-len",
    "unk_penalty": "--unkpen",
}


@dataclass
class TranslationSoftBeamConfig(TranslationConfig):
    soft_beam_gen_epsilon: float = field(
        default=0.0,
        metadata={"help": "epsilon of the generator (fairseq-generate, --eval-bleu); 0 is exactly fairseq's beam search"},
    )


@register_task("translation_soft_beam", dataclass=TranslationSoftBeamConfig)
class TranslationSoftBeamTask(TranslationTask):
    """``translation`` whose generator (fairseq-generate, --eval-bleu) is the soft-beam one."""

    cfg: TranslationSoftBeamConfig

    def __init__(self, cfg, src_dict, tgt_dict):
        validated(OPTION_NAMES, beam=1, epsilon=cfg.soft_beam_gen_epsilon)  # a bad epsilon fails at setup
        check_target_dictionary(tgt_dict)
        super().__init__(cfg, src_dict, tgt_dict)

    def build_generator(self, models, args, seq_gen_cls=None, extra_gen_cls_kwargs=None, prefix_allowed_tokens_fn=None):
        check_generation_args(args)
        check_nbest_within_beam(args)  # (this override does not reach the patched base method)
        if prefix_allowed_tokens_fn is not None:
            raise ValueError("the soft-beam generator does not support prefix_allowed_tokens_fn")
        # fairseq's defaults, as its own build_generator reads them; the length cap is the model's
        cfg = validated(
            OPTION_NAMES,
            beam=getattr(args, "beam", 5),
            epsilon=self.cfg.soft_beam_gen_epsilon,
            lenpen=getattr(args, "lenpen", 1.0),
            max_len_a=getattr(args, "max_len_a", 0.0),
            max_len_b=getattr(args, "max_len_b", 200),
            min_len=getattr(args, "min_len", 1),
            unk_penalty=getattr(args, "unkpen", 0.0),
        )
        return SoftBeamGenerator(models, self.target_dictionary, cfg)
