"""A fairseq generator whose beam selection is the SOFT top-k (``soft_beam.search``).

It follows fairseq's ``SequenceGenerator`` contract (``generate(models, sample)`` returns, per
sentence, hypothesis dicts sorted by score) without copying it: the search loop is
``soft_beam.search.beam_search``, shared with the training criterion.
"""

from __future__ import annotations

import torch

from soft_beam.search import SearchConfig, beam_search

from .decoding import FairseqStepModel
from .search_options import length_capped

# Generation options this generator does not implement, with the value that means "off".
_UNSUPPORTED = {
    "sampling": False,
    "diverse_beam_groups": -1,
    "diversity_rate": -1,
    "match_source_len": False,
    "constraints": None,
    "no_repeat_ngram_size": 0,
    "unnormalized": False,
    "score_reference": False,
    "print_alignment": None,
    "lm_path": None,
    "prefix_size": 0,
}


def check_generation_args(args) -> None:
    """Raises ValueError naming each requested fairseq generation option we do not support."""
    asked = []
    for name, off in _UNSUPPORTED.items():
        value = getattr(args, name, off)
        if value not in (off, None, False) and not (name == "print_alignment" and value in ("", "none")):
            asked.append(f"--{name.replace('_', '-')}={value!r}")
    if getattr(args, "temperature", 1.0) != 1.0:
        asked.append(f"--temperature={args.temperature!r}")
    if asked:
        raise ValueError(
            "the soft-beam generator (task translation_soft_beam) does not support "
            + ", ".join(asked)
            + "; use --task translation for these"
        )


class SoftBeamGenerator(torch.nn.Module):
    """Beam search with the SOFT top-k; ``epsilon == 0`` is exactly fairseq's beam search."""

    def __init__(self, models, tgt_dict, cfg: SearchConfig):
        super().__init__()
        if len(models) != 1:
            raise ValueError(f"the soft-beam generator decodes one model, got an ensemble of {len(models)}")
        self.model = models[0]
        self.cfg = cfg
        self.tgt_dict = tgt_dict
        self.bos = self.eos = tgt_dict.eos()  # fairseq-generate strips self.eos from output
        self.pad, self.unk = tgt_dict.pad(), tgt_dict.unk()
        self.vocab_size = len(tgt_dict)

    @torch.no_grad()
    def generate(self, models, sample, prefix_tokens=None, constraints=None, bos_token=None, **kwargs):
        if prefix_tokens is not None or constraints is not None:
            raise ValueError("the soft-beam generator does not support prefix tokens or constraints")
        model = models[0] if models else self.model
        # Like fairseq's generator, decode in eval mode (no dropout); restore the caller's mode.
        was_training = model.training
        model.eval()
        try:
            return self._generate(model, sample, bos_token)
        finally:
            model.train(was_training)

    def _generate(self, model, sample, bos_token):
        net_input = sample["net_input"]
        src_tokens = net_input["src_tokens"]
        bsz, src_len = src_tokens.shape[:2]
        cfg = length_capped(self.cfg, model)
        finalized = beam_search(
            FairseqStepModel(model, net_input, cfg.beam), bsz, src_len, cfg,
            bos=self.bos if bos_token is None else bos_token, eos=self.eos, pad=self.pad, unk=self.unk,
            device=src_tokens.device,
        )  # fmt: skip
        empty = torch.empty(0)
        return [
            [
                {
                    "tokens": h.tokens,
                    "score": h.score,
                    "attention": empty,
                    "alignment": empty,
                    "positional_scores": h.positional_scores,
                }
                for h in hyps
            ]
            for hyps in finalized
        ]
