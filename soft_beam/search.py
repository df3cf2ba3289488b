"""Beam search whose beam selection is the SOFT top-k, in pure torch.

One loop serves generation and training. It follows fairseq's beam search rules exactly
(``fairseq.sequence_generator.SequenceGenerator``): 2k candidates per sentence; an EOS candidate
among the first k finishes a hypothesis, scored cumulative log-prob / length ** lenpen; the k
live beams are refilled from the non-EOS candidates; a sentence is done with k finished
hypotheses or at ``max_len``.

With ``epsilon == 0`` the k live beams are the first k non-EOS candidates (hard top-k and
``index_select`` reordering), which makes it token-identical to fairseq. With ``epsilon > 0``
they are the columns of ``sorted_soft_topk`` over the candidates: beam j's score, next input
embedding and decoder state are mixtures of its candidates' (a *soft reordering*), so gradients
flow through the search; hard tokens (each column's arg-max) are kept for bookkeeping. As
epsilon -> 0 the soft search tends to the hard one.

The model is reached only through a :class:`StepModel`; fairseq's lives in ``fairseq_plugins``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .topk import sorted_soft_topk

__all__ = ["SearchConfig", "Hypothesis", "SearchStats", "StepModel", "beam_search"]


class StepModel(Protocol):
    """An incremental decoder over ``rows = sentences * beam`` rows (sentence-major)."""

    def step(self, tokens: torch.Tensor, input_embedding: torch.Tensor | None) -> torch.Tensor:
        """tokens (rows, t + 1): every token so far, BOS first; input_embedding (rows, D) or None:
        if given, it replaces the embedding of ``tokens[:, -1]``. Returns log-probs (rows, V)."""

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token embedding as the decoder's input lookup sees it: (...) -> (..., D)."""

    def reorder(self, order: torch.Tensor) -> None:
        """Keeps rows ``order`` (new_rows,) of every state, in that order."""

    def mix(self, weights: torch.Tensor) -> None:
        """Soft reorder: weights (sentences, beam, beam); new row j of a sentence is
        sum_i weights[s, j, i] * old row i of that sentence."""


@dataclass(frozen=True)
class SearchConfig:
    beam: int
    epsilon: float = 0.0  # 0: hard beam search
    candidates: int = 0  # candidates kept for the soft top-k; 0 means 2 * beam
    lenpen: float = 1.0
    max_len_a: float = 0.0
    max_len_b: int = 200
    max_len_cap: int = 1024  # the decoder's positions limit
    min_len: int = 1
    unk_penalty: float = 0.0
    tol: float | None = None
    max_iter: int = 100
    # "full": the exact gradient of the relaxed search, also through the weights that mix the next
    # decoder inputs and states. Each step's weights respond to score gaps at about 1/epsilon and
    # feed the next step's scores, so this path compounds over the decoding steps (1.1e4 to 4.4e5
    # per token against MLE's 0.93 on a trained model at epsilon 0.01; bench_train_step.py).
    # "values": those two mixtures pass gradient to the mixed values only; the weights still get it
    # through the beam scores and the reference tracks. Biased, but bounded; the forward is the same.
    state_grad: str = "values"

    def __post_init__(self):
        if not isinstance(self.beam, int) or self.beam < 1:
            raise ValueError(f"beam must be an integer >= 1, got {self.beam!r}")
        if not self.epsilon >= 0 or math.isinf(self.epsilon):
            raise ValueError(f"epsilon must be a finite number >= 0 (0 = hard search), got {self.epsilon!r}")
        if self.state_grad not in ("full", "values"):
            raise ValueError(f"state_grad must be 'full' or 'values', got {self.state_grad!r}")
        if self.candidates and self.candidates < 2 * self.beam:
            raise ValueError(
                f"candidates ({self.candidates}) must be at least 2 * beam ({2 * self.beam}): "
                "up to beam of them may be EOS, and beam live candidates must remain"
            )


@dataclass
class Hypothesis:
    """A finished hypothesis. ``score`` is normalised by length ** lenpen and keeps its graph."""

    tokens: torch.Tensor  # (length,) ending with EOS, BOS excluded
    score: torch.Tensor  # () normalised score
    positional_scores: torch.Tensor  # (length,) per-token log-probs, detached
    reference_match: torch.Tensor | None  # (length,) soft P(token t == reference t), or None


@dataclass
class SearchStats:
    steps: int = 0
    solver_iterations: list = field(default_factory=list)
    marginal_errors: list = field(default_factory=list)


def _candidate_scores(lprobs, cum, step, max_len, min_len, eos, pad, unk, unk_penalty):
    """Each (beam, token) candidate's score, beam score + log-prob, with fairseq's per-step edits
    of the log-probs; for ranking only (no autograd). lprobs (B' K, V), cum (B', K) ->
    (B', K, V), or (B', 1, V) at step 0, where every beam is the same.

    One new tensor, edited in place: two full-vocabulary passes (the sum and the NaN check), where
    separate masks and a ``where`` took four.
    """
    B, K = cum.shape
    lprobs = lprobs.view(B, K, -1)  # (B', K, V)
    cand = lprobs[:, :1].clone() if step == 0 else lprobs + cum.unsqueeze(-1)
    cand[..., pad] = -math.inf
    if unk_penalty:
        cand[..., unk] -= unk_penalty
    if step >= max_len:
        cand[..., :eos] = -math.inf
        cand[..., eos + 1 :] = -math.inf
    elif step < min_len:
        cand[..., eos] = -math.inf
    # NaN -> -inf as fairseq does (a NaN log-prob stays NaN after adding the beam score)
    return torch.nan_to_num_(cand, nan=-math.inf, posinf=math.inf, neginf=-math.inf)


def beam_search(
    model: StepModel,
    batch_size: int,
    src_len: int,
    cfg: SearchConfig,
    *,
    bos: int,
    eos: int,
    pad: int,
    unk: int,
    device: torch.device,
    reference: torch.Tensor | None = None,
    stats: SearchStats | None = None,
) -> list[list[Hypothesis]]:
    """Runs the search; returns, per sentence, its finished hypotheses sorted by score.

    Args:
        model: the decoder, with its state already expanded to ``batch_size * beam`` rows.
        src_len: the (padded) source length, for ``max_len = max_len_a * src_len + max_len_b``.
        reference: (batch_size, T) target tokens ending with EOS, padded with ``pad``; when
            given, each hypothesis tracks the soft probability that position t holds
            reference[t] (the relaxed Hamming loss of Goyal et al., 2018).
    """
    K = cfg.beam
    soft = cfg.epsilon > 0
    max_len = min(int(cfg.max_len_a * src_len + cfg.max_len_b), cfg.max_len_cap - 1)
    if cfg.min_len > max_len:
        raise ValueError(f"min_len ({cfg.min_len}) is larger than max_len ({max_len}); adjust --max-len-a/-b")
    cand_size = 2 * K

    rows = batch_size * K
    tokens = torch.full((rows, max_len + 2), pad, dtype=torch.long, device=device)  # (rows, T+2)
    tokens[:, 0] = bos
    cum = torch.zeros(batch_size, K, device=device)  # (B, K) cumulative score, differentiable
    history = torch.zeros(rows, max_len + 1, device=device)  # (rows, T+1) cumulative, detached
    track_ref = reference is not None
    if track_ref:
        T_ref = reference.shape[1]
        ref_match = torch.zeros(batch_size, K, max_len + 1, device=device)  # (B, K, T+1)
    sent_ids = torch.arange(batch_size, device=device)  # (B',) original index of live sentences
    cands_to_ignore = torch.zeros(batch_size, K, dtype=torch.bool, device=device)
    finalized: list[list[Hypothesis]] = [[] for _ in range(batch_size)]
    input_embedding = None

    for step in range(max_len + 1):
        B = sent_ids.numel()
        lprobs = model.step(tokens[:, : step + 1], input_embedding)  # (B' K, V)
        if step == 0:  # scores and tracks take the log-probs' dtype (fairseq's: float32, also under fp16)
            cum, history = cum.to(lprobs.dtype), history.to(lprobs.dtype)
            if track_ref:
                ref_match = ref_match.to(lprobs.dtype)
        V = lprobs.shape[-1]
        # Rank the B' K V candidates without autograd: only the M kept ones need gradients, and
        # every full-vocabulary op under autograd would keep a (B' K, V) copy for backward.
        with torch.no_grad():
            cand = _candidate_scores(lprobs, cum, step, max_len, cfg.min_len, eos, pad, unk, cfg.unk_penalty)
            flat = cand.view(B, -1)  # (B', K V), or (B', V) at step 0
            n_hard = min(cand_size, flat.shape[1] - 1)  # -1 so that pad is never a candidate
            n_cand = min(max(cfg.candidates, n_hard), flat.shape[1] - 1) if soft else n_hard
            ranked, top_idx = torch.topk(flat, n_cand)  # (B', M)
        cand_beams = torch.div(top_idx, V, rounding_mode="trunc")  # (B', M)
        cand_tokens = top_idx.fmod(V)  # (B', M)
        if torch.is_grad_enabled() and (lprobs.requires_grad or cum.requires_grad):
            # The same scores, differentiable: log-prob of the token plus its beam's score.
            picked = lprobs.view(B, K * V).gather(1, top_idx)  # (B', M); step 0: beam 0 only
            if step:
                picked = picked + cum.gather(1, cand_beams)
            penalty = cfg.unk_penalty * (cand_tokens == unk).to(picked.dtype) if cfg.unk_penalty else 0.0
            top_scores = torch.where(torch.isinf(ranked), ranked, picked - penalty)  # (B', M)
        else:
            top_scores = ranked
        row_offsets = (torch.arange(B, device=device) * K).unsqueeze(1)  # (B', 1)
        cand_rows = cand_beams + row_offsets  # (B', M) rows of the current state

        # --- finish hypotheses: EOS among the first K candidates --------------------------------
        eos_mask = (cand_tokens == eos) & (top_scores.detach() != -math.inf)  # (B', M)
        eos_mask[:, :K] &= ~cands_to_ignore
        newly_finished = _finalize(
            step, eos_mask[:, :K], cand_rows[:, :K], top_scores[:, :K], tokens, history, sent_ids,
            finalized, K, max_len, cfg.lenpen, eos,
            ref_match=ref_match.view(B * K, -1) if track_ref else None,
            reference=reference, T_ref=T_ref if track_ref else 0,
        )  # fmt: skip
        if stats is not None:
            stats.steps = step + 1
        if len(newly_finished) == B or step >= max_len:
            break

        # --- drop finished sentences ------------------------------------------------------------
        state_rows = None  # hard mode: rows of the model state that the live batch now uses
        if newly_finished:
            keep = torch.ones(B, dtype=torch.bool)
            keep[newly_finished] = False
            keep_idx = keep.nonzero().squeeze(1).to(device)  # (B'',)
            B = keep_idx.numel()
            keep_rows = (keep_idx.unsqueeze(1) * K + torch.arange(K, device=device)).view(-1)  # (B'' K,)
            sent_ids = sent_ids[keep_idx]
            eos_mask, cand_beams, cand_tokens = eos_mask[keep_idx], cand_beams[keep_idx], cand_tokens[keep_idx]
            top_scores, cands_to_ignore = top_scores[keep_idx], cands_to_ignore[keep_idx]
            tokens, history = tokens[keep_rows], history[keep_rows]
            cum = cum[keep_idx]
            if track_ref:
                ref_match = ref_match[keep_idx]
            if soft:
                model.reorder(keep_rows)
            else:
                state_rows = keep_rows
        row_offsets = (torch.arange(B, device=device) * K).unsqueeze(1)  # (B', 1)

        # --- choose the next K live beams -------------------------------------------------------
        eos_mask[:, :K] |= cands_to_ignore
        # fairseq's rule: the first K non-EOS among the first 2K candidates.
        rank_key = eos_mask[:, :n_hard].long() * cand_size + torch.arange(n_hard, device=device)  # (B', 2K)
        ranks, hard_pick = torch.topk(rank_key, K, dim=1, largest=False)  # (B', K)
        cands_to_ignore = ranks >= cand_size
        if soft:
            live_scores = top_scores.masked_fill(eos_mask, -math.inf)  # (B', M)
            weights, info = sorted_soft_topk(
                live_scores, K, cfg.epsilon, tol=cfg.tol, max_iter=cfg.max_iter, return_info=True
            )  # (B', M, K): column j is the soft one-hot of the j-th best live candidate
            if stats is not None:
                stats.solver_iterations.append(info.iterations)
                stats.marginal_errors.append(info.marginal_error)
            pick = weights.detach().argmax(1)  # (B', K) bookkeeping: each column's arg-max
            # weights are 0 on -inf scores; zero those scores so that 0 * -inf is not NaN
            finite_scores = top_scores.masked_fill(eos_mask | torch.isinf(top_scores.detach()), 0.0)
            cum = torch.einsum("bmk,bm->bk", weights, finite_scores)  # (B', K)
            beam_onehot = torch.nn.functional.one_hot(cand_beams, K).to(weights.dtype)  # (B', M, K_old)
            mix = torch.einsum("bmk,bmi->bki", weights, beam_onehot)  # (B', K_new, K_old)
            state_weights = weights if cfg.state_grad == "full" else weights.detach()
            cand_emb = model.embed(cand_tokens)  # (B', M, D)
            input_embedding = torch.einsum("bmk,bmd->bkd", state_weights.to(cand_emb.dtype), cand_emb)
            input_embedding = input_embedding.reshape(B * K, -1)  # (B' K, D)
            model.mix(mix if cfg.state_grad == "full" else mix.detach())
            if track_ref:
                ref_match = torch.einsum("bki,bit->bkt", mix, ref_match)  # soft-reordered history
                hit = _reference_hit(cand_tokens, reference[sent_ids], step, T_ref, pad, cum.dtype)  # (B', M)
                new = torch.einsum("bmk,bm->bk", weights, hit)  # (B', K)
                ref_match = _set_column(ref_match, step, new)
        else:
            pick = hard_pick
            cum = top_scores.gather(1, pick)  # (B', K)
            if track_ref:
                picked_beam = cand_beams.gather(1, pick)  # (B', K)
                ref_match = ref_match.gather(1, picked_beam.unsqueeze(-1).expand_as(ref_match))
                hit = _reference_hit(cand_tokens.gather(1, pick), reference[sent_ids], step, T_ref, pad, cum.dtype)
                ref_match = _set_column(ref_match, step, hit)
        picked_rows = (cand_beams.gather(1, pick) + row_offsets).view(-1)  # (B' K,)
        tokens = tokens[picked_rows]
        tokens[:, step + 1] = cand_tokens.gather(1, pick).view(-1)
        history = history[picked_rows]
        history[:, step] = top_scores.detach().gather(1, pick).view(-1)
        if not soft:
            model.reorder(picked_rows if state_rows is None else state_rows[picked_rows])

    for hyps in finalized:
        hyps.sort(key=lambda h: float(h.score.detach()), reverse=True)
    return finalized


def _reference_hit(cand_tokens, reference, step, T_ref, pad, dtype):
    """1.0 where a candidate's token equals the reference token at ``step``: (B', M)."""
    if step >= T_ref:
        return torch.zeros(cand_tokens.shape, dtype=dtype, device=cand_tokens.device)
    ref_t = reference[:, step].unsqueeze(1)  # (B', 1)
    return ((cand_tokens == ref_t) & (ref_t != pad)).to(dtype)


def _set_column(track, step, values):
    """track (B', K, T) with column ``step`` replaced by values (B', K), out of place."""
    col = torch.zeros_like(track)
    col[..., step] = 1.0
    return track * (1 - col) + values.unsqueeze(-1) * col


def _finalize(step, eos_mask, eos_rows, eos_scores, tokens, history, sent_ids, finalized, K, max_len,
              lenpen, eos, ref_match, reference, T_ref):  # fmt: skip
    """Stores each EOS candidate (first K only) of an unfinished sentence as a Hypothesis.

    eos_mask, eos_rows, eos_scores: (B', K). Returns the positions (in the live batch) of the
    sentences finished at this step, as fairseq's ``finalize_hypos`` does.
    """
    which = eos_mask.nonzero().tolist()  # [(sentence position, candidate rank)], sentence-major
    touched = []
    for b, c in which:
        sent = int(sent_ids[b])
        if len(finalized[sent]) < K:
            row = int(eos_rows[b, c])
            hyp_tokens = tokens[row, 1 : step + 2].clone()
            hyp_tokens[step] = eos
            pos = history[row, : step + 1].clone()
            pos[step] = eos_scores[b, c].detach()
            pos[1:] = pos[1:] - pos[:-1].clone()
            match = None
            if ref_match is not None:
                hit = 1.0 if step < T_ref and int(reference[sent, step]) == eos else 0.0
                prefix = ref_match[row, :step]  # (step,)
                match = torch.cat([prefix, prefix.new_tensor([hit])])
            finalized[sent].append(Hypothesis(hyp_tokens, eos_scores[b, c] / (step + 1) ** lenpen, pos, match))
        if b not in touched:
            touched.append(b)
    return [b for b in touched if len(finalized[int(sent_ids[b])]) == K or step >= max_len]
