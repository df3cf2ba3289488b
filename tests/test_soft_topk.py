"""Tests of the SOFT top-k operators against hard top-k, gradcheck, unrolled autograd and a
plain NumPy transcription of the paper's Sinkhorn algorithm."""

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from soft_beam import SolverInfo, ot, soft_topk, sorted_soft_topk
from soft_beam.topk import build_problem


def gapped_scores(rows, n, seed=0, dtype=torch.float64):
    """Distinct scores with gaps of at least 1/(2n) of the range, in random order."""
    g = torch.Generator().manual_seed(seed)
    base = torch.arange(n, dtype=dtype) + 0.5 * torch.rand(rows, n, generator=g, dtype=dtype)
    perm = torch.stack([torch.randperm(n, generator=g) for _ in range(rows)])
    return base.gather(1, perm) / n * 4 - 2


# --- a reference written from the paper, in NumPy ------------------------------------------


def numpy_paper_sinkhorn(C, mu, nu, eps, iters):
    """Algorithm 1 of Xie et al. (2020): plain (not log-domain) Sinkhorn scaling."""
    G = np.exp(-C / eps)
    b = np.ones_like(nu)
    for _ in range(iters):
        a = mu / (G @ b)
        b = nu / (G.T @ a)
    return a[:, None] * G * b[None, :]


def numpy_sorted_soft_topk(x, k, eps, iters=20000):
    z = (x - x.min()) / (x.max() - x.min())
    anchors = 1.0 - np.arange(k + 1) / k
    C = (z[:, None] - anchors[None, :]) ** 2
    n = len(x)
    mu = np.full(n, 1.0 / n)
    nu = np.concatenate([np.full(k, 1.0 / n), [(n - k) / n]])
    return n * numpy_paper_sinkhorn(C, mu, nu, eps, iters)[:, :k]


@pytest.mark.parametrize("k,n,eps", [(1, 6, 0.1), (3, 10, 0.05), (5, 40, 0.2)])
def test_sorted_matches_numpy_paper_algorithm(k, n, eps):
    x = gapped_scores(3, n, seed=k)
    ours = sorted_soft_topk(x, k, eps)
    for row in range(3):
        ref = numpy_sorted_soft_topk(x[row].numpy(), k, eps)
        np.testing.assert_allclose(ours[row].numpy(), ref, atol=1e-8)


def test_unsorted_matches_numpy_paper_algorithm():
    x = gapped_scores(2, 12, seed=3)
    k, eps = 4, 0.1
    ours = soft_topk(x, k, eps)
    for row in range(2):
        xr = x[row].numpy()
        z = (xr - xr.min()) / (xr.max() - xr.min())
        C = (z[:, None] - np.array([1.0, 0.0])[None, :]) ** 2
        plan = numpy_paper_sinkhorn(C, np.full(12, 1 / 12), np.array([k / 12, 1 - k / 12]), eps, 20000)
        np.testing.assert_allclose(ours[row].numpy(), 12 * plan[:, 0], atol=1e-8)


# --- gradients --------------------------------------------------------------------------------


@pytest.mark.parametrize("k,n,eps", [(1, 5, 0.3), (2, 6, 0.1), (3, 9, 0.05), (4, 8, 1.0)])
def test_gradcheck_float64(k, n, eps):
    x = gapped_scores(2, n, seed=n).requires_grad_()
    assert torch.autograd.gradcheck(lambda s: sorted_soft_topk(s, k, eps), (x,))
    assert torch.autograd.gradcheck(lambda s: soft_topk(s, k, eps), (x,))


def test_gradcheck_with_masked_entries():
    x = gapped_scores(2, 8, seed=1)
    x[0, 3] = -math.inf
    x[1, [0, 5]] = -math.inf
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda s: sorted_soft_topk(s, 3, 0.1), (x,))


@pytest.mark.parametrize("m_top", [1, 3])
def test_implicit_gradient_equals_unrolled_autograd(m_top):
    g = torch.Generator().manual_seed(m_top)
    B, n, eps = 3, 11, 0.2
    C = torch.rand(B, n, m_top + 1, generator=g, dtype=torch.float64, requires_grad=True)
    mu = torch.full((B, n), 1.0 / n, dtype=torch.float64)
    nu = torch.tensor([1.0 / n] * m_top + [1 - m_top / n], dtype=torch.float64).expand(B, -1)
    G = torch.randn(B, n, m_top + 1, generator=g, dtype=torch.float64)

    # tol 1e-12, not the default 1e-9: each row stops once it reaches tol, and the plans are
    # compared to 1e-12 (a row at 5e-10 differs by 1e-11)
    P, info = ot.entropic_transport(C, mu, nu, eps, tol=1e-12)
    assert info.converged
    (implicit,) = torch.autograd.grad((P * G).sum(), C)

    potentials = ot.sinkhorn_potentials(C, mu, nu, eps, n_iter=3000)  # autograd unrolls this
    P_unrolled, _ = ot.plan_from_potentials(potentials, C, mu, nu, eps)
    (unrolled,) = torch.autograd.grad((P_unrolled * G).sum(), C)

    torch.testing.assert_close(P, P_unrolled, rtol=0, atol=1e-12)
    assert (implicit - unrolled).norm() / unrolled.norm() < 1e-6


def test_backward_memory_does_not_depend_on_iterations():
    # The graph keeps only the plan: its saved tensors are the same for few and many iterations.
    x = gapped_scores(2, 30, seed=2).double().requires_grad_()
    sizes = []
    for tol in (1e-1, 1e-12):
        out, info = sorted_soft_topk(x, 4, 1.0, tol=tol, return_info=True)
        saved = out.grad_fn
        while saved is not None and "ImplicitGradient" not in type(saved).__name__:
            saved = saved.next_functions[0][0]
        sizes.append((info.iterations, sum(t.numel() for t in saved.saved_tensors)))
    assert sizes[0][0] < sizes[1][0]
    assert sizes[0][1] == sizes[1][1]


# --- the solver's starting point ------------------------------------------------------------


@pytest.mark.parametrize("masked", [False, True])
def test_monotone_potentials_give_the_hard_plan(masked):
    k, n = 4, 12
    x = gapped_scores(3, n, seed=5)
    if masked:
        x[0, : n - k] = -math.inf  # exactly k finite: the rest anchor is empty
        x[1, :3] = -math.inf
    problem = build_problem(x, k)
    C, mu, nu = problem.C, problem.mu, problem.nu
    P, _ = ot.plan_from_potentials(problem.g0, C, mu, nu, 1e-4)  # (3, n, k + 1)
    ranks = torch.full_like(x, k, dtype=torch.long)  # the rest anchor
    ranks.scatter_(1, torch.topk(x, k).indices, torch.arange(k).expand(3, k))
    hard = torch.nn.functional.one_hot(ranks, k + 1).to(x.dtype) * mu.unsqueeze(-1)
    torch.testing.assert_close(P, hard, rtol=0, atol=1e-9)


@pytest.mark.parametrize("eps", [0.1, 0.01, 0.001])
def test_starting_point_changes_the_cost_not_the_result(eps):
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    problem = build_problem(x, 4)
    C, mu, nu = problem.C, problem.mu, problem.nu
    warm, warm_info = ot.entropic_transport(C, mu, nu, eps, g0=problem.g0)
    cold, cold_info = ot.entropic_transport(C, mu, nu, eps)
    assert warm_info.converged and cold_info.converged
    torch.testing.assert_close(warm, cold, rtol=0, atol=1e-8)
    assert warm_info.iterations < cold_info.iterations, (warm_info, cold_info)


def test_an_unguarded_newton_step_that_goes_astray_is_undone(monkeypatch):
    # Near the optimum the solver evaluates only the full Newton step. Corrupt the first such
    # evaluation (its plan no longer belongs to its potentials): the solve must undo the step
    # and finish with the same plan from the warm start, without the continuation or Sinkhorn.
    x = torch.randn(16, 40, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    ref, ref_info = sorted_soft_topk(x, 4, 0.05, return_info=True)
    original, seen = ot._objective_and_plan, []

    def corrupt_first_unguarded(g, *args, **kwargs):
        if g.dim() == 2:  # (B, m): one candidate, the unguarded step; guarded ones are (S, B, m)
            seen.append(g)
            if len(seen) == 1:
                g = g + torch.linspace(0, 2, g.shape[-1], dtype=g.dtype)  # 40 eps off
        return original(g, *args, **kwargs)

    monkeypatch.setattr(ot, "_objective_and_plan", corrupt_first_unguarded)
    out, info = sorted_soft_topk(x, 4, 0.05, return_info=True)
    assert len(seen) >= 2 and info.converged and info.method == "newton", (info, ref_info)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-7)


def test_a_tolerance_under_float32_rounding_stops_early_and_warns():
    # float32 sums n terms: a relative marginal error of 1e-9 is out of reach. The solver must
    # notice that it has stopped improving, not grind through every fallback.
    x = torch.randn(64, 200, generator=torch.Generator().manual_seed(3))
    with pytest.warns(RuntimeWarning, match="did not reach tol"):
        _, info = sorted_soft_topk(x, 10, 0.1, tol=1e-9, return_info=True, on_failure="warn")
    assert not info.converged and info.marginal_error < 1e-4 and info.unconverged > 0
    assert info.iterations <= 30, info


def test_solution_maximises_the_semidual():
    # The potentials the solver returns are the maximiser of the concave semi-dual D.
    x = torch.randn(8, 20, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    problem = build_problem(x, 3)
    C, mu, nu = problem.C, problem.mu, problem.nu
    solution = ot.solve_transport(C, mu, nu, 0.05, tol=1e-12)
    assert solution.info.converged
    g = solution.g  # (8, 4)
    torch.testing.assert_close(solution.plan, ot.plan_from_potentials(g, C, mu, nu, 0.05)[0], rtol=0, atol=1e-15)
    best = ot.semidual_objective(g, C, mu, nu, 0.05)  # (8,)
    gen = torch.Generator().manual_seed(5)
    for _ in range(20):
        step = 1e-3 * torch.randn(g.shape, generator=gen, dtype=g.dtype)
        assert (ot.semidual_objective(g + step, C, mu, nu, 0.05) < best).all()


# --- the hard limit ---------------------------------------------------------------------------


@pytest.mark.parametrize("k,n", [(1, 7), (3, 20), (5, 64)])
def test_small_epsilon_equals_hard_topk(k, n):
    x = gapped_scores(4, n, seed=k)
    hard = torch.topk(x, k).indices  # (4, k), in descending order
    indicator = torch.zeros_like(x).scatter_(1, hard, 1.0)
    torch.testing.assert_close(soft_topk(x, k, 1e-4), indicator, rtol=0, atol=1e-6)
    onehots = torch.zeros(4, n, k, dtype=x.dtype).scatter_(1, hard.unsqueeze(1), 1.0)
    torch.testing.assert_close(sorted_soft_topk(x, k, 1e-4), onehots, rtol=0, atol=1e-6)


def test_float32_small_epsilon_orders_like_topk():
    x = gapped_scores(8, 50, seed=9, dtype=torch.float32)
    out = sorted_soft_topk(x, 5, 1e-3)
    assert torch.equal(out.argmax(1), torch.topk(x, 5).indices)


def test_large_epsilon_is_soft():
    x = gapped_scores(1, 10)
    out = sorted_soft_topk(x, 3, 1.0)
    assert out.max() < 0.9 and out.min() > 0


# --- marginals, masks, rows, dtypes -------------------------------------------------------------


@pytest.mark.parametrize("eps", [1.0, 0.1, 0.01])
def test_marginals(eps):
    x = torch.randn(5, 3, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a = soft_topk(x, 4, eps)
    torch.testing.assert_close(a.sum(-1), torch.full((5, 3), 4.0, dtype=torch.float64))
    assert a.min() >= 0 and a.max() <= 1 + 1e-12
    s = sorted_soft_topk(x, 4, eps)
    assert s.shape == (5, 3, 30, 4)
    torch.testing.assert_close(s.sum(-2), torch.ones(5, 3, 4, dtype=torch.float64))
    assert s.sum(-1).max() <= 1 + 1e-9


def test_soft_topk_dim_argument():
    x = torch.randn(6, 4, dtype=torch.float64)
    torch.testing.assert_close(soft_topk(x, 2, 0.1, dim=0), soft_topk(x.T, 2, 0.1).T)


@pytest.mark.parametrize("dim", [0, 1, -2, 2, -1])
def test_sorted_soft_topk_dim_argument(dim):
    # The n scores lie along dim; the output is scores.shape + (k,), the rank axis last.
    x = torch.randn(5, 6, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = sorted_soft_topk(x, 3, 0.1, dim=dim)
    assert out.shape == (5, 6, 7, 3)
    axis = dim % 3  # in out, which has one more axis, a negative dim would name another
    ref = sorted_soft_topk(x.movedim(dim, -1), 3, 0.1)  # (..., n, 3)
    torch.testing.assert_close(out, ref.movedim(-2, axis), rtol=0, atol=0)
    torch.testing.assert_close(out.sum(axis), torch.ones(out.sum(axis).shape, dtype=x.dtype))
    indices = torch.topk(x, 3, dim=dim).indices  # rank j's index along dim is out[..., j]'s arg-max
    torch.testing.assert_close(sorted_soft_topk(x, 3, 1e-4, dim=dim).argmax(axis), indices.movedim(dim, -1))


def test_masked_entries_get_zero_weight_and_gradient_and_are_ignored():
    x = gapped_scores(1, 9, seed=4)[0]
    masked = x.clone()
    masked[[1, 6]] = -math.inf
    masked.requires_grad_()
    out = sorted_soft_topk(masked, 3, 0.05)
    assert torch.all(out[[1, 6]] == 0)
    (out * torch.randn_like(out)).sum().backward()
    assert torch.all(masked.grad[[1, 6]] == 0) and torch.isfinite(masked.grad).all()
    keep = [i for i in range(9) if i not in (1, 6)]
    torch.testing.assert_close(out[keep], sorted_soft_topk(x[keep], 3, 0.05))


def test_exactly_k_finite_scores():
    x = torch.tensor([[0.3, -math.inf, 1.2, -0.5]], dtype=torch.float64)
    torch.testing.assert_close(soft_topk(x, 3, 0.1), torch.tensor([[1.0, 0.0, 1.0, 1.0]], dtype=torch.float64))
    s = sorted_soft_topk(x, 3, 1e-3)
    assert torch.equal(s[0].argmax(0), torch.topk(x, 3).indices[0])
    torch.testing.assert_close(s.sum(-1)[0, [0, 2, 3]], torch.ones(3, dtype=torch.float64))


def test_rows_are_independent():
    x = gapped_scores(3, 12, seed=5)
    alone = sorted_soft_topk(x[:1], 4, 0.05)
    # The reference code normalised the cost over the whole batch: a row of large scores
    # changed every other row. Here each row is normalised and solved on its own.
    y = x.clone()
    y[1] *= 1000.0
    y[2] = -y[2]
    torch.testing.assert_close(sorted_soft_topk(y, 4, 0.05)[:1], alone, rtol=0, atol=1e-9)


@pytest.mark.parametrize("max_iter", [100, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_row_is_solved_the_same_alone_or_next_to_a_hard_row(dtype, max_iter):
    # The solver decides per row: a row that converged keeps its values while others iterate,
    # guards and undos are per row, and the fallbacks rerun only the rows that failed. So an easy
    # row (2-3 iterations) gets the same plan and gradient next to a hard one (an outlier squeezes
    # its other scores together: 5-6 iterations, and with max_iter=3 both fallbacks) as alone. The
    # solver that stopped, guarded and fell back for the whole batch changed the easy row by
    # 6e-6 (float32) and 7e-12 (float64), 2e-4 and 7e-6 with the fallbacks. Bit-for-bit here:
    # each row's m n = 160 floats keep its block 64-byte aligned alone and in a batch. (MKL's gemm,
    # in the Laplacian's P Q^T, rounds differently by alignment; with other n a row then differs
    # by rounding, amplified by 1 / eps: 4e-6 in float32 at n = 200, eps = 0.01; 1e-14 in float64.)
    gen = torch.Generator().manual_seed(3)
    easy = gapped_scores(1, 32, seed=3, dtype=dtype)
    hard = torch.randn(1, 32, generator=gen, dtype=dtype)
    hard[0, 0] = 100.0
    x = torch.cat([easy, hard])  # (2, 32)
    G = torch.randn(2, 32, 4, generator=gen, dtype=dtype)

    def solve(rows):
        xl = x[rows].clone().requires_grad_()
        kwargs = dict(max_iter=max_iter, max_sinkhorn_iter=30, return_info=True, on_failure="ignore")
        out, info = sorted_soft_topk(xl, 4, 0.01, **kwargs)
        (out * G[rows]).sum().backward()
        return out.detach(), xl.grad, info

    out, grad, info = solve([0, 1])
    assert info.row_iterations[0] < info.row_iterations[1], info.row_iterations
    fallback = "newton+continuation+sinkhorn" if max_iter == 3 else "newton"
    assert info.row_method == ("newton", fallback) and info.method == fallback
    tol = 1e-7 if dtype == torch.float32 else 1e-14
    for order in ([0], [1], [1, 0]):
        out_r, grad_r, info_r = solve(order)
        torch.testing.assert_close(out_r, out[order], rtol=0, atol=tol)
        torch.testing.assert_close(grad_r, grad[order], rtol=0, atol=tol)
        assert info_r.row_iterations == tuple(info.row_iterations[r] for r in order)
        assert info_r.row_method == tuple(info.row_method[r] for r in order)


# --- wide ranges, near-ties and the floor on the span ------------------------------------------


def jacobian(op, x, k, eps, **kwargs):
    """d op(x) / d x for one row x (n,), float64: (n, n) for soft_topk, (n, k, n) for sorted."""
    return torch.autograd.functional.jacobian(lambda s: op(s, k, eps, tol=1e-12, **kwargs), x)


@pytest.mark.parametrize("op", [soft_topk, sorted_soft_topk])
@pytest.mark.parametrize(
    "row,unit",
    [
        ([-3e38, -1e38, -math.inf, 1e38, 3e38], 1e38),  # float32: hi - lo = 6e38 > 3.4e38
        ([-1.75e38, 1.75e38, 0.5e38, -math.inf, -0.5e38], 1e38),  # 3.5e38
        ([-1e308, 0.0, 5e307, -math.inf, 1e308], 1e307),  # float64: 2e308 > 1.8e308
    ],
)
def test_a_range_wider_than_the_dtype_is_normalised_without_overflow(op, row, unit):
    # hi - lo overflowed: z was NaN, and the solve returned all-NaN after 1224 iterations with
    # only a RuntimeWarning. The row is the same problem as the row divided by its unit.
    dtype = torch.float64 if unit == 1e307 else torch.float32
    x = torch.tensor([row], dtype=dtype)
    x.requires_grad_()
    out = op(x, 2, 0.1)
    torch.testing.assert_close(out, op(x.detach() / unit, 2, 0.1), rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-12)
    assert torch.isfinite(out).all()
    out.pow(2).sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad[torch.isinf(x.detach())] == 0).all()


def test_an_overflowing_row_leaves_the_others_bit_for_bit():
    x = gapped_scores(2, 8, seed=2, dtype=torch.float32)
    wide = torch.cat([x, torch.tensor([[-3e38, 3e38, 0, 1e38, -1e38, 2e38, -2e38, 5]])])
    torch.testing.assert_close(sorted_soft_topk(wide, 3, 0.05)[:2], sorted_soft_topk(x, 3, 0.05), rtol=0, atol=0)


@pytest.mark.parametrize("op", [soft_topk, sorted_soft_topk])
def test_min_span_bounds_the_gradient_of_near_ties(op):
    # Min-max normalisation makes eps relative to the row's span: for [0, d, 2d, 3d] the output
    # did not depend on d, and the largest gradient grew as 1 / d (soft_topk, k = 2, eps = 0.1:
    # 111, 1.1e5, 1.1e8 for d = 1e-3, 1e-6, 1e-9). Under a floor min_span on the span, eps is
    # absolute: the documented bound is 1 / (2 eps min_span), here 5.
    eps, min_span, k = 0.1, 1.0, 2
    bound = 1 / (2 * eps * min_span)
    largest = []
    for d in (1e-3, 1e-6, 1e-9):
        x = torch.tensor([0.0, d, 2 * d, 3 * d], dtype=torch.float64) + 7.0
        out = op(x, k, eps, min_span=min_span)
        uniform = torch.full_like(out, k / 4 if op is soft_topk else 1 / 4)
        torch.testing.assert_close(out, uniform, rtol=0, atol=0.02)  # a smooth, nearly uniform plan
        largest.append(jacobian(op, x, k, eps, min_span=min_span).abs().max().item())
    assert max(largest) <= bound, largest
    assert largest[0] > 0.1 * bound  # the bound is of the right size, not vacuous
    assert jacobian(op, x, k, eps).abs().max() > 1e7  # without the floor: 1 / d


def test_under_the_floor_epsilon_is_absolute_and_above_it_nothing_changes():
    x = gapped_scores(3, 10, seed=4)  # spans about 4
    x[1] *= 0.01  # span about 0.04
    x[2] = 1.5  # all equal
    span = (x.amax(1) - x.amin(1)).tolist()
    for op in (soft_topk, sorted_soft_topk):
        plain = op(x, 3, 0.05)
        # above the floor (and at it): to the bit what it was without one
        torch.testing.assert_close(op(x[:1], 3, 0.05, min_span=span[0]), plain[:1], rtol=0, atol=0)
        floored = op(x, 3, 0.05, min_span=1.0)
        torch.testing.assert_close(floored[0], plain[0], rtol=0, atol=0)
        # under it, eps is absolute: the row solves as without a floor at eps * min_span / span
        torch.testing.assert_close(floored[1], op(x[1], 3, 0.05 / span[1]), rtol=0, atol=1e-9)
        # an all-equal row: the uniform plan with or without a floor
        torch.testing.assert_close(floored[2], plain[2], rtol=0, atol=1e-12)
        torch.testing.assert_close(floored[2], torch.full_like(floored[2], 0.3 if op is soft_topk else 0.1))


def test_the_hard_limit_holds_under_the_floor():
    x = gapped_scores(4, 20, seed=8) * 1e-3  # spans about 4e-3, gaps at least 1e-4
    hard = torch.topk(x, 3).indices
    onehots = torch.zeros(4, 20, 3, dtype=x.dtype).scatter_(1, hard.unsqueeze(1), 1.0)
    torch.testing.assert_close(sorted_soft_topk(x, 3, 1e-6, min_span=1.0), onehots, rtol=0, atol=1e-6)


@pytest.mark.parametrize("n,k,eps", [(6, 2, 0.1), (16, 4, 0.03), (30, 5, 0.5)])
def test_the_stated_gradient_bound_above_the_floor(n, k, eps):
    # Docstrings: every entry of the Jacobian is at most 1 / (2 eps s), s = the row's span, for
    # soft_topk; for sorted_soft_topk too except in the columns of the row's largest and
    # smallest score, there max(1/2, sqrt(n) / 4) / (eps s).
    x = torch.randn(n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    x[: n // 3] = x[n // 3 : 2 * (n // 3)]  # ties, which put plans between anchors
    s = (x.max() - x.min()).item()
    J = jacobian(soft_topk, x, k, eps).abs()  # (n, n)
    assert J.max() <= 1 / (2 * eps * s)
    J = jacobian(sorted_soft_topk, x, k, eps).abs().reshape(-1, n)  # (n k, n)
    extreme = (x == x.max()) | (x == x.min())
    assert J[:, ~extreme].max() <= 1 / (2 * eps * s)
    assert J.max() <= max(0.5, math.sqrt(n) / 4) / (eps * s)


def test_invariant_to_affine_rescaling_of_a_row():
    x = gapped_scores(2, 10, seed=6)
    torch.testing.assert_close(sorted_soft_topk(3 * x + 7, 3, 0.05), sorted_soft_topk(x, 3, 0.05))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_round_trip(dtype):
    x = gapped_scores(4, 20, seed=7, dtype=torch.float32)
    ref = sorted_soft_topk(x, 3, 0.05)
    xh = x.to(dtype).requires_grad_()
    out = sorted_soft_topk(xh, 3, 0.05)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), sorted_soft_topk(xh.detach().float(), 3, 0.05), atol=1e-2, rtol=0)
    out.float().sum(1).pow(2).sum().backward()
    assert xh.grad.dtype == dtype and torch.isfinite(xh.grad.float()).all()
    assert (out.float() - ref).abs().max() < 0.1


def test_autocast_solves_in_float32():
    x = gapped_scores(2, 16, seed=8, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = soft_topk(x, 3, 0.05)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, soft_topk(x, 3, 0.05))


# --- the problem the ops solve -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sorted", "plain"])
def test_build_problem_is_what_the_ops_solve(kind):
    x = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x[0, 1, [2, 7]] = -math.inf
    problem = build_problem(x, 4, kind)
    m = 5 if kind == "sorted" else 2
    assert problem.C.shape == (6, 16, m) and problem.mu.shape == (6, 16) and problem.nu.shape == (6, m)
    assert problem.count.flatten().tolist() == [16, 14, 16, 16, 16, 16] and problem.g0.shape == (6, m)
    torch.testing.assert_close(problem.mu.sum(-1), torch.ones(6, dtype=torch.float64))
    torch.testing.assert_close(problem.nu.sum(-1), torch.ones(6, dtype=torch.float64))
    P, _ = ot.entropic_transport(problem.C, problem.mu, problem.nu, 0.05, g0=problem.g0)  # (6, 16, m)
    scaled = (P * problem.count.unsqueeze(-1)).reshape(2, 3, 16, m)
    if kind == "sorted":
        torch.testing.assert_close(sorted_soft_topk(x, 4, 0.05), scaled[..., :4], rtol=0, atol=1e-12)
    else:
        torch.testing.assert_close(soft_topk(x, 4, 0.05), scaled[..., 0], rtol=0, atol=1e-12)
    assert build_problem(x.float(), 4, kind, warm_start=False).g0 is None
    with pytest.raises(ValueError, match="kind"):
        build_problem(x, 4, "sideways")
    with pytest.raises(ValueError, match="min_span"):
        build_problem(x, 4, kind, min_span=-0.5)
    with pytest.raises(ValueError, match="fewer than k=4 finite"):
        build_problem(x[0, 1, :4], 4, kind)  # -inf at index 2: three finite scores


def test_max_iter_counts_newton_and_max_sinkhorn_iter_the_fallback():
    # max_iter bounds the Newton iterations per eps; max_sinkhorn_iter, separately, the Sinkhorn
    # fallback's (formerly max_iter chunks of 10).
    x = torch.randn(2, 20, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    kwargs = dict(max_iter=1, tol=1e-17, return_info=True, on_failure="ignore")  # tol out of reach
    _, info = sorted_soft_topk(x, 3, 0.5, max_sinkhorn_iter=25, **kwargs)
    # from g0: 1 Newton iteration; continuation at eps 1 and 0.5: 1 each; then 25 of Sinkhorn
    assert info.method == "newton+continuation+sinkhorn" and 25 < info.iterations <= 3 + 25, info
    _, info = sorted_soft_topk(x, 3, 0.5, max_sinkhorn_iter=0, **kwargs)
    assert info.method == "newton+continuation" and info.iterations <= 3, info


# --- diagnostics and bad input -----------------------------------------------------------------


def test_solver_info():
    out, info = sorted_soft_topk(gapped_scores(2, 20), 3, 0.01, return_info=True)
    assert isinstance(info, SolverInfo)
    assert info.converged and info.marginal_error <= 1e-9 and 0 < info.iterations < 60
    assert "converged" in str(info)
    assert len(info.row_iterations) == len(info.row_marginal_error) == len(info.row_method) == 2
    assert info.iterations == max(info.row_iterations) and info.marginal_error == max(info.row_marginal_error)


def test_non_convergence_raises_by_default_and_warns_or_passes_on_request():
    # A solve that misses its tolerance used to warn by default and return the plan as the solver
    # left it, which then reached the loss. Now it raises unless asked not to.
    x = torch.randn(2, 20, generator=torch.Generator().manual_seed(0))  # no gaps: a soft plan
    kwargs = dict(max_iter=1, max_sinkhorn_iter=5, tol=1e-15)  # tol out of reach
    for op in (soft_topk, sorted_soft_topk):
        with pytest.raises(RuntimeError, match=r"did not reach tol=1e-15 .* in 2 of 2 rows") as raised:
            op(x, 3, 0.5, **kwargs)
        assert type(raised.value).__name__ == "ConvergenceError" and raised.value.info.unconverged == 2
        assert "max_iter" in str(raised.value) and "epsilon" in str(raised.value)
        with pytest.warns(RuntimeWarning, match="did not reach tol"):
            _, info = op(x, 3, 0.5, return_info=True, on_failure="warn", **kwargs)
        assert not info.converged and info.unconverged == 2
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            op(x, 3, 0.5, on_failure="ignore", **kwargs)


def test_a_row_that_cannot_converge_raises_and_is_counted():
    # Span 1e30 at eps = 1e-6 in float32: the three small scores tie (their costs round alike),
    # and splitting them needs potentials to 1e-6 of 1, under float32's resolution. The old
    # default returned [1, 0, 0, 0] for k = 2 (the row sums to 1, not k) with only a warning.
    bad = torch.tensor([1e30, 0.0, 1.0, 2.0])
    with pytest.raises(RuntimeError, match=r"in 1 of 1 rows .* 0: 5\.00e-01"):
        soft_topk(bad.unsqueeze(0), 2, 1e-6)
    # Per row: next to solvable rows it is the only one counted, and the message names it.
    x = torch.stack([torch.tensor([0.0, 1.0, 2.0, 3.0]), bad, torch.tensor([3.0, 1.0, 0.0, 2.0])])
    with pytest.raises(RuntimeError, match=r"in 1 of 3 rows .*row: 1: ") as raised:
        soft_topk(x, 2, 1e-6)
    assert raised.value.info.unconverged == 1
    out, info = soft_topk(x, 2, 1e-6, return_info=True, on_failure="ignore")
    assert info.unconverged == 1 and not info.converged and "1 of 3 rows" in str(info)
    torch.testing.assert_close(out[[0, 2]], torch.tensor([[0.0, 0.0, 1.0, 1.0], [1.0, 0.0, 0.0, 1.0]]))
    _, info = soft_topk(x[[0, 2]], 2, 1e-6, return_info=True)
    assert info.converged and info.unconverged == 0


@pytest.mark.parametrize(
    "scores,k,kwargs,match",
    [
        (torch.tensor([[1.0, 2.0, math.nan]]), 1, {}, "NaN"),
        (torch.tensor([[1.0, math.inf, 0.0]]), 1, {}, r"\+inf"),
        (torch.tensor([[1.0, -math.inf, -math.inf], [1.0, 2.0, 3.0]]), 2, {}, "fewer than k=2 finite"),
        (torch.tensor([[1, 2, 3]]), 1, {}, "floating-point"),
        (torch.tensor([[1.0, 2.0]]), 0, {}, "k must be an integer >= 1"),
        (torch.tensor([[1.0, 2.0]]), 2.0, {}, "k must be an integer"),
        (torch.tensor([[1.0, 2.0]]), 3, {}, "larger than the number of scores"),
        (torch.tensor([[1.0, 2.0]]), 1, {"epsilon": 0.0}, "epsilon must be"),
        (torch.tensor([[1.0, 2.0]]), 1, {"epsilon": -1.0}, "epsilon must be"),
        (torch.tensor([[1.0, 2.0]]), 1, {"on_failure": "loud"}, "on_failure"),
        (torch.tensor([[1.0, 2.0]]), 1, {"max_iter": 0}, "max_iter"),
        (torch.tensor([[1.0, 2.0]]), 1, {"max_sinkhorn_iter": -1}, "max_sinkhorn_iter"),
        ([1.0, 2.0], 1, {}, "torch.Tensor"),
        (torch.tensor([[1.0, 2.0]]), 1, {"dim": 2}, r"dim must be an integer in \[-2, 1\]"),
        (torch.tensor([[1.0, 2.0]]), 1, {"dim": -3}, "dim must be"),
        (torch.tensor([[1.0, 2.0]]), 1, {"dim": 1.0}, "dim must be"),
        (torch.tensor([[1.0, 2.0]]), 1, {"min_span": -1.0}, "min_span must be"),
        (torch.tensor([[1.0, 2.0]]), 1, {"min_span": math.inf}, "min_span must be"),
        (torch.tensor([[1.0, 2.0]]), 1, {"min_span": math.nan}, "min_span must be"),
        (torch.tensor([[1.0, 2.0]]), 1, {"min_span": "1"}, "min_span must be"),
        (torch.tensor([[1.0, 2.0]]), 1, {"tol": -1.0}, "tol must be"),
    ],
)
@pytest.mark.parametrize("op", [soft_topk, sorted_soft_topk])
def test_bad_input_raises_value_error(op, scores, k, kwargs, match):
    with pytest.raises(ValueError, match=match):
        op(scores, k, **kwargs)


# --- CUDA --------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_matches_cpu(dtype):
    x = gapped_scores(16, 200, seed=11, dtype=torch.float32)
    cpu = sorted_soft_topk(x, 5, 0.01)
    xc = x.to("cuda", dtype).requires_grad_()
    out = sorted_soft_topk(xc, 5, 0.01)
    assert out.device.type == "cuda" and out.dtype == dtype
    torch.testing.assert_close(out.float().cpu(), cpu, atol=5e-2 if dtype != torch.float32 else 1e-4, rtol=0)
    out.float().sum(1).pow(2).sum().backward()
    assert torch.isfinite(xc.grad.float()).all()


@pytest.mark.cuda
def test_cuda_gradcheck_float64():
    x = gapped_scores(2, 8, seed=12).cuda().requires_grad_()
    assert torch.autograd.gradcheck(lambda s: sorted_soft_topk(s, 3, 0.1), (x,))


def test_regression_full_newton_step_to_infinity_is_never_chosen():
    # Candidate scores of one beam-search step (float32, -inf = masked) where, while lagging rows
    # kept the batch iterating, a row's Laplacian went singular and its damped Newton steps were
    # infinite; a NaN from "-inf + noise * inf" then made argmax choose one, and the row was NaN.
    x = torch.load(Path(__file__).parent / "data" / "beam_step_scores.pt")  # (7, 32)
    out, info = sorted_soft_topk(x, 4, 1e-3, return_info=True)
    assert info.converged and torch.isfinite(out).all()
    assert torch.equal(out.argmax(1), torch.topk(x, 4).indices)
