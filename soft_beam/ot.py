"""Entropic optimal transport from n points to a few anchors, batched over rows.

Notation, per row (batch index b omitted):
    C   (n, m)  cost; n sources (scores), m anchors (m = 2 or k + 1)
    mu  (n,)    source masses; 0 marks a masked source (a -inf score)
    nu  (m,)    anchor masses; 0 marks an inactive anchor; sum(mu) == sum(nu) == 1
    eps         entropic regularisation

The plan minimises <C, P> + eps * sum P (log P - 1) under P 1 = mu, P^T 1 = nu and has the form
    P_ij = mu_i * softmax_j((g_j - C_ij) / eps),
so the row marginals hold by construction and only the anchor potentials g (m,) are unknown.
They maximise the concave *semi-dual*
    D(g) = <g, nu> - eps * sum_i mu_i * logsumexp_j((g_j - C_ij) / eps),
whose gradient is nu - P^T 1 and whose negative Hessian is L / eps with
    L = diag(P^T 1) - P^T Q,    Q_ij = softmax_j(...) = P_ij / mu_i,
an (m x m) graph Laplacian (rows sum to 0; D is invariant to g + c). We fix the gauge at each
row's heaviest anchor (g = 0 there). The same small system gives the implicit backward.

Solve and gradient are separate, as in OTT-JAX: ``solve_transport`` runs under no_grad and returns
a ``TransportSolution``; ``entropic_transport`` attaches the implicit backward to its plan.

Rows are independent: every decision of the solver (converged, stalled, guarded step, undo, the
fallbacks) is taken per row, a row that has stopped keeps the values it stopped with, and the
fallbacks rerun only the rows that need them. So a row's result does not depend on the rows that
share its batch: to the bit where its (m, n) block sits equally aligned in memory alone and in
the batch (torch's CPU gemm, in the Laplacian, rounds by alignment), else to that rounding.

Layout: the entry points take and return (B, n, m), but the solver works on the transposes,
(B, m, n), so that the softmax and log-sum-exp over the few anchors vectorise along the n sources.
Over a last dimension of size 5 torch's CPU softmax is 7x to 24x slower (measured: 143 vs 6 us
at 64 x 32 x 5, 222 vs 32 ms at 64 x 40000 x 5).
"""

from __future__ import annotations

import array
import functools
import math
import warnings
from dataclasses import dataclass, field

import torch

__all__ = [
    "ConvergenceError",
    "SolverInfo",
    "TransportSolution",
    "default_tolerance",
    "entropic_transport",
    "plan_from_potentials",
    "semidual_objective",
    "sinkhorn_potentials",
    "solve_transport",
]

_STEPS = (1.0, 0.25)  # the Newton step fractions a guarded iteration tries (besides a Sinkhorn step)
_WARM_BUDGET = 20  # measured: 3-6 iterations from a good g0 (batch 64, eps 0.1 to 0.001)
# From g0 a row's first step goes unguarded if its starting marginal error is at most this. Measured
# (batch 64): 0.15 to 10 at eps 0.01 and 0.001, where full steps converge in 2 to 5; 47 to 5e3 at
# eps 0.1 with n >= 200, where the guard's Sinkhorn steps saved 2 to 8 iterations. Applied to each
# row's own error (formerly to the batch's largest): over 6 random batches per (k, n, eps) of the
# benchmark's grid (n = 4000 for the full vocabulary), iterations weighted by cost (a guarded one
# as 2 to 2.5 plain ones) summed to 344, against 343 for the batch rule; 356 at 7, 372 at 5.
_TRUST_BELOW = 10.0
_SINKHORN_CHUNK = 10  # Sinkhorn iterations between two convergence checks of the fallback


@dataclass(frozen=True)
class SolverInfo:
    """What a solve reached. Over the batch: ``iterations`` is the most that any row took,
    ``marginal_error`` the max over rows and anchors of |P^T 1 / nu - 1|, ``converged`` whether
    every row reached tol, ``method`` the furthest any row went: "newton" (from the starting
    point, or from 0 when none was given), then "+continuation" if the start failed and the
    eps-continuation ran, "+sinkhorn" if the Sinkhorn fallback ran; ``unconverged`` the number
    of rows that missed tol (0 exactly when ``converged``). The ``row_`` fields hold the same
    per row (tuples of length B)."""

    iterations: int
    marginal_error: float
    converged: bool
    method: str
    unconverged: int = 0
    row_iterations: tuple[int, ...] = field(default=(), repr=False)
    row_marginal_error: tuple[float, ...] = field(default=(), repr=False)
    row_method: tuple[str, ...] = field(default=(), repr=False)

    def __str__(self) -> str:
        rows = len(self.row_marginal_error)
        state = "converged" if self.converged else f"NOT converged ({self.unconverged} of {rows} rows)"
        return f"{self.method}: {state} after {self.iterations} iterations, marginal error {self.marginal_error:.2e}"


class ConvergenceError(RuntimeError):
    """A solve missed its tolerance (``on_failure="raise"``, the default). A RuntimeError, not a
    ValueError: the input was valid, the numerics fell short. ``info``: the SolverInfo."""

    def __init__(self, message: str, info: SolverInfo):
        super().__init__(message)
        self.info = info


def _neg_cost(Ct: torch.Tensor, eps: float, col_bias: torch.Tensor) -> torch.Tensor:
    """-C / eps with -inf on inactive anchors: (B, m, n). Computed once per eps, so that each
    evaluation of the logits (g_j - C_ij) / eps is a single broadcast add."""
    return col_bias - Ct / eps


# Logits this far under a row's largest are floored: exp would return under e^-80 = 1.8e-35
# relative to the largest term, far under float32 and float64 rounding of the sums, and torch's
# vectorised CPU exp leaves its fast path for results under float32's normal range (measured by
# scripts/bench_exp_underflow.py: 12x to 32x slower per element below -88, where logits at
# eps = 0.01 spend most of their range).
_LOG_FLOOR = -80.0


def _floor(col_bias: torch.Tensor) -> torch.Tensor:
    """(B, m, 1): the floor of each anchor's shifted logits; -inf keeps inactive anchors at 0."""
    return col_bias + _LOG_FLOOR


def _objective_and_plan(g, neg, mu, nu, eps, floor, value=True):
    """D(g) and Q at g: g (..., B, m) -> D (..., B), Q (..., B, m, n); a leading dimension
    evaluates several g at once (the solver's candidate steps). D is None if not ``value``."""
    logits = neg + (g / eps).unsqueeze(-1)  # (..., B, m, n)
    top = logits.amax(-2, keepdim=True)  # (..., B, 1, n); finite: the ground anchor is active
    Q = torch.maximum(logits.sub_(top), floor, out=logits).exp_()  # in place: the largest temporary
    total = Q.sum(-2, keepdim=True)  # (..., B, 1, n)
    if not value:
        return None, Q.div_(total)
    lse = (top + total.log()).squeeze(-2)  # (..., B, n)
    return (g * nu).sum(-1) - eps * (mu * lse).sum(-1), Q.div_(total)


def _plan_from(g, neg, mu, eps, floor):
    """(P, Q), both (B, m, n): the plan and its column-normalised form Q = P / mu.
    Out of place, so that autograd can go through it (the unrolled solver of the tests). The
    same operations as ``_objective_and_plan``, not torch.softmax: a row that the solver stops
    keeps its potentials while others iterate, and its plan, evaluated again by the other
    function, must come out the same to the last bit."""
    logits = neg + (g / eps).unsqueeze(-1)  # (B, m, n)
    shifted = logits - logits.detach().amax(1, keepdim=True)  # (B, m, n); softmax is shift-invariant
    Q = torch.maximum(shifted, floor).exp()  # (B, m, n)
    Q = Q / Q.sum(1, keepdim=True)
    return mu.unsqueeze(1) * Q, Q


def _col_bias(active: torch.Tensor, dtype) -> torch.Tensor:
    """0 on active anchors, -inf on inactive ones: (B, m, 1), to add to (B, m, n) logits."""
    return torch.full(active.shape, -math.inf, dtype=dtype, device=active.device).masked_fill_(active, 0.0).unsqueeze(-1)


def semidual_objective(g, C, mu, nu, eps):
    """D(g) per row, shape (B,), for potentials g (B, m), cost C (B, n, m), masses mu (B, n) and
    nu (B, m). Masked sources (mu = 0) and inactive anchors (nu = 0) drop out."""
    col_bias = _col_bias(nu > 0, C.dtype)  # (B, m, 1)
    return _objective_and_plan(g, _neg_cost(C.transpose(1, 2), eps, col_bias), mu, nu, eps, _floor(col_bias))[0]


def plan_from_potentials(g, C, mu, nu, eps):
    """The plan of anchor potentials g (B, m) for cost C (B, n, m) and masses mu (B, n), nu (B, m):
    P (B, n, m), with P 1 = mu, and its row-normalised form Q = P / mu (B, n, m). Differentiable
    in g and C (plain torch ops). As eps -> 0 each row of Q tends to the one-hot of the anchor
    that minimises C_ij - g_j."""
    col_bias = _col_bias(nu > 0, C.dtype)  # (B, m, 1)
    P, Q = _plan_from(g, _neg_cost(C.transpose(1, 2), eps, col_bias), mu, eps, _floor(col_bias))
    return P.transpose(1, 2), Q.transpose(1, 2)


def _ground(nu: torch.Tensor) -> torch.Tensor:
    """One-hot (B, m) of each row's heaviest anchor, where the gauge fixes the potential.

    Grounding the heaviest anchor keeps its gradient out of the solve: that gradient is
    nu_j - (P^T 1)_j with both near 1, so in float32 its rounding error is of the size of a
    light anchor's whole mass 1/n, and Newton would chase it.
    """
    return torch.nn.functional.one_hot(nu.argmax(-1), nu.shape[-1]).bool()


def _regauge(g: torch.Tensor, ground: torch.Tensor) -> torch.Tensor:
    return g - (g * ground).sum(-1, keepdim=True)


class _GroundedLaplacian:
    """Solves L z = rhs with z = 0 on the ground anchor and on inactive anchors.

    Built once per solve from active, ground (B, m); ``solve`` then takes P, Q (B, m, n) and
    rhs (B, m) and returns z (B, m). The masks are formed here, not at every Newton iteration:
    at beam-search sizes (m <= 11, n <= 200) each op costs microseconds of overhead.

    A ridge sqrt(machine eps) * (P^T 1)_j keeps the system solvable when a group of anchors is
    cut off from the ground (small eps, ties: their coupling underflows to 0). L is singular
    there, but rhs sums to 0 over each such group, and the group's common shift cancels in
    the plan and in the backward; the ridge only keeps that shift from blowing up to inf.
    """

    def __init__(self, active: torch.Tensor, ground: torch.Tensor, dtype: torch.dtype):
        m = active.shape[-1]
        self.eye = torch.eye(m, dtype=dtype, device=active.device)  # (m, m)
        self.off = 1 - self.eye  # (m, m)
        free = active & ~ground  # (B, m)
        self.free = free.to(dtype)  # (B, m)
        self.both = self.free.unsqueeze(-1) * self.free.unsqueeze(-2)  # (B, m, m)
        finfo = torch.finfo(dtype)
        self.ridge = math.sqrt(finfo.eps)
        # Fixed anchors get identity rows and columns and a zero right-hand side -> z_j = 0; free
        # ones a tiny diagonal, the ridge's floor where an anchor's mass underflowed to 0.
        self.fixed = ((1 - self.free) + finfo.tiny * self.free).unsqueeze(-1) * self.eye  # (B, m, m)

    def solve(self, P, Q, rhs, b=None, free=None):
        """b (B, m), optional: P^T 1 if the caller has it. free (B, m), optional: the free-anchor
        mask to apply to rhs instead of the built one (the solver's, 0 on rows it has stopped,
        whose z is then 0)."""
        if b is None:
            b = P.sum(-1)  # (B, m)
        # Off-diagonal weights W_jl = sum_i P_ji Q_li; the diagonal is their row sum. Forming it as
        # b_j - W_jj instead cancels catastrophically for a heavy anchor (both are close to 1).
        W = torch.bmm(P, Q.transpose(1, 2)).mul_(self.off)  # (B, m, m)
        diag = W.sum(-1).add_(b, alpha=self.ridge)  # (B, m)
        L = (torch.diag_embed(diag) - W).mul_(self.both).add_(self.fixed)  # (B, m, m)
        r = (rhs * (self.free if free is None else free)).unsqueeze(-1)  # (B, m, 1)
        z, _ = torch.linalg.solve_ex(L, r)  # (B, m, 1); solve_ex: no error check, no sync
        return z.squeeze(-1)


def _sinkhorn(Ct, mu, nu, eps, n_iter, g=None):
    """Log-domain Sinkhorn on Ct (B, m, n); see ``sinkhorn_potentials``."""
    active = nu > 0
    ground = _ground(nu)
    log_nu = torch.where(active, nu, torch.ones_like(nu)).log()
    log_mu = torch.log(mu).unsqueeze(1)  # (B, 1, n)
    if g is None:
        g = torch.zeros_like(nu)
    neg = _neg_cost(Ct, eps, _col_bias(active, Ct.dtype))
    for _ in range(n_iter):
        # f-update is implicit in the softmax; g_j <- g_j + eps * log(nu_j / (P^T 1)_j)
        log_q = torch.log_softmax(neg + (g / eps).unsqueeze(-1), dim=1)  # (B, m, n)
        log_b = torch.logsumexp(log_q + log_mu, dim=-1)  # (B, m)
        g = _regauge(g + eps * torch.where(active, log_nu - log_b, torch.zeros_like(log_b)), ground)
    return g


def sinkhorn_potentials(C, mu, nu, eps, n_iter, g=None):
    """Log-domain Sinkhorn for C (B, n, m): ``n_iter`` alternating updates; returns g (B, m),
    0 on the ground anchor.

    Plain torch ops, so autograd can unroll it (the tests and the benchmark do); the solver
    below calls it under ``no_grad`` as a fallback.
    """
    return _sinkhorn(C.transpose(1, 2), mu, nu, eps, n_iter, g)


# --------------------------------------------------------------------------- the solver


class _Problem:
    """The fixed tensors of a solve, for its rows: the whole batch, or the rows a fallback reruns.
    Ct (B, m, n), the cost transposed; mu (B, n); nu (B, m). What only guarded iterations use is
    formed on first use (at beam-search sizes each op costs about 5 us)."""

    def __init__(self, Ct: torch.Tensor, mu: torch.Tensor, nu: torch.Tensor):
        self.Ct, self.mu, self.nu = Ct, mu, nu
        self.mu_col = mu.unsqueeze(1)  # (B, 1, n)
        self.active = nu > 0  # (B, m)
        self.ground = _ground(nu)  # (B, m)
        self.col_bias = _col_bias(self.active, Ct.dtype)  # (B, m, 1)
        self.floor = _floor(self.col_bias)  # (B, m, 1)
        self.inv_nu = (1 / nu).nan_to_num_(posinf=0.0)  # (B, m), 0 on inactive anchors (nu = 0)
        self.lap = _GroundedLaplacian(self.active, self.ground, Ct.dtype)
        finfo = torch.finfo(Ct.dtype)
        # Values of D closer than this are rounding noise; then the full Newton step is preferred.
        self.noise, self.tiny = 64 * finfo.eps, finfo.tiny

    @functools.cached_property
    def log_nu(self) -> torch.Tensor:
        return torch.where(self.active, self.nu, torch.ones_like(self.nu)).log()  # (B, m), 0 on inactive anchors

    @functools.cached_property
    def active_f(self) -> torch.Tensor:
        return self.active.to(self.Ct.dtype)  # (B, m)

    @functools.cached_property
    def rows(self) -> torch.Tensor:
        return torch.arange(len(self), device=self.nu.device)  # (B,)

    @functools.cached_property
    def steps(self) -> torch.Tensor:
        return torch.tensor(_STEPS, dtype=self.Ct.dtype, device=self.Ct.device).view(-1, 1, 1)  # (S - 1, 1, 1)

    def __len__(self) -> int:
        return self.nu.shape[0]

    def subset(self, rows: list[int]) -> _Problem:
        if len(rows) == len(self):
            return self
        idx = _index(rows, self.nu.device)
        return _Problem(self.Ct.index_select(0, idx), self.mu.index_select(0, idx), self.nu.index_select(0, idx))

    def errors(self, grad: torch.Tensor) -> torch.Tensor:
        """(B,): max over active anchors of |b / nu - 1| for grad = nu - b, b = P^T 1 (B, m)."""
        return grad.abs().mul_(self.inv_nu).amax(-1)


class _Stall:
    """Per row, True once a small marginal error has stopped falling: about 6 iterations without
    halving, while under 1e4 machine epsilons (1e-3 in float32). That close, Newton converges
    quadratically, so this is rounding noise: a tolerance under the dtype's floor (float32 sums
    n terms) is not reached, however long one iterates."""

    def __init__(self, rows: int, check_every: int, dtype: torch.dtype):
        self.best, self.count = [math.inf] * rows, [0] * rows
        self.checks = max(3, -(-6 // check_every))
        self.below = 1e4 * torch.finfo(dtype).eps

    def __call__(self, row: int, err: float) -> bool:
        if err < 0.5 * self.best[row]:
            self.best[row], self.count[row] = err, 0
        elif err < self.below:
            self.count[row] += 1
        return self.count[row] >= self.checks


def _index(rows: list[int], device) -> torch.Tensor:
    """(r,) int64 on device, for 0 < r. (From a buffer: torch.tensor on a list of 20 to 64 ints
    costs 5 to 11 us, 1 us this way.)"""
    return torch.frombuffer(array.array("q", rows), dtype=torch.int64).to(device)


def _mask(flags, device) -> torch.Tensor:
    """(B,) bool on device from B > 0 flags (bools, or 0/1 bytes), copied from a buffer as in
    ``_index``."""
    return torch.frombuffer(bytearray(flags), dtype=torch.bool).to(device)


class _RowControl:
    """The per-row decisions of one Newton stage, taken on the host from one read per check.

    Lists, not tensors: the decisions need the errors on the host anyway (to stop), and a pass
    over 64 rows costs about 10 us there, as much as four small torch ops.
    """

    def __init__(self, rows: int, target: float, budget: int, trust_below: float, check_every: int, dtype):
        self.open = list(range(rows))  # rows still iterating
        self.stopped = bytearray(rows)  # 0/1 per row, ready for a mask
        self.guarded = [True] * rows
        self.changed, self.masks = True, (True, None, None)
        self.last_err = [math.inf] * rows  # the error at the row's last accepted check
        self.stall = _Stall(rows, check_every, dtype)
        self.err, self.stalled, self.iters = [math.inf] * rows, [False] * rows, [0] * rows
        self.target, self.budget, self.trust_below = target, budget, trust_below

    def check(self, n: int, errs: list[float], fulls: list[float] | None):
        """At the check after n iterations of the stage, with each row's marginal error ``errs``
        and, if the last iteration was guarded, the candidate it took ``fulls`` (0: the full
        step). Returns the rows whose unguarded step is undone (their error more than doubled;
        they go back to their last check, guarded) and the rows that stop."""
        guarded, last, best, count = self.guarded, self.last_err, self.stall.best, self.stall.count
        below, checks, target, at_budget = self.stall.below, self.stall.checks, self.target, n >= self.budget
        trust = self.trust_below if n == 0 else -math.inf  # (n == 0: the row's first check)
        undo, stop, still, changed = [], [], [], False
        add_stop, add_still = stop.append, still.append
        for r in self.open:  # the hot loop: _Stall's rule is inlined
            e = errs[r]
            if not guarded[r] and not e <= 2 * last[r]:
                guarded[r] = changed = True
                undo.append(r)
                add_still(r)
                continue
            if e < 0.5 * best[r]:
                best[r], count[r] = e, 0
            elif e < below:
                count[r] += 1
            if e <= target or at_budget or count[r] >= checks:
                add_stop(r)
                continue
            # Full steps from here on: the last guarded step was the full one, or a start this close.
            if guarded[r] and ((fulls[r] == 0) if fulls is not None else e <= trust):
                guarded[r], changed = False, True
            last[r] = e
            add_still(r)
        for r in stop:
            self.err[r], self.stalled[r], self.iters[r] = errs[r], count[r] >= checks, n
            self.stopped[r] = 1
        self.open, self.changed = still, self.changed or changed or bool(stop)
        return undo, stop

    def step_masks(self, lap: _GroundedLaplacian):
        """How the next steps treat each row: (guarded, full_rows, free). guarded False: no open
        row is guarded, only the full step is evaluated. full_rows (B,) bool or None (all
        guarded): the rows that take the full step in a guarded iteration, the unguarded and
        the stopped ones. free (B, m) or None: the Newton system's right-hand-side mask, 0 on
        the stopped rows, whose step is then 0, so that their g, and with it their P and Q, stay
        as they were when they stopped."""
        if self.changed:  # rebuilt only after a check changed a row's treatment
            stopped, guarded, rows = self.stopped, self.guarded, len(self.stopped)
            n_guarded = sum(map(guarded.__getitem__, self.open))
            free = None
            if len(self.open) < rows:
                free = lap.free.masked_fill(_mask(stopped, lap.free.device).view(rows, 1), 0.0)
            full_rows = None
            if 0 < n_guarded < rows:
                full_rows = _mask([s or not g for s, g in zip(stopped, guarded)], lap.free.device)
            self.masks, self.changed = (n_guarded > 0, full_rows, free), False
        return self.masks


def _read_errors(prob: _Problem, grad: torch.Tensor, taken: torch.Tensor | None):
    """The check's host read: each row's marginal error and, after a guarded step, the candidate
    it took (as lists). One read off an accelerator; on CPU two reads cost less than packing."""
    err = prob.errors(grad)  # (B,)
    if taken is None:
        return err.tolist(), None
    if err.device.type == "cpu":
        return err.tolist(), taken.tolist()
    both = torch.cat((err, taken.to(err.dtype))).tolist()
    return both[: len(prob)], both[len(prob) :]


def _restore(rows: list[int], last: tuple, now: tuple) -> tuple:
    """``now`` with the given rows put back to ``last``: tuples of (B, ...) tensors."""
    mask = torch.zeros(now[0].shape[0], dtype=torch.bool, device=now[0].device)  # (B,)
    mask[rows] = True
    return tuple(torch.where(mask.view(-1, *[1] * (new.dim() - 1)), old, new) for old, new in zip(last, now))


def _newton_step(prob: _Problem, g, e, neg, P, Q, b, grad, guarded=True, full_rows=None, free=None):
    """One Newton step from g (B, m), whose plan is P, Q (B, m, n) with b = P^T 1 and the
    semi-dual's gradient grad = nu - b (B, m), 0 on inactive anchors (nu = 0, Q = 0).

    Unguarded (near the optimum, where the guard keeps the full step anyway) only the full step
    is evaluated. ``guarded``: a row evaluates D at the full and a quarter Newton step and at one
    Sinkhorn step and keeps the best; the Sinkhorn step always ascends, so the solver never does
    worse than Sinkhorn. full_rows (B,) bool, optional: rows that take the full step all the same
    (unguarded rows in a guarded iteration). free (B, m), optional: the Newton system's
    right-hand-side mask (see _RowControl.step_masks), 0 on rows whose step is to be 0.
    Returns the new g (B, m), Q (B, m, n) and, guarded, the candidate each row took (B,), 0 for
    the full step.
    """
    # Newton: (L / e) delta = grad  ->  delta = e * L^{-1} grad
    delta = e * prob.lap.solve(P, Q, grad, b, free)  # (B, m); exactly 0 where free is
    if not guarded:
        g = g + delta
        return g, _objective_and_plan(g, neg, prob.mu, prob.nu, e, prob.floor, value=False)[1], None
    # The Sinkhorn step e * log(nu / b), 0 on inactive anchors (b = 0 there: log(tiny), masked).
    sink = (prob.log_nu - b.clamp_min(prob.tiny).log()).mul_(prob.active_f).mul_(e)  # (B, m)
    # (broadcast and concatenated, not stacked from a list: at beam-search sizes each op is ~5 us)
    candidates = torch.cat([g + prob.steps * delta, _regauge(g + sink, prob.ground).unsqueeze(0)])  # (S, B, m)
    values, Qs = _objective_and_plan(candidates, neg, prob.mu, prob.nu, e, prob.floor)  # (S, B), (S, B, m, n)
    values = values.nan_to_num_(nan=-math.inf, posinf=-math.inf)
    full = values[0]  # (B,), a view
    # (0 where full is -inf: -inf + noise * inf would be NaN, which argmax takes as the maximum)
    full.add_(full.abs().add_(1).mul_(prob.noise).nan_to_num_(nan=0.0, posinf=0.0))
    taken = values.argmax(0)  # (B,)
    if full_rows is not None:
        taken = taken.masked_fill_(full_rows, 0)
    pick = taken * len(prob) + prob.rows  # (B,): row b of candidate taken[b], in the flattened (S B)
    S, B, m = candidates.shape
    return candidates.view(S * B, m).index_select(0, pick), Qs.view(S * B, *Qs.shape[2:]).index_select(0, pick), taken


def _newton_stage(prob: _Problem, e, target, g, budget, check_every, trust_below):
    """Newton at one eps from g (B, m); each row iterates until its marginal error is at most
    ``target``, it stalls, or the stage has run ``budget`` iterations, and then keeps its values.

    A row's steps are guarded until one where it took the full step, then unguarded (one plan
    evaluated per iteration instead of three); an unguarded step that more than doubles its
    marginal error is undone and the guard comes back. A row whose starting error is at most
    ``trust_below`` goes unguarded from the first step. Returns g (B, m), P, Q (B, m, n) at e,
    and the _RowControl with each row's error, stall and iterations.

    A stopped row rides along with a zero step: its g stays as it was, and its P and Q, formed
    again from g by the same operations, too. Cheaper than copying stopped rows out and back
    (two index ops per tensor and stop, at about 3 us each at beam-search sizes).
    """
    neg = _neg_cost(prob.Ct, e, prob.col_bias)  # (B, m, n)
    P, Q = _plan_from(g, neg, prob.mu, e, prob.floor)  # (B, m, n)
    ctl = _RowControl(len(prob), target, budget, trust_below, check_every, prob.Ct.dtype)
    last, taken, masks, n = None, None, (True, None, None), 0
    while True:
        b = P.sum(-1)  # (B, m)
        grad = prob.nu - b  # (B, m)
        if n % check_every == 0:
            undo, _ = ctl.check(n, *_read_errors(prob, grad, taken))
            if undo:
                g, P, Q, b, grad = _restore(undo, last, (g, P, Q, b, grad))
            if not ctl.open:
                break
            last, masks = (g, P, Q, b, grad), ctl.step_masks(prob.lap)
        g, Q, taken = _newton_step(prob, g, e, neg, P, Q, b, grad, *masks)
        P = prob.mu_col * Q
        n += 1
    return (g, P, Q), ctl


def _continuation_stages(eps: float, tol: float) -> list[tuple[float, float]]:
    """(eps, target) stages: loosely at eps0 = 1, 0.1, ... before the target eps. Entering a
    sharper problem from far away, the Hessian is exponentially small and Newton stalls; from
    the previous stage's optimum it is O(10 eps) away, which Newton covers in a few steps."""
    stages, e = [], 1.0
    while e > eps * 1.0001:
        stages.append((e, max(tol, 1e-2)))
        e *= 0.1
    return stages + [(eps, tol)]


def _newton(prob: _Problem, stages, g, budget: int, check_every: int, trust_below: float = -math.inf):
    """Newton over the stages from g (B, m); each stage starts every row. Returns g (B, m), P, Q
    (B, m, n) at the last stage's eps and, per row, the last stage's error and stall and the
    iterations of all stages."""
    iters = [0] * len(prob)
    for e, target in stages:
        (g, P, Q), ctl = _newton_stage(prob, e, target, g, budget, check_every, trust_below)
        iters = [a + b for a, b in zip(iters, ctl.iters)]
    return g, P, Q, ctl.err, ctl.stalled, iters


def _sinkhorn_fallback(prob: _Problem, eps, tol, g, max_iter, check_every):
    """Log-domain Sinkhorn from g (B, m) at eps, each row until its marginal error is at most tol
    or stalls, at most ``max_iter`` iterations, checked every _SINKHORN_CHUNK. Returns as
    ``_newton``."""
    neg = _neg_cost(prob.Ct, eps, prob.col_bias)  # (B, m, n)
    stall, frozen, stopped = _Stall(len(prob), check_every, prob.Ct.dtype), None, bytearray(len(prob))
    err, stalled, iters = [math.inf] * len(prob), [False] * len(prob), [0] * len(prob)
    open_rows, done = list(range(len(prob))), 0
    while open_rows and done < max_iter:
        chunk = min(_SINKHORN_CHUNK, max_iter - done)
        g_new = _sinkhorn(prob.Ct, prob.mu, prob.nu, eps, chunk, g)  # (B, m)
        g = g_new if frozen is None else torch.where(frozen, g, g_new)  # stopped rows keep their g
        done += chunk
        P, Q = _plan_from(g, neg, prob.mu, eps, prob.floor)  # (B, m, n)
        errs, still, stop = prob.errors(prob.nu - P.sum(-1)).tolist(), [], []
        for r in open_rows:
            err[r], stalled[r], iters[r] = errs[r], stall(r, errs[r]), done
            (stop if errs[r] <= tol or stalled[r] else still).append(r)
        for r in stop:
            stopped[r] = 1
        if stop and still:
            frozen = _mask(stopped, g.device).unsqueeze(-1)  # (B, 1)
        open_rows = still
    return g, P, Q, err, stalled, iters


class _RowLog:
    """Per row of the whole batch: error, stall, iterations and method, over the solver's phases."""

    def __init__(self, rows: int):
        self.err, self.stalled = [math.inf] * rows, [False] * rows
        self.iters, self.method, self.furthest = [0] * rows, ["newton"] * rows, "newton"

    def add(self, rows: list[int], err, stalled, iters, method: str | None = None) -> None:
        if len(rows) == len(self.err) and method is None:  # the first phase, on every row
            self.err, self.stalled, self.iters = list(err), list(stalled), [a + b for a, b in zip(self.iters, iters)]
            return
        for i, r in enumerate(rows):
            self.err[r], self.stalled[r] = err[i], stalled[i]
            self.iters[r] += iters[i]
            if method:
                self.method[r] += method
                self.furthest = self.method[r]

    def failed(self, tol: float) -> list[int]:
        # The fallbacks help where Newton failed, not where it reached the dtype's rounding floor.
        return [r for r, (e, s) in enumerate(zip(self.err, self.stalled)) if not e <= tol and not s]

    def info(self, tol: float) -> SolverInfo:
        total = sum(self.err)  # NaN if any error is (max() would not always say so)
        err = total if total != total else max(self.err, default=0.0)
        missed = sum(not e <= tol for e in self.err)  # (a NaN error misses too)
        return SolverInfo(
            max(self.iters, default=0),
            float(err),
            bool(err <= tol),
            self.furthest,
            unconverged=missed,
            row_iterations=tuple(self.iters),
            row_marginal_error=tuple(self.err),
            row_method=tuple(self.method),
        )


def _put_rows(full, rows: list[int], part):
    """``full`` (B, ...) with the given rows replaced by ``part`` (len(rows), ...); None: all."""
    if full is None or len(rows) == full.shape[0]:
        return part
    return full.index_copy(0, _index(rows, part.device), part)


def _solve(prob: _Problem, eps, tol, max_iter, max_sinkhorn_iter, check_every, g0=None):
    """Newton's method on the semi-dual, with eps-continuation and Sinkhorn as fallbacks.

    g0: (B, m) or None, a starting point near the optimum (see ``soft_beam.topk``: the potentials
    of the hard monotone plan). From g0 Newton runs at the target eps directly; the rows where
    that fails within _WARM_BUDGET iterations (all rows, without g0) run the eps-continuation
    from g = 0, and the rows where that fails, Sinkhorn from where it ended. Returns g (B, m),
    its plan P and Q (B, m, n) at eps, and the SolverInfo.
    """
    log, g = _RowLog(len(prob)), None
    failed = list(range(len(prob)))
    if g0 is not None:
        start = _regauge(g0.to(prob.nu.dtype), prob.ground)
        g, P, Q, *rows = _newton(prob, [(eps, tol)], start, min(max_iter, _WARM_BUDGET), check_every, _TRUST_BELOW)
        log.add(failed, *rows)
        failed = log.failed(tol)
    if failed or g is None:
        sub = prob.subset(failed)
        g_sub, P_sub, Q_sub, *rows = _newton(sub, _continuation_stages(eps, tol), torch.zeros_like(sub.nu), max_iter, check_every)
        log.add(failed, *rows, method=None if g0 is None else "+continuation")
        g, Q = _put_rows(g, failed, g_sub), _put_rows(None if g0 is None else Q, failed, Q_sub)
        P = P_sub if len(failed) == len(prob) else prob.mu_col * Q
        failed = log.failed(tol)
    if failed and max_sinkhorn_iter > 0:
        sub = prob.subset(failed)
        start = g if len(failed) == len(prob) else g.index_select(0, _index(failed, g.device))
        g_sub, P_sub, Q_sub, *rows = _sinkhorn_fallback(sub, eps, tol, start, max_sinkhorn_iter, check_every)
        log.add(failed, *rows, method="+sinkhorn")
        g, Q = _put_rows(g, failed, g_sub), _put_rows(Q, failed, Q_sub)
        P = P_sub if len(failed) == len(prob) else prob.mu_col * Q
    return g, P, Q, log.info(tol)


@dataclass(frozen=True, eq=False)
class TransportSolution:
    """The result of ``solve_transport``, anchor-major like the solver.

    g (B, m): the anchor potentials, 0 on each row's heaviest anchor; P (B, m, n): the plan
    transposed (``plan`` is the (B, n, m) view); Q (B, m, n): P / mu, each source's split over
    the anchors; eps; info; and the grounded Laplacian's masks, which the implicit backward
    solves with.
    """

    g: torch.Tensor
    P: torch.Tensor
    Q: torch.Tensor
    eps: float
    info: SolverInfo
    laplacian: _GroundedLaplacian = field(repr=False)

    @property
    def plan(self) -> torch.Tensor:
        """The plan P (B, n, m), a transposed view."""
        return self.P.transpose(1, 2)


def default_tolerance(dtype: torch.dtype) -> float:
    """Relative marginal error reachable in ``dtype`` (float32 rounds logits of size 1/eps)."""
    return 1e-9 if dtype == torch.float64 else 1e-4


def _default_check_every(device: torch.device) -> int:
    # A convergence check reads the errors on the host. On CPU that is cheap, and checking every
    # iteration saves the iteration after convergence (with 2-6 iterations in all, up to 20% of
    # the time); on an accelerator it is a sync, so there every other iteration.
    return 1 if device.type == "cpu" else 2


@torch.no_grad()
def solve_transport(C, mu, nu, eps, *, tol=None, max_iter=100, max_sinkhorn_iter=1000, check_every=None, g0=None):
    """Solves for the entropic plan of cost C (B, n, m) and masses mu (B, n), nu (B, m), without
    autograd; returns a ``TransportSolution``.

    Newton's method on the semi-dual from g0 (B, m), a starting point for the anchor potentials
    that changes the cost of the solve, not its result; the rows it leaves unsolved run the
    eps-continuation (``max_iter`` Newton iterations per eps), then up to ``max_sinkhorn_iter``
    Sinkhorn iterations. ``tol``: the relative marginal error to reach (default per dtype, see
    ``default_tolerance``); ``check_every``: iterations between convergence checks (default 1 on
    CPU, 2 elsewhere). Each row is solved as if alone. As eps -> 0, P tends to the unregularised
    optimal plan.
    """
    tol = default_tolerance(C.dtype) if tol is None else tol
    check_every = _default_check_every(C.device) if check_every is None else check_every
    prob = _Problem(C.detach().transpose(1, 2).contiguous(), mu, nu)  # Ct (B, m, n): no copy if C is anchor-major
    g0 = None if g0 is None else g0.detach()
    g, P, Q, info = _solve(prob, float(eps), float(tol), int(max_iter), int(max_sinkhorn_iter), int(check_every), g0)
    return TransportSolution(g, P, Q, float(eps), info, prob.lap)


class _ImplicitGradient(torch.autograd.Function):
    """(Ct (B, m, n), solution) -> the solution's plan Pt (B, m, n), anchor-major; backward by
    implicit differentiation of the optimality conditions. Saves only P and Q: memory O(n m) per
    row whatever the iteration count."""

    @staticmethod
    def forward(ctx, Ct, solution):
        ctx.save_for_backward(solution.P, solution.Q)
        ctx.lap = solution.laplacian  # the masks of the grounded Laplacian, (B, m, m) at most
        ctx.eps = solution.eps
        return solution.P

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, G):
        # Linearising P_ij = exp((f_i + g_j - C_ij)/eps) under both marginal constraints and
        # eliminating df gives L dg = r(dC); the adjoint of that system yields, with W = G * P,
        #   grad_C_il = P_il / eps * (sum_j G_ij Q_ij - G_il + z_l - (Q z)_i),
        #   L z = v - Q^T w,  w_i = sum_j W_ij,  v_j = sum_i W_ij,  z = 0 on the ground anchor
        # (v - Q^T w sums to 0, so any gauge gives the same grad_C). Indices as in C (n, m);
        # the tensors below are anchor-major, G (B, m, n) like P.
        P, Q = ctx.saved_tensors  # (B, m, n)
        W = G * P  # (B, m, n)
        w = W.sum(1)  # (B, n)
        v = W.sum(-1)  # (B, m)
        u = v - torch.bmm(Q, w.unsqueeze(-1)).squeeze(-1)  # (B, m) = v - Q w
        z = ctx.lap.solve(P, Q, u)  # (B, m)
        col = (G * Q).sum(1) - torch.bmm(z.unsqueeze(1), Q).squeeze(1)  # (B, n) = (G * Q)^T 1 - Q^T z
        grad_Ct = (col.unsqueeze(1) - G).add_(z.unsqueeze(-1)).mul_(P).mul_(1 / ctx.eps)  # (B, m, n)
        return grad_Ct, None


def entropic_transport(C, mu, nu, eps, *, tol=None, max_iter=100, max_sinkhorn_iter=1000, check_every=None, on_failure="raise", g0=None):
    """Optimal entropic plan P (B, n, m) for cost C (B, n, m), masses mu (B, n), nu (B, m).

    ``solve_transport`` (same arguments) under no_grad, with the implicit backward attached:
    differentiable in C. Returns (P, SolverInfo). Inputs are assumed validated (see
    ``soft_beam.topk``). ``on_failure``, when a row misses tol: "raise" (default) a
    ConvergenceError, "warn" (RuntimeWarning) or "ignore"; the latter two return the plan as the
    solver left it. As eps -> 0, P tends to the unregularised optimal plan.
    """
    tol = default_tolerance(C.dtype) if tol is None else tol
    solution = solve_transport(
        C, mu, nu, eps, tol=tol, max_iter=max_iter, max_sinkhorn_iter=max_sinkhorn_iter, check_every=check_every, g0=g0
    )
    info = solution.info
    if not info.converged and on_failure != "ignore":
        message = _failure_message(info, tol, eps, C.dtype)
        if on_failure == "raise":
            raise ConvergenceError(message, info)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
    Pt = solution.P  # (B, m, n)
    if C.requires_grad and torch.is_grad_enabled():  # (apply costs ~10 us even when nothing needs it)
        Pt = _ImplicitGradient.apply(C.transpose(1, 2), solution)
    return Pt.transpose(1, 2), info  # (B, n, m), a view


def _failure_message(info: SolverInfo, tol: float, eps: float, dtype: torch.dtype, shown: int = 5) -> str:
    """Which rows missed tol, by how much, and what to change."""
    missed = [(r, e) for r, e in enumerate(info.row_marginal_error) if not e <= tol]
    rows = ", ".join(f"{r}: {e:.2e}" for r, e in missed[:shown]) + (", ..." if len(missed) > shown else "")
    return (
        f"soft top-k: entropic OT solve did not reach tol={tol:g} (eps={eps:g}, {str(dtype).removeprefix('torch.')}) in "
        f"{info.unconverged} of {len(info.row_marginal_error)} rows (of the scores flattened to (B, n)); marginal error by "
        f"row: {rows}; {info.method}, {info.iterations} iterations. To converge: raise tol, max_iter or "
        'max_sinkhorn_iter, or epsilon, or solve in float64; on_failure="warn" or "ignore" returns the plan as the '
        "solver left it."
    )
