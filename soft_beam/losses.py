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

import math
from dataclasses import dataclass, field

import torch

from .search import Hypothesis, SettingError, TokenFeatures

__all__ = [
    "ReferenceHits",
    "ReferenceTokens",
    "relaxed_hamming",
    "expected_risk",
    "expected_bleu",
    "RelaxedHamming",
    "ExpectedRisk",
    "ExpectedBleu",
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


@dataclass
class ReferenceTokens:
    """TokenFeatures for n-gram losses: feature j of a candidate token is 1.0 where it equals the
    reference's token j, else 0 (0 at EOS and pad positions). Tracked through a soft search, a
    hypothesis's features at position t are p_t(j), the soft probability that it holds reference
    token j, at every reference position j (not only j = t, as in :class:`ReferenceHits`).

    target: (B, T) reference token ids ending with EOS, right-padded with ``pad``; size = T.

    Cost: the search keeps a (S, K, max_len + 1, T) track, and autograd one such tensor per
    decoding step, so memory grows as steps * S * K * max_len * T: for 100 sentences, beam 4,
    60 steps and T = 40 in float32, 3.9 MB a step, 230 MB a search. Fine for Multi30k (references
    up to about 60 tokens); --search-fraction cuts S.
    """

    target: torch.Tensor
    eos: int
    pad: int
    size: int = field(init=False)

    def __post_init__(self):
        if self.target.dim() != 2:
            raise ValueError(f"target must be (B, T) token ids, got shape {tuple(self.target.shape)}")
        self.size = self.target.shape[1]
        self.content = (self.target != self.eos) & (self.target != self.pad)  # (B, T)

    def __call__(self, tokens: torch.Tensor, sentences: torch.Tensor, step: int) -> torch.Tensor:
        ref = self.target[sentences].unsqueeze(1)  # (S, 1, T)
        return ((tokens.unsqueeze(-1) == ref) & self.content[sentences].unsqueeze(1)).float()  # (S, M, T)


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


def expected_bleu(p: torch.Tensor, reference, hyp_len: torch.Tensor | None = None, max_order: int = 4, smooth: float = 1.0) -> torch.Tensor:
    """Soft sentence BLEU in [0, 1] from per-position match probabilities (expected n-gram
    counts, after Zhukov & Kretov 2017 and Casas et al. 2018).

    Args:
        p: (..., L, R), p[..., t, j] = the probability that hypothesis position t holds reference
            token j (EOS excluded from both). Rows t >= hyp_len must be 0 (padding). Columns of
            equal reference tokens should be equal, as :class:`ReferenceTokens` makes them.
        reference: (R,) the reference token ids (a list or a tensor), without EOS and pad.
        hyp_len: (...) the hypotheses' (hard) lengths, EOS excluded; default L for all.
        max_order: the largest n-gram order N.
        smooth: k > 0 of sacreBLEU's ``add-k`` smoothing, added to the matches and the totals of
            the orders n >= 2 (Chen & Cherry 2014, method 2; Lin & Och 2004 for k = 1).

    Returns (...): BP * exp(mean over n of log precision_n), where
        - the expected count of reference n-gram j in the hypothesis is
          c_n(j) = sum_t prod_{i<n} p[t + i, j + i], the positions taken as independent;
        - clipped matches_n = sum over distinct n-grams g of min(c_n(g), count of g in the reference)
          (the hard min, as BLEU's clip; computed as the mean of the clip over g's occurrences j);
        - precision_n = (matches_n + k) / (hyp_len - n + 1 + k), with k = 0 for n = 1;
        - BP = exp(1 - R / hyp_len) if hyp_len < R else 1, on the hard length, so the loss's
          gradient acts on the precisions only.

    Hard limit: with 0/1 p (p[t, j] = [hypothesis token t == reference token j], as a hard search,
    or epsilon -> 0, gives) it equals sacreBLEU's sentence BLEU / 100 on the token ids written as
    words, ``BLEU(tokenize="none", smooth_method="add-k", smooth_value=smooth,
    max_ngram_order=max_order)`` (with or without effective order, which add-k makes moot). Where
    no unigram matches, sacreBLEU gives 0; here the precisions are floored at the dtype's tiny,
    which gives about 1e-77 in float64 (1e-10 in float32) and no NaN gradient.

    Cost: O(N * L * R) per hypothesis in time and memory.
    """
    if not isinstance(p, torch.Tensor) or p.dim() < 2 or not p.is_floating_point():
        raise ValueError(f"p must be a floating (..., L, R) tensor, got {getattr(p, 'shape', type(p))}")
    if not (isinstance(max_order, int) and max_order >= 1):
        raise ValueError(f"max_order must be an integer >= 1, got {max_order!r}")
    if not (isinstance(smooth, (int, float)) and 0 < smooth < math.inf):
        raise ValueError(f"smooth must be a finite number > 0, got {smooth!r}")
    ref = torch.as_tensor(reference, device=p.device)
    L, R = p.shape[-2:]
    if ref.shape != (R,):
        raise ValueError(f"reference must hold p's R = {R} token ids, got shape {tuple(ref.shape)}")
    if hyp_len is None:
        hyp_len = torch.full(p.shape[:-2], L, device=p.device)
    elif hyp_len.shape != p.shape[:-2]:
        raise ValueError(f"hyp_len must have p's batch shape {tuple(p.shape[:-2])}, got {tuple(hyp_len.shape)}")
    hyp_len = hyp_len.to(p.dtype)
    tiny = torch.finfo(p.dtype).tiny
    log_precision = 0.0
    for n in range(1, max_order + 1):
        total = (hyp_len - n + 1).clamp(min=0)  # (...)
        if n == 1:  # unsmoothed; with no hypothesis (0 / 0) it is 0, as in sacreBLEU
            precision = _clipped_matches(p, ref, n) / total.clamp(min=1)
        else:
            precision = (_clipped_matches(p, ref, n) + smooth) / (total + smooth)
        log_precision = log_precision + precision.clamp(min=tiny).log()  # (...)
    ratio = R / hyp_len.clamp(min=1)
    brevity = torch.where(hyp_len >= R, torch.ones_like(ratio), torch.exp(1 - ratio)) * (hyp_len > 0)  # (...)
    return brevity * torch.exp(log_precision / max_order)


def _clipped_matches(p: torch.Tensor, ref: torch.Tensor, n: int) -> torch.Tensor:
    """Expected n-gram matches clipped at the reference's counts. p (..., L, R), ref (R,) -> (...)."""
    L, R = p.shape[-2:]
    starts, windows = L - n + 1, R - n + 1
    if starts <= 0 or windows <= 0:
        return p.new_zeros(p.shape[:-2])
    joint = p[..., :starts, :windows]
    for i in range(1, n):
        joint = joint * p[..., i : i + starts, i : i + windows]  # (..., starts, windows)
    expected = joint.sum(-2)  # (..., windows) expected count of reference n-gram j in the hypothesis
    grams = ref.unfold(0, n, 1)  # (windows, n) reference n-gram j
    count = (grams.unsqueeze(1) == grams.unsqueeze(0)).all(-1).sum(1).to(p.dtype)  # (windows,) its count in the reference
    # each distinct n-gram g occurs count(g) times among the j: their mean clip is g's clip
    return (torch.minimum(expected, count) / count).sum(-1)


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


class ExpectedBleu(BeamLoss):
    """Expected 1 - soft BLEU (:func:`expected_bleu`) over the beam's finished hypotheses, under
    softmax(risk_sharpness * score) as :class:`ExpectedRisk` weighs them, scaled by the reference
    length (with EOS). Each hypothesis's soft BLEU is taken from its tracked
    :class:`ReferenceTokens`, the soft n-gram matches that the search's weights mixed, so the
    gradient reaches the model both through the scores (as MRT) and through the soft top-k's
    weights (as the Hamming loss), but credits an n-gram at any position. The risk over every
    finished hypothesis rather than the top one only: all k are on the soft beam, and at epsilon 0
    this is minimum-risk training with add-1 smoothed sentence BLEU, so it needs no soft search."""

    def features(self, target: torch.Tensor) -> ReferenceTokens:
        return ReferenceTokens(target, self.eos, self.pad)

    def sentence_loss(self, hyps: list[Hypothesis], reference: list[int]) -> torch.Tensor:
        R = len(reference)
        lengths = [len(h.tokens) - 1 for h in hyps]  # EOS excluded
        L = max(lengths)
        # the features without the final EOS position, over the reference's positions, zero-padded to L
        p = torch.stack([torch.nn.functional.pad(h.features[:-1, :R], (0, 0, 0, L - n)) for h, n in zip(hyps, lengths)])  # (H, L, R)
        scores = torch.stack([h.score for h in hyps])  # (H,)
        if scores.dtype in (torch.float16, torch.bfloat16):
            scores = scores.float()
        hyp_len = torch.tensor(lengths, device=p.device)  # (H,)
        bleu = expected_bleu(p.to(scores.dtype), torch.tensor(reference, dtype=torch.long, device=p.device), hyp_len)  # (H,)
        return (R + 1) * expected_risk(scores, 1 - bleu, self.options.risk_sharpness)


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


BEAM_LOSSES = {"hamming": RelaxedHamming, "risk": ExpectedRisk, "bleu": ExpectedBleu}
