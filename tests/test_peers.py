"""Our operator against POT (a maintained entropic-OT library), in float64: the same per-row
problem (cost and marginals from ``build_problem``, the same eps) must give the same plan, and
our implicit gradient must equal autograd through POT's log-domain Sinkhorn run to convergence.
Skipped where POT is not installed (it is in the ``test`` extra)."""

import pytest
import torch

from soft_beam import sorted_soft_topk
from soft_beam.ot import entropic_transport
from soft_beam.topk import build_problem

ot = pytest.importorskip("ot")

CASES = [(3, 8, 2, 0.1), (2, 20, 4, 0.1), (2, 20, 4, 0.01)]  # rows, n, k, eps


def _scores(rows, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, n, generator=g, dtype=torch.float64)


def _pot_plan(C, mu, nu, eps):
    """POT's log-domain Sinkhorn on each row, to convergence: C (B, n, m), mu (B, n), nu (B, m) ->
    P (B, n, m); autograd flows through its iterations (torch backend)."""
    plans = [ot.bregman.sinkhorn_log(mu[i], nu[i], C[i], eps, numItermax=20000, stopThr=1e-12, warn=False) for i in range(C.shape[0])]
    return torch.stack(plans)


@pytest.mark.parametrize("rows,n,k,eps", CASES)
def test_plan_equals_pots(rows, n, k, eps):
    p = build_problem(_scores(rows, n, 10 * n + k), k)
    P, info = entropic_transport(p.C, p.mu, p.nu, eps, tol=1e-12, g0=p.g0)
    assert info.converged
    P_pot = _pot_plan(p.C, p.mu, p.nu, eps)
    # n P is each score's split over the anchors, in [0, 1]: 1e-8 is the solvers' rounding and
    # tolerance (a 1% change of eps moves it by about 1e-3)
    torch.testing.assert_close(P * n, P_pot * n, rtol=0, atol=1e-8)


@pytest.mark.parametrize("rows,n,k,eps", CASES)
def test_gradient_equals_autograd_through_pot(rows, n, k, eps):
    x = _scores(rows, n, 7 * n + k)
    up = torch.randn(rows, n, k, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x1 = x.clone().requires_grad_()
    sorted_soft_topk(x1, k, eps, tol=1e-12).backward(up)
    x2 = x.clone().requires_grad_()
    p = build_problem(x2, k, warm_start=False)
    out = (_pot_plan(p.C, p.mu, p.nu, eps) * p.count.unsqueeze(-1))[..., :k]  # (B, n, k) as sorted_soft_topk
    out.backward(up)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-6, atol=1e-7)
