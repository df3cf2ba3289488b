"""Beam search whose beam selection is the SOFT top-k, in pure torch.

One loop serves generation and training. It follows fairseq's beam search rules exactly
(``fairseq.sequence_generator.SequenceGenerator``): 2k candidates per sentence; an EOS candidate
among the first k finishes a hypothesis, scored cumulative log-prob / length ** lenpen; the k
live beams are refilled from the non-EOS candidates; a sentence is done with k finished
hypotheses or at ``max_len``.

The loop (:func:`beam_search`) only orchestrates a :class:`BeamState`, whose methods are the
steps of fairseq's loop: rank the candidates, finish hypotheses, drop finished sentences, select
the next beams. Selection is one of two policies behind one contract (``select``):

- :class:`HardSelection` (``epsilon == 0``): the first k non-EOS candidates, ``index_select``
  reordering; token- and score-identical to fairseq.
- :class:`SoftSelection` (``epsilon > 0``): the columns of ``sorted_soft_topk`` over the
  candidates. Beam j's score, next input embedding and decoder state are mixtures of its
  candidates' (a *soft reordering*), so gradients flow through the search; hard tokens (each
  column's arg-max) are kept for bookkeeping. As epsilon -> 0 it tends to the hard policy.

The search knows no loss. What a loss needs along each hypothesis it asks for through
:class:`TokenFeatures` (see ``soft_beam.losses``); the model is reached only through a
:class:`StepModel` (fairseq's lives in ``fairseq_plugins``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .topk import sorted_soft_topk

__all__ = [
    "SearchConfig",
    "SettingError",
    "Hypothesis",
    "SearchStats",
    "StepModel",
    "TokenFeatures",
    "Candidates",
    "candidate_scores",
    "Picked",
    "Selection",
    "HardSelection",
    "SoftSelection",
    "beam_search",
]


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


class TokenFeatures(Protocol):
    """The loss's hook: a feature vector for each candidate token, tracked along each hypothesis.

    Each beam keeps, per position, the features of its candidates mixed with the same weights as
    its score and its decoder state (in hard mode: the chosen candidate's). A finished
    :class:`Hypothesis` carries them as ``features`` (length, size). With 0/1 features that
    compare a token with the reference (``soft_beam.losses.ReferenceHits``) this is the soft
    probability that position t holds the reference token; any other per-token quantity works
    the same way, without a change to the search.
    """

    size: int

    def __call__(self, tokens: torch.Tensor, sentences: torch.Tensor, step: int) -> torch.Tensor:
        """tokens (S, M): the candidate tokens of the live sentences at position ``step``;
        sentences (S,): their indices in the batch. Returns (S, M, size)."""


class SettingError(ValueError):
    """A bad setting; ``setting`` names the field (of :class:`SearchConfig` or
    ``soft_beam.losses.LossOptions``), so that a front end can name its own option for it."""

    def __init__(self, setting: str, message: str):
        super().__init__(message)
        self.setting = setting


@dataclass(frozen=True)
class SearchConfig:
    """Every setting of the search, validated here and nowhere else; copy with
    ``dataclasses.replace``."""

    beam: int
    epsilon: float = 0.0  # 0: hard beam search
    # Candidates (beam, token) per sentence that the soft top-k ranks; None: 2 * beam ** 2. Hard
    # selection always ranks fairseq's 2 * beam.
    candidates: int | None = None
    lenpen: float = 1.0
    max_len_a: float = 0.0
    max_len_b: int = 200
    max_len_cap: int | None = None  # the decoder's positions limit; None: no limit
    min_len: int = 1
    unk_penalty: float = 0.0
    tol: float | None = None  # the soft top-k's tolerance; None: its dtype's default
    max_iter: int = 100
    # The soft top-k's floor on each step's score range, in the scores' units (nats): below it
    # epsilon is absolute, so near-ties give a smooth plan and a bounded gradient (soft_topk).
    min_span: float = 0.0
    # "full": the exact gradient of the relaxed search, also through the weights that mix the next
    # decoder inputs and states. Each step's weights respond to score gaps at about 1/epsilon and
    # feed the next step's scores, so this path compounds over the decoding steps (1.1e4 to 4.4e5
    # per token against MLE's 0.93 on a trained model at epsilon 0.01; bench_train_step.py).
    # "values": those two mixtures pass gradient to the mixed values only; the weights still get it
    # through the beam scores and the tracked features. Biased, but bounded; the forward is the same.
    state_grad: str = "values"

    def __post_init__(self):
        for setting, ok, message in self._rules():
            if not ok:
                raise SettingError(setting, f"{message}, got {getattr(self, setting)!r}")

    def _rules(self):
        def whole(x, low):
            return isinstance(x, int) and not isinstance(x, bool) and x >= low

        def real(x):
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        return [
            ("beam", whole(self.beam, 1), "beam must be an integer >= 1"),
            ("epsilon", real(self.epsilon) and self.epsilon >= 0, "epsilon must be a finite number >= 0 (0 = hard search)"),
            ("candidates", self.candidates is None or (whole(self.candidates, 1) and self.candidates >= 2 * self.beam),
             f"candidates must be at least 2 * beam = {2 * self.beam} (up to beam of them may be EOS, and beam live "
             "candidates must remain), or None for 2 * beam ** 2"),
            ("lenpen", real(self.lenpen), "lenpen must be a finite number"),
            ("max_len_a", real(self.max_len_a) and self.max_len_a >= 0, "max_len_a must be a finite number >= 0"),
            ("max_len_b", whole(self.max_len_b, 0), "max_len_b must be an integer >= 0"),
            ("max_len_cap", self.max_len_cap is None or whole(self.max_len_cap, 2), "max_len_cap must be an integer >= 2 or None"),
            ("min_len", whole(self.min_len, 1), "min_len must be an integer >= 1"),
            ("unk_penalty", real(self.unk_penalty), "unk_penalty must be a finite number"),
            ("tol", self.tol is None or (real(self.tol) and self.tol > 0), "tol must be a number > 0 or None"),
            ("max_iter", whole(self.max_iter, 1), "max_iter must be an integer >= 1"),
            ("min_span", real(self.min_span) and self.min_span >= 0, "min_span must be a finite number >= 0"),
            ("state_grad", self.state_grad in ("full", "values"), "state_grad must be 'full' or 'values'"),
        ]  # fmt: skip

    @property
    def soft_candidates(self) -> int:
        """How many candidates per sentence the soft top-k ranks."""
        return 2 * self.beam**2 if self.candidates is None else self.candidates

    def max_len(self, src_len: int) -> int:
        """The last decoding step: ``max_len_a * src_len + max_len_b``, under the positions cap."""
        max_len = int(self.max_len_a * src_len + self.max_len_b)
        if self.max_len_cap is not None:
            max_len = min(max_len, self.max_len_cap - 1)
        if self.min_len > max_len:
            raise SettingError("min_len", f"min_len ({self.min_len}) is larger than max_len ({max_len}); adjust --max-len-a/-b")
        return max_len


@dataclass
class Hypothesis:
    """A finished hypothesis. ``score`` is normalised by length ** lenpen and keeps its graph."""

    tokens: torch.Tensor  # (length,) ending with EOS, BOS excluded
    score: torch.Tensor  # () normalised score
    positional_scores: torch.Tensor  # (length,) per-token log-probs, detached
    features: torch.Tensor | None  # (length, F) the tracked TokenFeatures, with their graph; or None


@dataclass
class SearchStats:
    steps: int = 0
    solver_iterations: list = field(default_factory=list)  # per soft top-k call: its iterations
    marginal_errors: list = field(default_factory=list)  # per call: the largest row's marginal error
    unconverged: int = 0  # soft top-k rows (sentence steps) that missed the tolerance


@dataclass
class Candidates:
    """One step's ranked candidates, best first: the M best (beam, token) pairs of each of the S
    live sentences."""

    scores: torch.Tensor  # (S, M) beam score + log-prob; with its graph where one is needed
    beams: torch.Tensor  # (S, M) the beam that each extends
    tokens: torch.Tensor  # (S, M)
    finishing: torch.Tensor  # (S, M) bool: EOS with a finite score
    features: torch.Tensor | None  # (S, M, F) TokenFeatures of the tokens, or None

    def __getitem__(self, sentences: torch.Tensor) -> Candidates:
        """The candidates of the live sentences ``sentences`` (S',)."""
        features = None if self.features is None else self.features[sentences]
        return Candidates(self.scores[sentences], self.beams[sentences], self.tokens[sentences],
                          self.finishing[sentences], features)  # fmt: skip


def candidate_scores(lprobs, beam_scores, step, max_len, min_len, eos, pad, unk, unk_penalty):
    """Each (beam, token) candidate's score, beam score + log-prob, with fairseq's per-step edits
    of the log-probs; for ranking only (no autograd). lprobs (S K, V), beam_scores (S, K) ->
    (S, K, V), or (S, 1, V) at step 0, where every beam is the same.

    One new tensor, edited in place: two full-vocabulary passes (the sum and the NaN check), where
    separate masks and a ``where`` took four.
    """
    S, K = beam_scores.shape
    lprobs = lprobs.view(S, K, -1)  # (S, K, V)
    cand = lprobs[:, :1].clone() if step == 0 else lprobs + beam_scores.unsqueeze(-1)
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


def _upload(values: list[int], device: torch.device) -> torch.Tensor:
    """A host list as a long tensor (len(values),) on ``device``. To a GPU it goes through pinned
    memory without blocking: a blocking copy from pageable memory waits for the device's queue."""
    host = torch.tensor(values, dtype=torch.long)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _set_column(track: torch.Tensor, step: int, values: torch.Tensor) -> torch.Tensor:
    """track (S, K, T, F) with position ``step`` replaced by values (S, K, F), out of place."""
    col = torch.zeros(track.shape[-2:-1] + (1,), dtype=track.dtype, device=track.device)  # (T, 1)
    col[step] = 1.0
    return track * (1 - col) + values.unsqueeze(-2) * col


@dataclass
class Picked:
    """The next beams of each live sentence (S of them, K beams each), as a policy chose them."""

    pick: torch.Tensor  # (S, K) the candidate whose token each beam takes (soft: its weights' arg-max)
    scores: torch.Tensor  # (S, K) the beams' scores, differentiable
    weights: torch.Tensor | None = None  # (S, M, K) soft only: beam k = sum_m weights[:, m, k] * candidate m
    mix: torch.Tensor | None = None  # (S, K, K_old) soft only: the same weights, summed per old beam


class Selection(Protocol):
    """A beam selection policy: how the next K beams are formed from the ranked candidates."""

    def select(self, cand: Candidates, blocked: torch.Tensor, first_open: torch.Tensor, stats) -> Picked:
        """cand (S, M); blocked (S, M): candidates that cannot continue a beam (EOS, ignored);
        first_open (S, K): the first K unblocked by rank (fairseq's rule); stats: SearchStats or None."""

    def carry(self, track: torch.Tensor, cand: Candidates, picked: Picked) -> torch.Tensor:
        """A per-beam track (S, K_old, ...) -> the new beams' (S, K, ...)."""

    def combine(self, values: torch.Tensor, picked: Picked) -> torch.Tensor:
        """Per-candidate values (S, M, F) -> the new beams' (S, K, F)."""

    def advance_model(self, model: StepModel, cand: Candidates, picked: Picked, rows, pending_rows):
        """Moves the model's state to the new beams. rows (S K,): the rows of the live state that
        the new beams' tokens extend; pending_rows (S K,) or None: the live rows of a state not
        yet compacted after dropping sentences. Returns the next input embedding (S K, D), or None
        for the tokens' own."""


class HardSelection:
    """fairseq's selection: the first K candidates that are neither EOS nor ignored."""

    def __init__(self, cfg: SearchConfig):
        self.cfg = cfg

    def select(self, cand, blocked, first_open, stats) -> Picked:
        return Picked(first_open, cand.scores.gather(1, first_open))  # (S, K)

    def carry(self, track, cand, picked):
        beams = cand.beams.gather(1, picked.pick)  # (S, K)
        return track.gather(1, beams.view(*beams.shape, *[1] * (track.dim() - 2)).expand_as(track))

    def combine(self, values, picked):
        return values.gather(1, picked.pick.unsqueeze(-1).expand(-1, -1, values.shape[-1]))

    def advance_model(self, model, cand, picked, rows, pending_rows):
        model.reorder(rows if pending_rows is None else pending_rows[rows])
        return None


class SoftSelection:
    """The SOFT top-k over all M candidates: new beam j is the mixture of the candidates weighted
    by column j of ``sorted_soft_topk`` (the soft one-hot of the j-th best)."""

    def __init__(self, cfg: SearchConfig):
        self.cfg = cfg

    def select(self, cand, blocked, first_open, stats) -> Picked:
        cfg = self.cfg
        scores = cand.scores.masked_fill(blocked, -math.inf)  # (S, M)
        # A row that misses the tolerance keeps the solver's plan: its beams are mixtures whose
        # weights sum to 1 within the marginal error, which stats (and the criterion's log) report.
        weights, info = sorted_soft_topk(scores, cfg.beam, cfg.epsilon, min_span=cfg.min_span, tol=cfg.tol,
                                         max_iter=cfg.max_iter, return_info=True, on_failure="ignore")  # fmt: skip
        if stats is not None:
            stats.solver_iterations.append(info.iterations)
            stats.marginal_errors.append(info.marginal_error)
            stats.unconverged += info.unconverged
        # weights are 0 on -inf scores; zero those scores so that 0 * -inf is not NaN
        finite = cand.scores.masked_fill(blocked | torch.isinf(cand.scores.detach()), 0.0)  # (S, M)
        old_beams = torch.nn.functional.one_hot(cand.beams, cfg.beam).to(weights.dtype)  # (S, M, K_old)
        return Picked(
            pick=weights.detach().argmax(1),  # (S, K)
            scores=torch.einsum("smk,sm->sk", weights, finite),  # (S, K)
            weights=weights,  # (S, M, K)
            mix=torch.einsum("smk,smi->ski", weights, old_beams),  # (S, K, K_old)
        )

    def carry(self, track, cand, picked):
        return torch.einsum("ski,si...->sk...", picked.mix, track)

    def combine(self, values, picked):
        return torch.einsum("smk,smf->skf", picked.weights, values)

    def advance_model(self, model, cand, picked, rows, pending_rows):
        if pending_rows is not None:
            model.reorder(pending_rows)
        full = self.cfg.state_grad == "full"
        model.mix(picked.mix if full else picked.mix.detach())
        weights = picked.weights if full else picked.weights.detach()
        embeddings = model.embed(cand.tokens)  # (S, M, D)
        mixed = torch.einsum("smk,smd->skd", weights.to(embeddings.dtype), embeddings)  # (S, K, D)
        return mixed.reshape(-1, mixed.shape[-1])  # (S K, D)


@dataclass(frozen=True)
class _Specials:
    bos: int
    eos: int
    pad: int
    unk: int


class BeamState:
    """The search's state over S live sentences of K beams each (rows = S K, sentence-major),
    with the steps of fairseq's loop as methods: ``candidates``, ``finish``, ``drop`` and
    ``select``."""

    def __init__(self, batch_size: int, cfg: SearchConfig, max_len: int, specials: _Specials, device, features):
        self.cfg, self.max_len, self.specials, self.token_features = cfg, max_len, specials, features
        rows = batch_size * cfg.beam
        self.tokens = torch.full((rows, max_len + 2), specials.pad, dtype=torch.long, device=device)  # (rows, T+2)
        self.tokens[:, 0] = specials.bos
        self.beam_scores = self.score_history = self.features = None  # set at step 0, in the log-probs' dtype
        self.sentences = torch.arange(batch_size, device=device)  # (S,) batch index of each live sentence
        self.batch_ids = list(range(batch_size))  # the same on the host: finish and drop never read it back
        self.ignored = torch.zeros(batch_size, cfg.beam, dtype=torch.bool, device=device)  # (S, K) fairseq's cands_to_ignore
        self.finalized: list[list[Hypothesis]] = [[] for _ in range(batch_size)]
        self.input_embedding = None  # (rows, D) or None: the next step's input, if not the tokens'
        self.pending_rows = None  # (rows,) live rows of a model state not yet compacted

    @property
    def live(self) -> int:
        return self.sentences.numel()

    def _start(self, dtype):
        """Scores and tracks take the log-probs' dtype (fairseq's: float32, also under fp16)."""
        S, K, device = self.live, self.cfg.beam, self.tokens.device
        self.beam_scores = torch.zeros(S, K, dtype=dtype, device=device)  # (S, K) differentiable
        self.score_history = torch.zeros(S * K, self.max_len + 1, dtype=dtype, device=device)  # (rows, T+1) cumulative, detached
        if self.token_features is not None:
            F = self.token_features.size
            self.features = torch.zeros(S, K, self.max_len + 1, F, dtype=dtype, device=device)  # (S, K, T+1, F)

    def candidates(self, lprobs: torch.Tensor, step: int) -> Candidates:
        """Ranks the (beam, token) candidates of lprobs (S K, V): the best 2K, or in soft mode the
        best ``cfg.soft_candidates``."""
        if step == 0:
            self._start(lprobs.dtype)
        cfg, sp, S, K = self.cfg, self.specials, self.live, self.cfg.beam
        V = lprobs.shape[-1]
        # Rank the S K V candidates without autograd: only the M kept ones need gradients, and
        # every full-vocabulary op under autograd would keep a (S K, V) copy for backward.
        with torch.no_grad():
            ranking = candidate_scores(lprobs, self.beam_scores, step, self.max_len, cfg.min_len, sp.eos, sp.pad, sp.unk, cfg.unk_penalty)
            flat = ranking.view(S, -1)  # (S, K V), or (S, V) at step 0
            n_hard = min(2 * K, flat.shape[1] - 1)  # -1 so that pad is never a candidate
            M = min(max(cfg.soft_candidates, n_hard), flat.shape[1] - 1) if cfg.epsilon > 0 else n_hard
            ranked, index = torch.topk(flat, M)  # (S, M)
        beams = torch.div(index, V, rounding_mode="trunc")  # (S, M)
        tokens = index.fmod(V)  # (S, M)
        scores = ranked
        if torch.is_grad_enabled() and (lprobs.requires_grad or self.beam_scores.requires_grad):
            # The same scores, differentiable: log-prob of the token plus its beam's score.
            picked = lprobs.view(S, K * V).gather(1, index)  # (S, M); step 0: beam 0 only
            if step:
                picked = picked + self.beam_scores.gather(1, beams)
            penalty = cfg.unk_penalty * (tokens == sp.unk).to(picked.dtype) if cfg.unk_penalty else 0.0
            scores = torch.where(torch.isinf(ranked), ranked, picked - penalty)  # (S, M)
        finishing = (tokens == sp.eos) & (ranked != -math.inf)  # (S, M)
        features = None
        if self.token_features is not None:
            features = self.token_features(tokens, self.sentences, step).to(self.beam_scores.dtype)  # (S, M, F)
        return Candidates(scores, beams, tokens, finishing, features)

    def finish(self, cand: Candidates, step: int) -> list[int]:
        """Stores each EOS candidate among the first K of an unfinished sentence as a Hypothesis.
        Returns the live positions of the sentences finished at this step, as fairseq's
        ``finalize_hypos`` does."""
        K = self.cfg.beam
        finishing = cand.finishing[:, :K] & ~self.ignored  # (S, K)
        # The step's one host read (a GPU waits for it): each finishing candidate's beam, -1 for the
        # others. A nonzero() and an int() per hypothesis were a wait each.
        ends = torch.where(finishing, cand.beams[:, :K], -1).view(-1).tolist()  # (S K,) sentence-major
        touched = []
        for i in [i for i, b in enumerate(ends) if b >= 0]:
            s, c = divmod(i, K)
            sentence = self.batch_ids[s]
            if len(self.finalized[sentence]) < K:
                self.finalized[sentence].append(self._hypothesis(cand, s, c, ends[i], step))
            if not touched or touched[-1] != s:
                touched.append(s)
        return [s for s in touched if len(self.finalized[self.batch_ids[s]]) == K or step >= self.max_len]

    def _hypothesis(self, cand: Candidates, s: int, c: int, b: int, step: int) -> Hypothesis:
        """The hypothesis that candidate c (an EOS, extending beam b) of live sentence s ends."""
        row = s * self.cfg.beam + b
        tokens = self.tokens[row, 1 : step + 2].clone()  # (step + 1,)
        tokens[step] = self.specials.eos
        positional = self.score_history[row, : step + 1].clone()  # (step + 1,) cumulative
        positional[step] = cand.scores[s, c].detach()
        positional[1:] = positional[1:] - positional[:-1].clone()
        features = None
        if self.features is not None:
            features = torch.cat([self.features[s, b, :step], cand.features[s, c].unsqueeze(0)])  # (step + 1, F)
        score = cand.scores[s, c] / (step + 1) ** self.cfg.lenpen
        return Hypothesis(tokens, score, positional, features)

    def drop(self, finished: list[int], cand: Candidates) -> Candidates:
        """Removes the finished sentences (live positions) from the state; returns the remaining
        sentences' candidates. The model's state is compacted lazily (``pending_rows``)."""
        if not finished:
            return cand
        K, device = self.cfg.beam, self.tokens.device
        gone = set(finished)
        kept_ids = [s for s in range(self.live) if s not in gone]
        self.batch_ids = [self.batch_ids[s] for s in kept_ids]
        kept = _upload(kept_ids, device)  # (S',)
        rows = (kept.unsqueeze(1) * K + torch.arange(K, device=device)).view(-1)  # (S' K,)
        self.sentences, self.ignored, self.beam_scores = self.sentences[kept], self.ignored[kept], self.beam_scores[kept]
        self.tokens, self.score_history = self.tokens[rows], self.score_history[rows]
        if self.features is not None:
            self.features = self.features[kept]
        self.pending_rows = rows
        return cand[kept]

    def select(self, policy: Selection, cand: Candidates, model: StepModel, step: int, stats) -> None:
        """Chooses the next K beams of each live sentence with ``policy`` and moves every state
        (tokens, scores, features, the model's) to them."""
        K, S = self.cfg.beam, self.live
        n_hard = min(2 * K, cand.scores.shape[1])
        blocked = cand.finishing.clone()  # (S, M)
        blocked[:, :K] |= self.ignored
        # fairseq's rule: the first K non-EOS among the first 2K candidates
        rank_key = blocked[:, :n_hard].long() * (2 * K) + torch.arange(n_hard, device=blocked.device)  # (S, 2K)
        ranks, first_open = torch.topk(rank_key, K, dim=1, largest=False)  # (S, K)
        self.ignored = ranks >= 2 * K
        picked = policy.select(cand, blocked, first_open, stats)
        self.beam_scores = picked.scores
        if self.features is not None:
            self.features = _set_column(policy.carry(self.features, cand, picked), step, policy.combine(cand.features, picked))
        offsets = (torch.arange(S, device=blocked.device) * K).unsqueeze(1)  # (S, 1)
        rows = (cand.beams.gather(1, picked.pick) + offsets).view(-1)  # (S K,)
        self.tokens = self.tokens[rows]
        self.tokens[:, step + 1] = cand.tokens.gather(1, picked.pick).view(-1)
        self.score_history = self.score_history[rows]
        self.score_history[:, step] = cand.scores.detach().gather(1, picked.pick).view(-1)
        self.input_embedding = policy.advance_model(model, cand, picked, rows, self.pending_rows)
        self.pending_rows = None


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
    features: TokenFeatures | None = None,
    stats: SearchStats | None = None,
) -> list[list[Hypothesis]]:
    """Runs the search; returns, per sentence, its finished hypotheses sorted by score.

    Args:
        model: the decoder, with its state already expanded to ``batch_size * beam`` rows.
        src_len: the (padded) source length, for ``max_len = max_len_a * src_len + max_len_b``.
        features: what to track along each hypothesis for a loss (see :class:`TokenFeatures`).
        stats: filled with the step count and the soft top-k's solver figures.
    """
    max_len = cfg.max_len(src_len)
    state = BeamState(batch_size, cfg, max_len, _Specials(bos, eos, pad, unk), device, features)
    policy = SoftSelection(cfg) if cfg.epsilon > 0 else HardSelection(cfg)
    for step in range(max_len + 1):
        lprobs = model.step(state.tokens[:, : step + 1], state.input_embedding)  # (S K, V)
        cand = state.candidates(lprobs, step)
        finished = state.finish(cand, step)
        if stats is not None:
            stats.steps = step + 1
        if len(finished) == state.live or step >= max_len:
            break
        cand = state.drop(finished, cand)
        state.select(policy, cand, model, step, stats)
    _sort_by_score(state.finalized)
    return state.finalized


def _sort_by_score(finalized: list[list[Hypothesis]]) -> None:
    """Sorts each sentence's hypotheses, best first (stable), reading every score in one host read."""
    flat = [h for hyps in finalized for h in hyps]
    if not flat:
        return
    scores = iter(torch.stack([h.score.detach() for h in flat]).tolist())  # (H,) -> floats
    for hyps in finalized:
        keyed = [(next(scores), h) for h in hyps]
        keyed.sort(key=lambda pair: pair[0], reverse=True)
        hyps[:] = [h for _, h in keyed]
