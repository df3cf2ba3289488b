"""Sequence-level losses on the result of a (soft) beam search, in pure torch.

A loss is a small class with two parts:

- a constructor taking :class:`LossOptions` (the EOS and pad ids, and each loss's own settings);
- ``features(target)``: the :class:`~soft_beam.search.TokenFeatures` that the search must
  track along each hypothesis for this loss, or None;
- ``sentence_loss(hyps, reference)``: the loss of one sentence from its finished hypotheses
  (sorted best first) and its reference token ids (EOS and pad removed).

A new loss is a new class in :data:`BEAM_LOSSES`; the search is not touched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .search import Hypothesis, SettingError, TokenFeatures

__all__ = [
    "ReferenceHits",
    "relaxed_hamming",
    "expected_risk",
    "RelaxedHamming",
    "ExpectedRisk",
    "LossOptions",
    "BEAM_LOSSES",
    "content_ids",
    "sentence_bleu",
]


@dataclass
class ReferenceHits:
    """TokenFeatures: 1.0 where a candidate token equals the reference token at its position,
    else 0 (and 0 past the reference's end). Tracked through a soft search, a hypothesis's
    feature at position t is the soft probability that it holds reference token t.

    target: (B, T) reference token ids ending with EOS, right-padded with ``pad``.
    """

    target: torch.Tensor
    pad: int
    size: int = 1

    def __call__(self, tokens: torch.Tensor, sentences: torch.Tensor, step: int) -> torch.Tensor:
        if step >= self.target.shape[1]:
            return torch.zeros(*tokens.shape, 1, device=tokens.device)  # (S, M, 1)
        ref = self.target[sentences, step].unsqueeze(1)  # (S, 1)
        return ((tokens == ref) & (ref != self.pad)).unsqueeze(-1).float()  # (S, M, 1)


def relaxed_hamming(match: torch.Tensor, ref_len: int) -> torch.Tensor:
    """Relaxed token errors (Goyal et al., 2018): sum over the reference's positions (EOS
    included) of 1 - P(match). match: (hyp_len,) soft probability that hypothesis position t
    holds reference token t. With 0/1 matches (a hard search) it is the Hamming distance of the
    hypothesis's first ref_len tokens to the reference."""
    n = min(ref_len, match.numel())
    return ref_len - match[:n].sum()


def expected_risk(scores: torch.Tensor, costs: torch.Tensor, sharpness: float = 1.0) -> torch.Tensor:
    """Expected cost under softmax(sharpness * scores) over the hypotheses (minimum-risk
    training, Shen et al. 2016; Edunov et al. 2018). scores, costs: (n,)."""
    return (torch.softmax(sharpness * scores, dim=0) * costs).sum()


@dataclass(frozen=True)
class LossOptions:
    """What the losses are built from; validated here, once."""

    eos: int
    pad: int
    # MRT's alpha (Shen et al. 2016): the risk's distribution over the n-best is
    # softmax(risk_sharpness * score). The scores are length-normalised log-probs (fairseq's
    # hypothesis scores), so the default 1 is their own softmax; Shen's 5e-3 was for
    # unnormalised sentence log-probs.
    risk_sharpness: float = 1.0

    def __post_init__(self):
        if not (isinstance(self.risk_sharpness, (int, float)) and 0 < self.risk_sharpness < float("inf")):
            raise SettingError("risk_sharpness", f"risk_sharpness must be a finite number > 0, got {self.risk_sharpness!r}")


class BeamLoss:
    """The contract of a loss on the search's result (see the module's docstring)."""

    needs_soft_search = False  # True if its gradient reaches the model only through the soft top-k

    def __init__(self, options: LossOptions):
        self.options = options
        self.eos, self.pad = options.eos, options.pad

    def features(self, target: torch.Tensor) -> TokenFeatures | None:
        """target (B, T): the references, ending with EOS, right-padded. What the search tracks."""
        return None

    def sentence_loss(self, hyps: list[Hypothesis], reference: list[int]) -> torch.Tensor:
        """hyps: one sentence's finished hypotheses, best first; reference: its token ids
        without EOS and pad. Returns a scalar."""
        raise NotImplementedError


class RelaxedHamming(BeamLoss):
    """The relaxed Hamming loss of the top hypothesis, per reference token. Its gradient reaches
    the model only through the soft top-k's weights, so it needs a soft search (epsilon > 0)."""

    needs_soft_search = True

    def features(self, target: torch.Tensor) -> ReferenceHits:
        return ReferenceHits(target, self.pad)

    def sentence_loss(self, hyps: list[Hypothesis], reference: list[int]) -> torch.Tensor:
        return relaxed_hamming(hyps[0].features[:, 0], len(reference) + 1)  # + 1: EOS


class ExpectedRisk(BeamLoss):
    """Expected 1 - sentence BLEU over the beam's finished hypotheses, scaled by the reference
    length (with EOS) so that it sums over tokens like the MLE loss. Differentiable through the
    hypotheses' scores, so with a hard search (epsilon 0) it is classical minimum-risk training
    over the beam."""

    def sentence_loss(self, hyps: list[Hypothesis], reference: list[int]) -> torch.Tensor:
        scores = torch.stack([h.score for h in hyps])  # (n,)
        if scores.dtype in (torch.float16, torch.bfloat16):
            scores = scores.float()
        costs = [1.0 - sentence_bleu(content_ids(h.tokens, (self.eos, self.pad)), reference) for h in hyps]
        costs = torch.tensor(costs, dtype=scores.dtype, device=scores.device)  # (n,)
        return (len(reference) + 1) * expected_risk(scores, costs, self.options.risk_sharpness)


def content_ids(tokens: torch.Tensor, special: tuple[int, ...]) -> list[int]:
    """Token ids (length,) as a list, without the ``special`` ones (EOS, pad)."""
    return [t for t in tokens.tolist() if t not in special]


_BLEU = None


def sentence_bleu(hyp: list[int], ref: list[int]) -> float:
    """Smoothed sentence BLEU in [0, 1] of two token-id sequences, by sacreBLEU (imported on
    first use: the rest of soft_beam needs only torch)."""
    global _BLEU
    if not hyp:
        return 0.0
    if _BLEU is None:
        from sacrebleu.metrics import BLEU

        _BLEU = BLEU(tokenize="none", effective_order=True)
    return _BLEU.sentence_score(" ".join(map(str, hyp)), [" ".join(map(str, ref))]).score / 100.0


BEAM_LOSSES = {"hamming": RelaxedHamming, "risk": ExpectedRisk}
