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

Layout: the entry points take and return (B, n, m), but the solver works on the transposes,
(B, m, n), so that the softmax and log-sum-exp over the few anchors vectorise along the n sources.
Over a last dimension of size 5 torch's CPU softmax is 7x to 24x slower (measured: 143 vs 6 us
at 64 x 32 x 5, 222 vs 32 ms at 64 x 40000 x 5).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

__all__ = ["SolverInfo", "entropic_transport", "sinkhorn_potentials", "semidual_objective"]


@dataclass(frozen=True)
class SolverInfo:
    """What a solve reached. ``marginal_error`` is max over rows and anchors of |P^T 1 / nu - 1|.
    ``method``: "newton" (from the starting point, or from 0 when none was given), then
    "+continuation" if the start failed and the eps-continuation ran, "+sinkhorn" if the
    Sinkhorn fallback ran."""

    iterations: int
    marginal_error: float
    converged: bool
    method: str

    def __str__(self) -> str:
        state = "converged" if self.converged else "NOT converged"
        return f"{self.method}: {state} after {self.iterations} iterations, marginal error {self.marginal_error:.2e}"


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
    Out of place, so that autograd can go through it (the unrolled solver of the tests)."""
    logits = neg + (g / eps).unsqueeze(-1)  # (B, m, n)
    shifted = logits - logits.detach().amax(1, keepdim=True)  # (B, m, n); softmax is shift-invariant
    Q = torch.softmax(torch.maximum(shifted, floor), dim=1)  # (B, m, n)
    return mu.unsqueeze(1) * Q, Q


def semidual_objective(g, C, mu, nu, eps, col_bias):
    """D(g) per row, shape (B,), for C (B, n, m). Masked sources have mu = 0 and drop out."""
    return _objective_and_plan(g, _neg_cost(C.transpose(1, 2), eps, col_bias), mu, nu, eps, _floor(col_bias))[0]


def _plan(g, C, mu, eps, col_bias):
    """For C (B, n, m): the plan P (B, n, m) and its row-normalised form Q = P / mu."""
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

    def solve(self, P, Q, rhs, b=None):
        """b (B, m), optional: P^T 1 if the caller has it."""
        if b is None:
            b = P.sum(-1)  # (B, m)
        # Off-diagonal weights W_jl = sum_i P_ji Q_li; the diagonal is their row sum. Forming it as
        # b_j - W_jj instead cancels catastrophically for a heavy anchor (both are close to 1).
        W = torch.bmm(P, Q.transpose(1, 2)).mul_(self.off)  # (B, m, m)
        diag = W.sum(-1).add_(b, alpha=self.ridge)  # (B, m)
        L = (torch.diag_embed(diag) - W).mul_(self.both).add_(self.fixed)  # (B, m, m)
        r = (rhs * self.free).unsqueeze(-1)  # (B, m, 1)
        z, _ = torch.linalg.solve_ex(L, r)  # (B, m, 1); solve_ex: no error check, no sync
        return z.squeeze(-1)


def _col_bias(active: torch.Tensor, dtype) -> torch.Tensor:
    """0 on active anchors, -inf on inactive ones: (B, m, 1), to add to (B, m, n) logits."""
    zero = torch.zeros((), dtype=dtype, device=active.device)
    return torch.where(active, zero, torch.full_like(zero, -math.inf)).unsqueeze(-1)


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


class _Stall:
    """True once a small marginal error has stopped falling: about 6 iterations without halving,
    while under 1e4 machine epsilons (1e-3 in float32). That close, Newton converges
    quadratically, so this is rounding noise: a tolerance under the dtype's floor (float32 sums
    n terms) is not reached, however long one iterates."""

    def __init__(self, check_every: int, dtype: torch.dtype):
        self.best, self.count = math.inf, 0
        self.checks = max(3, -(-6 // check_every))
        self.below = 1e4 * torch.finfo(dtype).eps

    def __call__(self, err: float) -> bool:
        if err < 0.5 * self.best:
            self.best, self.count = err, 0
        elif err < self.below:
            self.count += 1
        return self.count >= self.checks


@torch.no_grad()
def _solve(Ct, mu, nu, eps, tol, max_iter, check_every, g0=None):
    """Newton's method on the semi-dual with eps-continuation and a safeguarded step.

    Ct: (B, m, n), the cost transposed. g0: (B, m) or None, a starting point near the optimum
    (see ``soft_beam.topk``: the potentials of the hard monotone plan). From g0 Newton runs at the
    target eps directly; if that fails within ``warm_budget`` iterations, or without g0, it runs
    the eps-continuation from g = 0. A guarded iteration evaluates D at the full and a quarter
    Newton step and at one Sinkhorn step and keeps the best. The Sinkhorn step always ascends, so
    the solver never does worse than Sinkhorn; the full Newton step converges quadratically once
    near the optimum. Once every row has taken the full step, the iterations go unguarded (one
    evaluation instead of three) while the marginal error does not jump.
    Returns g (B, m), its plan P and Q (B, m, n) at eps, SolverInfo, and the grounded Laplacian's
    masks for the backward.
    """
    active = nu > 0
    ground = _ground(nu)
    col_bias = _col_bias(active, Ct.dtype)
    floor = _floor(col_bias)
    log_nu = torch.where(active, nu, torch.ones_like(nu)).log()
    # Values of D closer than this are rounding noise; then the full Newton step is preferred.
    noise = 64 * torch.finfo(Ct.dtype).eps
    # Continuation: solve loosely at eps0 = 1, 0.1, ... before the target eps. Entering a
    # sharper problem from far away, the Hessian is exponentially small and Newton stalls; from
    # the previous stage's optimum it is O(10 eps) away, which Newton covers in a few steps.
    stages = []
    e = 1.0
    while e > eps * 1.0001:
        stages.append((e, max(tol, 1e-2)))
        e *= 0.1
    stages.append((eps, tol))
    steps = (1.0, 0.25)
    warm_budget = 20  # measured: 3-6 iterations from a good g0 (batch 64, eps 0.1 to 0.001)
    # From g0 the first step goes unguarded if the starting marginal error is at most 10. Measured
    # (batch 64): 0.15 to 10 at eps 0.01 and 0.001, where full steps converge in 2 to 5; 47 to
    # 5e3 at eps 0.1 with n >= 200, where the guard's Sinkhorn steps saved 2 to 8 iterations.

    lap = _GroundedLaplacian(active, ground, Ct.dtype)
    rows = torch.arange(nu.shape[0], device=nu.device)  # (B,)
    inv_nu = torch.where(active, 1 / nu, torch.zeros_like(nu))  # (B, m)

    def marginal_error(grad):
        """max over rows and active anchors of |b / nu - 1| for grad = nu - b, b = P^T 1 (B, m)."""
        return grad.abs().mul_(inv_nu).max().item() if grad.numel() else 0.0

    def newton_iteration(g, e, neg, P, Q, b, grad, guarded):
        """One step from g, whose plan is P, Q (B, m, n) with b = P^T 1 (B, m) and the semi-dual's
        gradient grad = nu - b (B, m), 0 on inactive anchors (nu = 0, Q = 0). Returns the new g
        and Q and, guarded, a bool tensor: did every row take the full Newton step. Unguarded
        (near the optimum, where the guard keeps the full step anyway) only the full step is
        evaluated."""
        # Newton: (L / e) delta = grad  ->  delta = e * L^{-1} grad
        delta = e * lap.solve(P, Q, grad, b)  # (B, m)
        if not guarded:
            g = g + delta
            return g, _objective_and_plan(g, neg, mu, nu, e, floor, value=False)[1], None
        log_b = torch.where(active, b, torch.ones_like(b)).clamp_min(torch.finfo(b.dtype).tiny).log()
        sink = torch.where(active, e * (log_nu - log_b), torch.zeros_like(b))
        candidates = torch.stack([g + a * delta for a in steps] + [_regauge(g + sink, ground)])  # (S, B, m)
        values, Qs = _objective_and_plan(candidates, neg, mu, nu, e, floor)  # (S, B), (S, B, m, n): the next plan
        values = torch.nan_to_num(values, nan=-math.inf, posinf=-math.inf)
        full = values[0]
        # (only where finite: -inf + noise * inf would be NaN, which argmax takes as the maximum)
        values[0] = torch.where(torch.isfinite(full), full + noise * (1 + full.abs()), full)
        best = values.argmax(0)  # (B,)
        return candidates[best, rows], Qs[best, rows], (best == 0).all()  # (B, m), (B, m, n)

    def run(stages, g, budget, trust_below=-math.inf):
        """Newton over the stages from g; returns g, its plan P and Q (B, m, n) at the last
        stage's eps, iterations, final marginal error, and whether the last stage stalled.

        Guarded steps until one where every row took the full step; from then on unguarded,
        which evaluates one plan per iteration instead of three. An unguarded step that more
        than doubles the marginal error is undone, and the guard comes back. A start whose marginal
        error is at most ``trust_below`` goes unguarded from the first step.
        """
        iters, err, stalled = 0, math.inf, False
        for e, target in stages:
            neg = _neg_cost(Ct, e, col_bias)
            P, Q = _plan_from(g, neg, mu, e, floor)  # (B, m, n)
            n_stage, stall = 0, _Stall(check_every, Ct.dtype)
            guarded, all_full, last = True, None, None
            while True:
                b = P.sum(-1)  # (B, m)
                grad = nu - b  # (B, m)
                if n_stage % check_every == 0:
                    err = marginal_error(grad)
                    if last is not None and not guarded and not err <= 2 * last[-1]:
                        g, P, Q, b, grad, err = last
                        guarded = True
                    else:
                        stalled = stall(err)
                        if err <= target or n_stage >= budget or stalled:
                            break
                        # (read only at a check: on an accelerator each read is a sync)
                        full_steps = bool(all_full) if all_full is not None else last is None and err <= trust_below
                        guarded = guarded and not full_steps
                        last = (g, P, Q, b, grad, err)
                g, Q, all_full = newton_iteration(g, e, neg, P, Q, b, grad, guarded)
                P = mu.unsqueeze(1) * Q
                iters += 1
                n_stage += 1
        return g, P, Q, iters, err, stalled

    iters, err, method, stalled = 0, math.inf, "newton", False
    if g0 is not None:
        warm = _regauge(g0.to(nu.dtype), ground)
        g, P, Q, iters, err, stalled = run([(eps, tol)], warm, min(max_iter, warm_budget), trust_below=10.0)
    # The fallbacks help where Newton failed, not where it reached the dtype's rounding floor.
    if not err <= tol and not stalled:
        g, P, Q, more, err, stalled = run(stages, torch.zeros_like(nu), max_iter)
        iters += more
        method = "newton+continuation" if g0 is not None else "newton"
    if not err <= tol and not stalled:
        # Fallback: Sinkhorn from Newton's point, in chunks between convergence checks.
        method += "+sinkhorn"
        neg = _neg_cost(Ct, eps, col_bias)
        stall = _Stall(check_every, Ct.dtype)
        for _ in range(max_iter):
            g = _sinkhorn(Ct, mu, nu, eps, 10, g)
            iters += 10
            P, Q = _plan_from(g, neg, mu, eps, floor)
            err = marginal_error(nu - P.sum(-1))
            if err <= tol or stall(err):
                break
    return g, P, Q, SolverInfo(iters, float(err), bool(err <= tol), method), lap


class _EntropicTransport(torch.autograd.Function):
    """Ct (B, m, n) -> Pt (B, m, n), the cost and the plan anchor-major; backward by implicit
    differentiation of the optimality conditions. Saves only P and Q: memory O(n m) per row
    whatever the iteration count."""

    @staticmethod
    def forward(ctx, Ct, mu, nu, eps, tol, max_iter, check_every, g0, info_out):
        Ct = Ct.detach().contiguous()  # (B, m, n); no copy when the caller built it anchor-major
        _, P, Q, info, lap = _solve(Ct, mu, nu, eps, tol, max_iter, check_every, g0)  # P, Q: (B, m, n)
        info_out.append(info)
        ctx.save_for_backward(P, Q)
        ctx.lap = lap  # the masks of the grounded Laplacian, (B, m, m) at most
        ctx.eps = eps
        return P

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
        return grad_Ct, None, None, None, None, None, None, None, None


def default_tolerance(dtype: torch.dtype) -> float:
    """Relative marginal error reachable in ``dtype`` (float32 rounds logits of size 1/eps)."""
    return 1e-9 if dtype == torch.float64 else 1e-4


def entropic_transport(C, mu, nu, eps, *, tol=None, max_iter=100, check_every=None, on_failure="warn", g0=None):
    """Optimal entropic plan P (B, n, m) for cost C (B, n, m), masses mu (B, n), nu (B, m).

    Differentiable in C (implicit backward). Returns (P, SolverInfo). Inputs are assumed
    validated (see ``soft_beam.topk``); this is the internal workhorse. g0 (B, m), optional: a
    starting point for the anchor potentials; it changes the cost of the solve, not its result.
    As eps -> 0, P tends to the unregularised optimal plan.
    """
    if tol is None:
        tol = default_tolerance(C.dtype)
    if check_every is None:
        # A convergence check reads the error on the host. On CPU that is cheap, and checking
        # every iteration saves the iteration after convergence (with 2-6 iterations in all, up
        # to 20% of the time); on an accelerator it is a sync, so there every other iteration.
        check_every = 1 if C.device.type == "cpu" else 2
    info_out: list[SolverInfo] = []
    g0 = None if g0 is None else g0.detach()
    Ct = C.transpose(1, 2)  # (B, m, n): a view; contiguous if C was built anchor-major
    Pt = _EntropicTransport.apply(Ct, mu, nu, float(eps), float(tol), int(max_iter), int(check_every), g0, info_out)
    P = Pt.transpose(1, 2)  # (B, n, m), a view
    info = info_out[0]
    if not info.converged:
        message = f"soft top-k: entropic OT solve did not reach tol={tol:g} (eps={eps:g}): {info}"
        if on_failure == "raise":
            raise RuntimeError(message)
        if on_failure == "warn":
            warnings.warn(message, RuntimeWarning, stacklevel=3)
    return P, info
