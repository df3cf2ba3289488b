"""Benchmark of the SOFT top-k operator (``soft_beam.sorted_soft_topk``) at beam-search shapes.

    python scripts/bench_soft_topk.py [--grid default|beam-search|peers] [--quick] [--reps N]
        [--dtypes float32,bfloat16] [--epsilons E,...] [--methods M,...] [--device cpu|cuda]
        [--markdown PATH] [--json PATH]

Grids (``--quick`` shrinks each to a smoke size, under a minute on a CPU):

  default      batch 64, k in {4, 5, 10}, n = 2 k^2 (pruned) and n = 10000 k (full vocabulary),
               eps in {0.1, 0.01, 0.001}; methods topk, ours-fwd, ours-fb, unrolled, ref-plain,
               ref-release; plus the table of backward memory against the iteration count.
  beam-search  the shapes of the search (issue 16, for scripts/gpu_check.sh): rows in {64, 256,
               1024, 4096}, k in {4, 5, 10}, n = 2 k^2, plus one full-vocabulary cell (rows 64,
               n = 8000, k = 4); eps 0.01; methods topk, ours-fwd, ours-fb.
  peers        the maintained entropic-OT libraries against ours: rows 64, k in {4, 5, 10},
               n = 2 k^2, eps in {0.1, 0.01, 0.001}; methods topk, ours-fb, pot-sinkhorn, pot-log,
               pot-batch, ott.

Every cell runs once per ``--dtypes`` entry (default float32): the scores and the upstream gradient
are in that dtype. ``sorted_soft_topk`` solves fp16/bf16 input in float32 (``build_problem``
upcasts, the plan is cast back to the input's dtype at the end); the other methods build the same
float32 problem from it, so bfloat16 changes only the inputs' and outputs' rounding and traffic.
``torch.topk`` runs on the input as it is.

Methods (side by side and interleaved: A, B, C, A, B, C, ... repetitions; medians):

  topk        torch.topk (hard, forward only)
  ours-fwd    sorted_soft_topk under no_grad (Newton from the hard plan's potentials)
  ours-fb     sorted_soft_topk forward + backward (implicit backward), random upstream gradient
  ours-fb@tol only when the reference reaches a smaller marginal error than ours-fb: ours again
              with tol = max(reference error, 1e-6), so that the speed-up is at equal or smaller error
  unrolled    autograd through 200 iterations of soft_beam.ot.sinkhorn_potentials (log domain)
  ref-plain   re-implementation of the paper's reference code (Xie et al. 2020,
              google-research/soft_topk/soft_ot.py, TopKFunc1): plain Sinkhorn with the kernel
              exp(-C/eps), 200 iterations, closed-form backward through the inverse of the
              (m-1) x (m-1) = k x k matrix kappa (m = k + 1 anchors; the heavy anchor is dropped)
  ref-release the same code's dispatch as released: plain Sinkhorn for eps > 1e-2 (log-domain
              rerun if it gives NaN), log-domain Sinkhorn for eps <= 1e-2; same backward.
              Listed only for eps <= 1e-2 (for eps > 1e-2 it is ref-plain unless that gave NaN).

The maintained peers (``pip install -e .[peers]``; a method whose package does not import is a row
"not installed (pip install -e .[peers])"):

  pot-sinkhorn POT's ot.sinkhorn(a, b, M, reg, method="sinkhorn"), plain kernel, torch backend, one
              call per row (its API takes one cost matrix), autograd through the iterations
  pot-log     POT's ot.bregman.sinkhorn_log, log domain, otherwise as pot-sinkhorn
  pot-batch   POT's batched solver ot.batch.solve_batch(method="log_sinkhorn", grad="autodiff"):
              all rows in one call, autograd through the iterations
  ott         OTT-JAX: ott.tools.soft_sort.transport_for_sort (the transport behind soft_sort.sort
              with topk=k: anchors 0, 1/k, ..., 1, masses (n-k)/n, 1/n, ...), fed our min-max
              normalised scores with squashing_fun = identity, so that its squared-distance cost,
              masses and eps are ours (columns in the reverse order, flipped back); log-domain
              Sinkhorn with OTT's default implicit differentiation; vmapped over the rows and
              jit-compiled once per setting outside the timing (the compiled function is warmed
              up by the calibration); timed with block_until_ready, including the transfers
              torch -> numpy -> jax and back and torch's backward through the normalisation.
              JAX runs on the CPU (jax[cpu]); with --threads 1, XLA is kept to one thread too.
              Skipped on --device cuda.

POT's solvers take our cost C and masses exactly (``build_problem``); all peers use the same eps
(absolute on the normalised cost, as ours). Equal marginal error: each peer is calibrated per cell.
Its stopping threshold starts at ours-fb's marginal error (SolverInfo.marginal_error, relative)
times the light anchors' mass 1/n, the absolute scale of the libraries' own marginal checks, and
is divided by 10 until the peer's plan, measured by our metric, reaches ours-fb's error, at most
--peer-tries times, stopping early when a try no longer halves the error (the iteration cap or
float32 rounding) or, on a CPU, when a try alone would overrun --cell-cap-s or --budget-s. The
iteration cap is --peer-max-iter, lowered for the autograd-unrolled POT
methods so that what they save for backward stays under --mem-cap-gb (projected from 10 and 20
iterations). The timed runs use the calibrated threshold. The speed-up column gives peer time /
ours-fb time; below 1 it says PEER WINS. A peer that does not reach ours' error gets no ratio at
equal error (its best error and its raw ratio are given).

All methods use the same per-row cost as ``soft_beam.topk`` (min-max normalised scores, anchors
1, 1 - 1/k, ..., 0, masses 1/n and (n - k)/n), so rows never see each other.

Columns: median time; the time over torch.topk's on the same input in the same cell ("x topk");
memory ("saved MB": bytes of the distinct storages that autograd saves for backward, counted with
torch.autograd.graph.saved_tensors_hooks, plus the output; not JAX's; on CUDA also the peak of
torch.cuda.max_memory_allocated above the inputs); the marginal error of the method's plan,
relative, max over rows of max(|P 1 / mu - 1|, |P^T 1 / nu - 1|) (ours and the unrolled solver have
P 1 = mu by construction, so this is SolverInfo.marginal_error; the reference ends on a column
update, so its error is in the rows); the speed-up of ours-fb over each reference and peer row,
counted only where ours reaches an equal or smaller marginal error. ``--json PATH`` writes every
row's raw figures (all repetition times), the machine and the command.

Budget (CPU): a slow method in a cell is first probed (a few Sinkhorn iterations, or ours on 8 of
the rows) and skipped, with the projected time in the table, when the projection exceeds
--cell-cap-s, or the run's --budget-s would be overrun; cells with n >= --big-n run one repetition;
the unrolled solver is skipped when the bytes it would save exceed --mem-cap-gb. Nothing is
dropped silently: every skipped measurement is a row with its reason.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from bench_common import SavedBytes, machine_description, machine_info, sync

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from soft_beam import sorted_soft_topk  # noqa: E402
from soft_beam.ot import plan_from_potentials, sinkhorn_potentials  # noqa: E402
from soft_beam.topk import build_problem  # noqa: E402

BATCH = 64  # rows of the default grid
REF_ITERS = 200  # the iteration count of the paper's reference code (TopK_custom max_iter)


# --------------------------------------------------------------------------- helpers


def problem(x, k):
    """Exactly the sorted op's per-row problem: C (B, n, m), mu (B, n), nu (B, m), cnt (B, 1)."""
    p = build_problem(x, k, "sorted", warm_start=False)
    C = p.C.contiguous()  # (B, n, m) in memory too, the layout of the reference code
    return C, p.mu, p.nu, p.count


@torch.no_grad()
def marginal_error(P, mu, nu):
    """max over rows of max(|P 1/mu - 1|, |P^T 1/nu - 1|); NaN if P is not finite."""
    if not bool(torch.isfinite(P).all()):
        return math.nan
    row = (P.sum(-1) / mu - 1).abs().amax()
    col = (P.sum(1) / nu - 1).abs().amax()
    return float(torch.maximum(row, col))


# --------------------------------------------------------------------------- the paper's reference


def ref_sinkhorn_plain(C, mu, nu, eps, n_iter):
    """Plain Sinkhorn scaling as in the reference sinkhorn_forward. mu (B, n, 1), nu (B, 1, m)."""
    G = torch.exp(-C / eps)
    v = torch.ones_like(nu) / nu.shape[-1]
    for _ in range(n_iter):
        u = mu / (G * v).sum(-1, keepdim=True)
        v = nu / (G * u).sum(-2, keepdim=True)
    return u * G * v


def ref_sinkhorn_log(C, mu, nu, eps, n_iter):
    """Log-domain Sinkhorn as in the reference sinkhorn_forward_stablized."""
    f = torch.zeros_like(mu)
    g = torch.zeros_like(nu)
    eps_log_mu, eps_log_nu = eps * mu.log(), eps * nu.log()
    for _ in range(n_iter):
        f = -eps * torch.logsumexp((g - C) / eps, -1, keepdim=True) + eps_log_mu
        g = -eps * torch.logsumexp((f - C) / eps, -2, keepdim=True) + eps_log_nu
    return torch.exp((f + g - C) / eps)


def ref_backward(grad_gamma, gamma, mu, nu, eps, flags=None):
    """Closed-form backward of the reference (sinkhorn_backward): the heavy (last) anchor is
    dropped and kappa = diag(nu_) - gamma_^T diag(1/mu) gamma_ (k x k) is inverted."""
    gamma_ = gamma[:, :, :-1]  # (B, n, k)
    inv_mu = 1.0 / mu  # (B, n, 1)
    kappa = torch.diag_embed(nu[:, 0, :-1]) - (gamma_ * inv_mu).transpose(1, 2) @ gamma_  # (B, k, k)
    # The reference calls torch.inverse, which raises on a singular kappa; inv_ex lets the run go
    # on and the caller reports the rows where it failed (they get NaN/inf gradients).
    inv_kappa, failed = torch.linalg.inv_ex(kappa)
    if flags is not None and bool((failed != 0).any()):
        flags.append(f"kappa singular in {int((failed != 0).sum())}/{len(failed)} rows (torch.inverse would raise)")
    gamma_mu = inv_mu * gamma_  # (B, n, k)
    L = gamma_mu @ inv_kappa  # (B, n, k)
    G1 = grad_gamma * gamma  # (B, n, m)
    g1 = G1.sum(-1, keepdim=True)  # (B, n, 1)
    g1_L = g1.transpose(1, 2) @ L  # (B, 1, k)
    G2 = (g1 * inv_mu) * gamma + (gamma_mu @ g1_L.transpose(1, 2)) * gamma
    G2 = G2 - torch.nn.functional.pad(g1_L, (0, 1)) * gamma
    g2 = G1.sum(1).unsqueeze(-1)[:, :-1]  # (B, k, 1)
    G3 = -(L @ g2) * gamma + torch.nn.functional.pad((inv_kappa @ g2).transpose(1, 2), (0, 1)) * gamma
    return (-G1 + G2 + G3) / eps


class RefTopKFunc(torch.autograd.Function):
    """TopKFunc1 of the reference with the forward chosen by ``mode`` ("plain" or "release")."""

    @staticmethod
    def forward(ctx, C, mu, nu, eps, n_iter, mode, flags):
        with torch.no_grad():
            if mode == "plain" or eps > 1e-2:
                gamma = ref_sinkhorn_plain(C, mu, nu, eps, n_iter)
                if mode == "release" and bool(torch.isnan(gamma).any()):
                    flags.append("plain NaN -> log-domain rerun")
                    gamma = ref_sinkhorn_log(C, mu, nu, eps, n_iter)
            else:
                gamma = ref_sinkhorn_log(C, mu, nu, eps, n_iter)
        ctx.save_for_backward(mu, nu, gamma)
        ctx.eps = eps
        ctx.flags = flags
        return gamma

    @staticmethod
    def backward(ctx, grad_gamma):
        mu, nu, gamma = ctx.saved_tensors
        with torch.no_grad():
            grad_C = ref_backward(grad_gamma, gamma, mu, nu, ctx.eps, ctx.flags)
        return grad_C, None, None, None, None, None, None


# --------------------------------------------------------------------------- the methods
# Each returns (plan or None, extra dict); backward runs inside (it is part of the timing).


def m_topk(x, k, eps, grad):
    torch.topk(x, k, dim=-1)
    return None, {}


def m_ours_fwd(x, k, eps, grad, tol=None):
    with torch.no_grad():
        out, info = sorted_soft_topk(x, k, eps, tol=tol, return_info=True, on_failure="ignore")
    return None, {"info": info, "out": out}


def m_ours_fb(x, k, eps, grad, tol=None):
    xl = x.detach().requires_grad_()
    out, info = sorted_soft_topk(xl, k, eps, tol=tol, return_info=True, on_failure="ignore")
    out.backward(grad)
    return None, {"info": info, "out": out, "xgrad": xl.grad}


def m_unrolled(x, k, eps, grad, n_iter=REF_ITERS):
    xl = x.detach().requires_grad_()
    C, mu, nu, cnt = problem(xl, k)
    g = sinkhorn_potentials(C, mu, nu, eps, n_iter)
    P, _ = plan_from_potentials(g, C, mu, nu, eps)
    out = (P * cnt.unsqueeze(-1))[..., :k]
    out.backward(grad.to(out.dtype))
    return P.detach(), {"mu": mu, "nu": nu, "out": out, "xgrad": xl.grad}


def _ref(x, k, eps, grad, mode, n_iter=REF_ITERS):
    xl = x.detach().requires_grad_()
    C, mu, nu, cnt = problem(xl, k)
    flags: list[str] = []
    gamma = RefTopKFunc.apply(C, mu.unsqueeze(-1), nu.unsqueeze(1), eps, n_iter, mode, flags)
    out = (gamma * cnt.unsqueeze(-1))[..., :k]
    out.backward(grad.to(out.dtype))
    return gamma.detach(), {"mu": mu, "nu": nu, "flags": flags, "out": out, "xgrad": xl.grad}


def m_ref_plain(x, k, eps, grad):
    return _ref(x, k, eps, grad, "plain")


def m_ref_release(x, k, eps, grad):
    return _ref(x, k, eps, grad, "release")


# --------------------------------------------------------------------------- the maintained peers

PEERS = ("pot-sinkhorn", "pot-log", "pot-batch", "ott", "ott-unrolled")
NOT_INSTALLED = "not installed (pip install -e .[peers])"
_PEER_MODULES: dict[str, object] = {}


def peer_module(name):
    """The imported library of peer ``name`` (POT's ``ot``, or (jax, soft_sort) for ott), or None
    where it does not import."""
    lib = "ott" if name.startswith("ott") else "pot"
    if lib not in _PEER_MODULES:
        try:
            if lib == "pot":
                import ot
                import ot.batch  # noqa: F401

                _PEER_MODULES[lib] = ot
            else:
                if torch.get_num_threads() == 1:  # as torch: one thread (read when jax starts)
                    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
                import jax
                from ott.tools import soft_sort

                _PEER_MODULES[lib] = (jax, soft_sort)
        except ImportError:
            _PEER_MODULES[lib] = None
    return _PEER_MODULES[lib]


def _pot_per_row(x, k, eps, grad, thr, max_iter, solver):
    """POT's one-problem API on each row; autograd (torch backend) through its iterations."""
    xl = x.detach().requires_grad_()
    C, mu, nu, cnt = problem(xl, k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "did not converge" at the cap is read off the plan's error
        P = torch.stack([solver(mu[i], nu[i], C[i], eps, numItermax=max_iter, stopThr=thr) for i in range(C.shape[0])])  # (B, n, m)
    out = (P * cnt.unsqueeze(-1))[..., :k]
    out.backward(grad.to(out.dtype))
    return P.detach(), {"mu": mu, "nu": nu, "out": out, "xgrad": xl.grad}


def m_pot_sinkhorn(x, k, eps, grad, thr, max_iter):
    ot = peer_module("pot-sinkhorn")
    return _pot_per_row(x, k, eps, grad, thr, max_iter, lambda *a, **kw: ot.sinkhorn(*a, method="sinkhorn", warn=False, **kw))


def m_pot_log(x, k, eps, grad, thr, max_iter):
    ot = peer_module("pot-log")
    return _pot_per_row(x, k, eps, grad, thr, max_iter, lambda *a, **kw: ot.bregman.sinkhorn_log(*a, warn=False, **kw))


def m_pot_batch(x, k, eps, grad, thr, max_iter):
    ot = peer_module("pot-batch")
    xl = x.detach().requires_grad_()
    C, mu, nu, cnt = problem(xl, k)
    res = ot.batch.solve_batch(C, eps, a=mu, b=nu, max_iter=max_iter, tol=thr, method="log_sinkhorn", grad="autodiff")
    P = res.plan  # (B, n, m)
    out = (P * cnt.unsqueeze(-1))[..., :k]
    out.backward(grad.to(out.dtype))
    return P.detach(), {"mu": mu, "nu": nu, "out": out, "xgrad": xl.grad}


_OTT_FNS: dict[tuple, object] = {}


def _ott_compiled(k, n, eps, thr, max_iter, implicit):
    """jit(forward + vjp) of OTT's sort transport, vmapped over rows: z (B, n), upstream gradient
    of the plan (B, n, k + 1) -> plan (B, n, k + 1) (anchors ascending), gradient wrt z (B, n).
    ``implicit``: OTT's default implicit differentiation, else autodiff through the iterations.
    Cached, so that a setting compiles once."""
    key = (k, n, eps, thr, max_iter, implicit)
    if key not in _OTT_FNS:
        jax, soft_sort = peer_module("ott")
        jnp = jax.numpy
        a = jnp.full((n,), 1.0 / n)
        b = jnp.concatenate([jnp.array([(n - k) / n]), jnp.full((k,), 1.0 / n)])

        def plan(z):  # (n,) -> (n, k + 1)
            kw = {} if implicit else {"implicit_diff": None}
            out = soft_sort.transport_for_sort(
                z, a, b, squashing_fun=lambda v: v, epsilon=eps, threshold=thr, max_iterations=max_iter, **kw
            )
            return out.matrix

        def fb(z, g):
            P, vjp = jax.vjp(jax.vmap(plan), z)
            return P, vjp(g)[0]

        _OTT_FNS[key] = jax.jit(fb)
    return _OTT_FNS[key]


def m_ott(x, k, eps, grad, thr, max_iter, implicit=True):
    xl = x.detach().requires_grad_()
    xf = xl.float()
    hi, lo = xf.amax(-1, keepdim=True), xf.amin(-1, keepdim=True)  # (B, 1) each
    z = (xf - lo) / (hi - lo)  # (B, n): the normalised scores of build_problem (no mask, no floor)
    n = z.shape[-1]
    # our out[..., j] = n * P_ott[..., k - j]: OTT's anchors ascend, ours descend
    g = torch.cat([torch.zeros_like(z).unsqueeze(-1), grad.float().flip(-1)], -1) * n  # (B, n, k + 1)
    fb = _ott_compiled(k, n, float(eps), float(thr), int(max_iter), implicit)
    P, gz = fb(z.detach().numpy(), g.numpy())
    P.block_until_ready()
    gz.block_until_ready()
    z.backward(torch.from_numpy(peer_module("ott")[0].device_get(gz).copy()))
    P = torch.from_numpy(peer_module("ott")[0].device_get(P).copy()).flip(-1)  # (B, n, m), anchors descending as ours
    mu = torch.full_like(z, 1.0 / n)  # (B, n)
    nu = torch.cat([torch.full_like(z[:, :k], 1.0 / n), torch.full_like(z[:, :1], (n - k) / n)], -1)  # (B, m)
    return P, {"mu": mu, "nu": nu, "out": None, "xgrad": xl.grad}


def m_ott_unrolled(x, k, eps, grad, thr, max_iter):
    return m_ott(x, k, eps, grad, thr, max_iter, implicit=False)


PEER_FNS = {"pot-sinkhorn": m_pot_sinkhorn, "pot-log": m_pot_log, "pot-batch": m_pot_batch, "ott": m_ott, "ott-unrolled": m_ott_unrolled}


# --------------------------------------------------------------------------- grids

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
BASE_FNS = {
    "topk": m_topk,
    "ours-fwd": m_ours_fwd,
    "ours-fb": m_ours_fb,
    "unrolled": m_unrolled,
    "ref-plain": m_ref_plain,
    "ref-release": m_ref_release,
}
ALL_METHODS = (*BASE_FNS, *PEERS)
GRID_METHODS = {
    "default": tuple(BASE_FNS),
    "beam-search": ("topk", "ours-fwd", "ours-fb"),
    "peers": ("topk", "ours-fb", *PEERS),
}


@dataclass(frozen=True)
class Spec:
    """One cell: rows x n scores in ``dtype``, top k, eps."""

    rows: int
    k: int
    n: int
    eps: float
    dtype: str = "float32"

    def label(self) -> dict:
        return dict(rows=self.rows, k=self.k, n=self.n, eps=self.eps, dtype=self.dtype)


def grid_cells(grid, quick, epsilons=None):
    """(rows, k, n, eps) of ``grid``; ``epsilons`` replaces the grid's eps values."""
    if grid == "default":
        if quick:
            cells = [(BATCH, 4, 32, 0.1), (BATCH, 4, 32, 0.001), (BATCH, 10, 200, 0.01), (BATCH, 4, 4000, 0.1)]
        else:
            cells = [
                (BATCH, k, n, e)
                for full in (False, True)
                for k in (4, 5, 10)
                for n in [10000 * k if full else 2 * k * k]
                for e in (0.1, 0.01, 0.001)
            ]
    elif grid == "beam-search":
        rows, ks, vocab = ((8, 64), (4, 5), (8, 4, 800)) if quick else ((64, 256, 1024, 4096), (4, 5, 10), (64, 4, 8000))
        cells = [(r, k, 2 * k * k, 0.01) for k in ks for r in rows] + [(*vocab, 0.01)]
    else:
        rows, ks, eps = ((8,), (4,), (0.1,)) if quick else ((BATCH,), (4, 5, 10), (0.1, 0.01, 0.001))
        cells = [(r, k, 2 * k * k, e) for k in ks for r in rows for e in eps]
    if epsilons:
        cells = list(dict.fromkeys((r, k, n, e) for r, k, n, _ in cells for e in epsilons))
    return cells


# --------------------------------------------------------------------------- measurement


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    res = fn()
    sync(device)
    return (time.perf_counter() - t) * 1e3, res


def memory_run(fn, device):
    """One run under the saved-tensor hooks: (saved MB, CUDA peak MB or None, result, ms). Timed
    too, for the cells that run once."""
    base = None
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    with SavedBytes() as sb:
        ms, res = timed(fn, device)
    sb.add(res[1].get("out"))
    peak = None
    if device.type == "cuda":
        sync(device)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return sb.mb, peak, res, ms


def fmt_err(e):
    if e is None:
        return "-"
    return "NaN/inf" if not math.isfinite(e) else f"{e:.1e}"


def fmt_ms(t):
    if t is None:
        return "-"
    return f"{t:.3g}" if t < 100 else f"{t:.0f}"


@dataclass
class Cell:
    """The state of one cell while it is measured: inputs, the methods and what they gave."""

    spec: Spec
    x: torch.Tensor  # (rows, n) scores in spec.dtype
    grad: torch.Tensor  # (rows, n, k) upstream gradient in spec.dtype
    reps: int
    big: bool
    methods: list  # (name, fn(x, k, eps, grad))
    skip: dict
    notes: dict
    times: dict = None
    results: dict = None
    mem: dict = None
    errs: dict = None
    info_of: dict = None
    matched: str | None = None

    def call(self, fn, **kw):
        return fn(self.x, self.spec.k, self.spec.eps, self.grad, **kw)

    def active(self):
        return [(nm, fn) for nm, fn in self.methods if nm not in self.skip]


class Runner:
    def __init__(self, args, device):
        self.args = args
        self.device = device
        self.t0 = time.perf_counter()
        self.rows: list[dict] = []

    def elapsed(self):
        return time.perf_counter() - self.t0

    def over_budget(self, projected_s):
        a = self.args
        if a.cell_cap_s and projected_s > a.cell_cap_s:
            return f"skipped: projected {projected_s:.0f} s > cap {a.cell_cap_s:g} s"
        if a.budget_s and self.elapsed() + projected_s > a.budget_s:
            return f"skipped: projected {projected_s:.0f} s would overrun the run budget {a.budget_s:g} s"
        return None

    def probe_sinkhorn_s(self, c, kind):
        """Seconds projected for REF_ITERS iterations from a 2-iteration run (+ cost build and backward)."""
        fns = {
            "unrolled": lambda it: c.call(m_unrolled, n_iter=it),
            "ref-plain": lambda it: c.call(_ref, mode="plain", n_iter=it),
            "ref-release": lambda it: c.call(_ref, mode="release", n_iter=it),
        }
        t2, _ = timed(lambda: fns[kind](2), self.device)
        t4, _ = timed(lambda: fns[kind](4), self.device)
        per_iter = max(t4 - t2, 0.0) / 2
        return (t2 + per_iter * (REF_ITERS - 2)) / 1e3

    def unrolled_bytes_gb(self, c):
        with SavedBytes() as s1:
            c.call(m_unrolled, n_iter=1)
        with SavedBytes() as s2:
            c.call(m_unrolled, n_iter=2)
        per_iter = s2.mb - s1.mb
        return (s1.mb + per_iter * (REF_ITERS - 1)) / 1024, per_iter

    # ------------------------------------------------------------------ one cell

    def cell(self, spec: Spec):
        """Measures every method of the grid on one cell; returns (and keeps) its table rows."""
        c = self.new_cell(spec)
        if c.big and self.device.type == "cpu":
            self.budget_skips(c)
        self.calibrate_peers(c)
        self.measure(c)
        self.errors(c)
        self.match_ours(c)
        rows = self.make_rows(c)
        self.speedups(c, rows)
        self.rows.extend(rows)
        return rows

    def new_cell(self, spec):
        a, dev = self.args, self.device
        seed = 1000 * spec.k + spec.n + (0 if spec.rows == BATCH else 10**6 * spec.rows)  # the default grid's inputs as before
        g = torch.Generator().manual_seed(seed)
        dtype = DTYPES[spec.dtype]
        x = torch.randn(spec.rows, spec.n, generator=g).to(device=dev, dtype=dtype)
        grad = torch.randn(spec.rows, spec.n, spec.k, generator=g).to(device=dev, dtype=dtype)
        names = [nm for nm in a.methods if nm != "ref-release" or spec.eps <= 1e-2]
        skip = {}
        for nm in names:
            if nm in PEERS and peer_module(nm) is None:
                skip[nm] = NOT_INSTALLED
            elif nm.startswith("ott") and dev.type != "cpu":
                skip[nm] = "skipped: JAX runs on the CPU here (jax[cpu]); compare on --device cpu"
        methods = [(nm, PEER_FNS.get(nm) or BASE_FNS[nm]) for nm in names]
        big = spec.n >= a.big_n
        return Cell(spec, x, grad, 1 if big else a.reps, big, methods, skip, {nm: [] for nm in names})

    def budget_skips(self, c):
        """CPU, big cells: skip what the projections say would overrun the caps."""
        a, names = self.args, [nm for nm, _ in c.methods]
        if "ours-fwd" in names or "ours-fb" in names:
            # Ours: project from 8 rows (fwd+bwd ~ fwd); Sinkhorn kinds: 2 vs 4 iterations.
            t8, _ = timed(lambda: m_ours_fb(c.x[:8], c.spec.k, c.spec.eps, c.grad[:8]), self.device)
            reason = self.over_budget(t8 / 1e3 * c.spec.rows / 8)
            for nm in ("ours-fwd", "ours-fb"):
                if reason and nm in names:
                    c.skip[nm] = reason + " (from 8 rows)"
        if "unrolled" in names:
            gb, per_iter_mb = self.unrolled_bytes_gb(c)
            if gb > a.mem_cap_gb:
                per = f"{per_iter_mb:.0f} MB per iteration x {REF_ITERS}"
                c.skip["unrolled"] = f"skipped: would save {gb:.1f} GB for backward ({per}) > cap {a.mem_cap_gb:g} GB"
        for nm in ("unrolled", "ref-plain", "ref-release"):
            if nm in names and nm not in c.skip:
                reason = self.over_budget(self.probe_sinkhorn_s(c, nm))
                if reason:
                    c.skip[nm] = reason

    def measure(self, c):
        """Memory (and warm-up) run, untimed, when there are several repetitions, else in the one
        rep; then the repetitions, interleaved: A, B, C, A, B, C, ..."""
        dev, active = self.device, c.active()
        c.times, c.results, c.mem = {nm: [] for nm, _ in active}, {}, {}
        if c.reps > 1:
            for nm, fn in active:
                c.mem[nm] = memory_run(lambda fn=fn: c.call(fn), dev)[:3]
                c.results[nm] = c.mem[nm][2]
        for _ in range(c.reps):
            for nm, fn in active:
                if c.reps == 1:
                    mb, peak, res, t = memory_run(lambda fn=fn: c.call(fn), dev)
                    c.mem[nm], c.results[nm] = (mb, peak, res), res
                else:
                    t, _ = timed(lambda fn=fn: c.call(fn), dev)
                c.times[nm].append(t)

    def errors(self, c):
        c.errs, c.info_of = {}, {}
        for nm, _ in c.active():
            P, extra = c.results[nm]
            if "info" in extra:
                c.info_of[nm] = extra["info"]
                c.errs[nm] = extra["info"].marginal_error
            elif P is not None:
                c.errs[nm] = marginal_error(P, extra["mu"], extra["nu"])
                if not bool(torch.isfinite(P).all()):
                    c.notes[nm].append("plan has NaN/inf (plain-kernel underflow/overflow)")
                for f in dict.fromkeys(extra.get("flags", [])):
                    c.notes[nm].append(f)
                if bool(torch.isfinite(P).all()) and not bool(torch.isfinite(extra["xgrad"]).all()):
                    c.notes[nm].append("gradient has NaN/inf")

    def match_ours(self, c):
        """Ours again at the reference's error, if the reference is more accurate than ours."""
        ours_err = c.errs.get("ours-fb")
        ref_errs = [c.errs[r] for r in ("ref-plain", "ref-release") if r in c.errs and math.isfinite(c.errs[r])]
        if ours_err is None or not ref_errs or min(ref_errs) >= ours_err:
            return
        tol = max(min(ref_errs), 1e-6)
        name = f"ours-fb@tol={tol:.0e}"
        reason = None
        if c.big and self.device.type == "cpu":
            reason = self.over_budget(statistics.median(c.times["ours-fb"]) / 1e3 * 1.5)
        if reason:
            c.skip[name] = reason
            return
        ts = []
        for _ in range(c.reps):
            t, res = timed(lambda: c.call(m_ours_fb, tol=tol), self.device)
            ts.append(t)
        info = res[1]["info"]
        c.times[name], c.errs[name], c.info_of[name] = ts, info.marginal_error, info
        c.mem[name] = (c.mem["ours-fb"][0], None, None)
        c.notes[name] = ["timed after the interleaved reps (not interleaved)"]
        c.matched = name

    # ------------------------------------------------------------------ the peers at ours' error

    def calibrate_peers(self, c):
        """Tightens each installed peer's threshold until it reaches ours-fb's marginal error (see
        the module docstring) and puts the calibrated setting in the cell's method list."""
        peers = [nm for nm, _ in c.active() if nm in PEERS]
        if not peers:
            return
        target = c.call(m_ours_fb)[1]["info"].marginal_error
        for nm in peers:
            try:
                cap, cap_note = self.peer_cap(c, nm)
                thr, err, t = self.calibrate(c, nm, target, cap)
            except Exception as e:  # noqa: BLE001 - a peer's own failure is a result, reported in its row
                first = (str(e).strip().splitlines() or [""])[0][:160]
                if "linear solver returned non-finite" in str(e):
                    first = "OTT's implicit differentiation: its linear solve (lineax) returned NaN/inf"
                c.skip[nm] = f"failed: {type(e).__name__}: {first}"
                continue
            c.notes[nm].append(f"stopThr {thr:.0e}, <= {cap} it{cap_note}")
            if not err <= target:
                c.notes[nm].append(f"calibration did not reach ours' error {fmt_err(target)} (best {fmt_err(err)})")
            if nm.startswith("ott"):  # the calibration's time includes jit compilation; once more, warm
                t, _ = timed(lambda fn=PEER_FNS[nm], thr=thr, cap=cap: c.call(fn, thr=thr, max_iter=cap), self.device)
            reason = self.over_budget(t / 1e3 * (c.reps + 1)) if self.device.type == "cpu" else None
            if reason:
                c.skip[nm] = reason + " (from its calibration run)"
            fn = PEER_FNS[nm]
            c.methods = [
                (m, (lambda x, k, eps, grad, fn=fn, thr=thr, cap=cap: fn(x, k, eps, grad, thr, cap)) if m == nm else f)
                for m, f in c.methods
            ]

    def peer_cap(self, c, nm):
        """The peer's iteration cap and a note: --peer-max-iter, lowered for the POT methods
        (autograd through the iterations) so that their saved bytes stay under --mem-cap-gb."""
        cap = self.args.peer_max_iter
        if nm.startswith("ott"):  # JAX's memory is not torch's; the implicit one does not grow
            return cap, ""
        fn = PEER_FNS[nm]
        with SavedBytes() as s10:
            c.call(fn, thr=0.0, max_iter=10)
        with SavedBytes() as s20:
            c.call(fn, thr=0.0, max_iter=20)
        per_iter = max((s20.bytes - s10.bytes) / 10, 1.0)
        fit = int((self.args.mem_cap_gb * 2**30 - s10.bytes) / per_iter)
        if fit >= cap:
            return cap, ""
        return max(fit, 10), f" (memory cap {self.args.mem_cap_gb:g} GB)"

    def calibrate(self, c, nm, target, cap):
        """(threshold, error, ms of that run): the first threshold, from target / n down by 10x,
        whose plan reaches ``target``; else the best one (NaN plans and stalls end the search)."""
        fn, thr = PEER_FNS[nm], target / c.spec.n
        best = None
        for _ in range(self.args.peer_tries):
            t, (P, extra) = timed(lambda thr=thr: c.call(fn, thr=thr, max_iter=cap), self.device)
            err = marginal_error(P, extra["mu"], extra["nu"])
            prev = math.inf if best is None or not math.isfinite(best[1]) else best[1]
            if best is None or err < prev:
                best = (thr, err, t)
            if not math.isfinite(err) or err <= target or not err < prev / 2:
                break
            if self.device.type == "cpu" and self.over_budget(t / 1e3):  # a tighter try takes longer still
                break
            thr /= 10
        return best

    # ------------------------------------------------------------------ the table rows

    def make_rows(self, c):
        label = c.spec.label()
        order = [nm for nm, _ in c.methods] + ([c.matched] if c.matched else []) + [nm for nm in c.skip if nm.startswith("ours-fb@")]
        topk_ms = statistics.median(c.times["topk"]) if c.times.get("topk") else None
        rows = []
        for nm in order:
            row = dict(label, method=nm, reps=len(c.times.get(nm, [])))
            if nm in c.skip:
                rows.append(dict(row, skipped=c.skip[nm]))
                continue
            row.update(ms=statistics.median(c.times[nm]), times_ms=c.times[nm], saved_mb=c.mem[nm][0], cuda_peak_mb=c.mem[nm][1])
            row["x_topk"] = row["ms"] / topk_ms if topk_ms and nm != "topk" else None
            row["err"] = c.errs.get(nm)
            if nm in c.info_of:
                inf = c.info_of[nm]
                c.notes[nm].insert(0, f"{inf.iterations} it {inf.method}" + ("" if inf.converged else " NOT conv."))
            row["note"] = "; ".join(c.notes.get(nm, []))
            rows.append(row)
        return rows

    def speedups(self, c, rows):
        """Ours-fb's speed-up over each reference and peer row, at equal or smaller error."""
        ours = [nm for nm in ("ours-fb", c.matched) if nm and nm in c.times]
        for row in rows:
            if row["method"] not in ("ref-plain", "ref-release", "unrolled", *PEERS) or "skipped" in row:
                continue
            err = row["err"]
            if err is None or not math.isfinite(err):
                row["speedup"] = "n/a (plan NaN/inf)"
            elif not ours:
                row["speedup"] = "n/a (ours skipped)"
            elif row["method"] in PEERS:
                row["speedup"] = self.peer_speedup(c, row)
            else:
                row["speedup"] = self.ref_speedup(c, row, ours)

    def ref_speedup(self, c, row, ours):
        ok = [nm for nm in ours if c.errs[nm] <= row["err"]]
        if not ok:
            best = min(ours, key=lambda nm: c.errs[nm])
            raw = row["ms"] / statistics.median(c.times["ours-fb"])
            return f"n/a at equal error (ours err {fmt_err(c.errs[best])} > this; raw ratio {raw:.2g}x)"
        nm = ok[0]  # default tol first, the matched-tol run only if needed
        s = row["ms"] / statistics.median(c.times[nm])
        row["speedup_x"] = s
        return f"{s:.1f}x" + (" vs " + nm if nm != "ours-fb" else "") + (" (>=5x: yes)" if s >= 5 else " (>=5x: NO)")

    @staticmethod
    def peer_speedup(c, row):
        """A peer calibrated to ours' error: the ratio counts where it got there (it may win), or
        where it stopped short and still took longer (ours ahead: more accurate and faster)."""
        ours_err, s = c.errs["ours-fb"], row["ms"] / statistics.median(c.times["ours-fb"])
        if row["err"] <= ours_err:
            row["speedup_x"] = s
            return f"{s:.2g}x " + ("(PEER WINS)" if s < 1 else "(ours ahead)")
        if s >= 1:
            row["speedup_x"] = s
            return f">= {s:.2g}x (ours ahead: peer slower at a larger error)"
        return f"n/a at equal error (peer err {fmt_err(row['err'])} > ours {fmt_err(ours_err)}; raw ratio {s:.2g}x)"

    def memory_table(self, k=10, n=None, iters=(50, 100, 200, 400), eps=1e-3):
        """Saved-for-backward bytes vs iteration count: unrolled Sinkhorn vs ours (implicit)."""
        dev = self.device
        n = n or 2 * k * k
        g = torch.Generator().manual_seed(7)
        x = torch.randn(BATCH, n, generator=g).to(dev)
        grad = torch.randn(BATCH, n, k, generator=g).to(dev)
        rows = []
        for it in iters:
            mb, peak, (P, extra), _ = memory_run(lambda it=it: m_unrolled(x, k, eps, grad, n_iter=it), dev)
            t, _ = timed(lambda it=it: m_unrolled(x, k, eps, grad, n_iter=it), dev)
            err = marginal_error(P, extra["mu"], extra["nu"])
            rows.append(dict(method=f"unrolled log-domain Sinkhorn, {it} it", iters=it, saved_mb=mb, cuda_peak_mb=peak, err=err, ms=t))
        for e in (1e-1, 1e-2, 1e-3):
            mb, peak, (_, extra), _ = memory_run(lambda e=e: m_ours_fb(x, k, e, grad), dev)
            t, _ = timed(lambda e=e: m_ours_fb(x, k, e, grad), dev)
            info = extra["info"]
            rows.append(
                dict(
                    method=f"ours (implicit), eps {e:g}",
                    iters=info.iterations,
                    saved_mb=mb,
                    cuda_peak_mb=peak,
                    err=info.marginal_error,
                    ms=t,
                )
            )
        return dict(k=k, n=n, eps=eps, rows=rows)


# --------------------------------------------------------------------------- output


def main_table_md(rows, device):
    cuda = device.type == "cuda"
    head = (
        "| rows | k | n | eps | dtype | method | reps | median ms | x topk | saved MB |"
        + (" CUDA peak MB |" if cuda else "")
        + " marginal err | ours-fb speed-up vs this | notes |"
    )
    sep = "|" + "---|" * (head.count("|") - 1)
    out = [head, sep]
    for r in rows:
        cells = [r["rows"], r["k"], r["n"], f"{r['eps']:g}", r["dtype"], r["method"]]
        if "skipped" in r:
            cells += [0, "-", "-", "-"] + (["-"] if cuda else []) + ["-", "-", r["skipped"]]
        else:
            x_topk = "-" if r.get("x_topk") is None else f"{r['x_topk']:.2g}"
            cells += [r["reps"], fmt_ms(r["ms"]), x_topk, f"{r['saved_mb']:.1f}"]
            if cuda:
                cells.append("-" if r["cuda_peak_mb"] is None else f"{r['cuda_peak_mb']:.1f}")
            cells += [fmt_err(r.get("err")), r.get("speedup", ""), r.get("note", "")]
        out.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(out)


def memory_table_md(mt, device):
    cuda = device.type == "cuda"
    out = [
        f"Batch {BATCH}, k = {mt['k']}, n = {mt['n']}, float32; unrolled at eps {mt['eps']:g}; one run each.",
        "",
        "| method | solver iterations | saved MB |" + (" CUDA peak MB |" if cuda else "") + " marginal err | ms (1 run) |",
        "|---|---|---|" + ("---|" if cuda else "") + "---|---|",
    ]
    for r in mt["rows"]:
        cells = [r["method"], r["iters"], f"{r['saved_mb']:.1f}"]
        if cuda:
            cells.append("-" if r["cuda_peak_mb"] is None else f"{r['cuda_peak_mb']:.1f}")
        cells += [fmt_err(r["err"]), fmt_ms(r["ms"])]
        out.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(out)


def print_row(r):
    head = f"rows={r['rows']} k={r['k']} n={r['n']} eps={r['eps']:g} {r['dtype']} {r['method']:<16}"
    if "skipped" in r:
        print(f"{head} {r['skipped']}", flush=True)
        return
    x_topk = "" if r.get("x_topk") is None else f"({r['x_topk']:.2g}x topk)"
    print(
        f"{head} {fmt_ms(r['ms']):>8} ms {x_topk:>14}  saved {r['saved_mb']:8.1f} MB  "
        f"err {fmt_err(r.get('err')):>8}  {r.get('speedup', '')}  {r.get('note', '')}",
        flush=True,
    )


def _json_safe(value):
    """NaN and inf as strings (JSON has neither); containers recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(path, cmd, args, device, rows, mt, total):
    doc = dict(
        command=cmd,
        machine=machine_info(str(device)),
        grid=args.grid,
        dtypes=args.dtypes,
        methods=list(args.methods),
        total_s=total,
        rows=rows,
        memory_table=mt,
    )
    path.write_text(json.dumps(_json_safe(doc), indent=1) + "\n")


# --------------------------------------------------------------------------- command line


def _csv(choices, what):
    def parse(text):
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{what}: unknown {', '.join(bad) or '(empty)'}; choose from {', '.join(choices)}")
        return items

    return parse


def _epsilons(text):
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--epsilons: not a comma-separated list of numbers: {text!r}") from None
    if not values or not all(0 < v < math.inf for v in values):
        raise argparse.ArgumentTypeError(f"--epsilons: each eps must be a finite number > 0, got {text!r}")
    return values


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", choices=list(GRID_METHODS), default="default", help="which cells (see above)")
    p.add_argument("--quick", action="store_true", help="shrink the grid to a smoke size (< 1 minute on a CPU)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per cell (n < --big-n)")
    p.add_argument("--dtypes", type=_csv(list(DTYPES), "--dtypes"), default=["float32"], help="input dtypes, comma-separated")
    p.add_argument("--epsilons", type=_epsilons, default=None, help="replace the grid's eps values (comma-separated)")
    p.add_argument("--methods", type=_csv(ALL_METHODS, "--methods"), default=None, help="methods, comma-separated (default: the grid's)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--markdown", type=Path, help="write the tables as markdown to this file")
    p.add_argument("--json", type=Path, help="write the raw figures of every row as JSON to this file")
    p.add_argument("--big-n", type=int, default=10000, help="cells with n >= this run 1 repetition")
    p.add_argument(
        "--cell-cap-s",
        type=float,
        default=None,
        help="skip a method in a cell whose projected time exceeds this (CPU; default 45, 0 = none)",
    )
    p.add_argument(
        "--budget-s", type=float, default=None, help="skip heavy methods that would overrun this total (CPU; default 840, 0 = none)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default 1 on CPU: on a shared machine, OpenMP threads competing "
        "with other jobs made runs up to 10x slower and very noisy)",
    )
    p.add_argument("--mem-cap-gb", type=float, default=4.0, help="skip unrolled autograd saving more than this")
    p.add_argument(
        "--peer-max-iter", type=int, default=20000, help="iteration cap of the peers' Sinkhorn (default 20000; 300 with --quick)"
    )
    p.add_argument("--peer-tries", type=int, default=6, help="thresholds tried per peer and cell, each 10x tighter")
    args = p.parse_args(argv)
    if args.reps < 1 or args.peer_max_iter < 10 or args.peer_tries < 1:
        p.error("--reps and --peer-tries must be >= 1, --peer-max-iter >= 10")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    return args


def configure(args):
    """Fills the device-dependent defaults in ``args``; returns the device."""
    device = torch.device(args.device)
    cpu = device.type == "cpu"
    if args.cell_cap_s is None:
        args.cell_cap_s = 45.0 if cpu else 0.0
    if args.budget_s is None:
        args.budget_s = 840.0 if cpu else 0.0
    if args.threads is None:
        args.threads = 1 if cpu else torch.get_num_threads()
    if args.methods is None:
        args.methods = list(GRID_METHODS[args.grid])
    if args.quick:
        args.reps = min(args.reps, 3)
        args.peer_max_iter = min(args.peer_max_iter, 300)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return device


def main(argv=None):
    args = parse_args(argv)
    device = configure(args)
    cmd = "python scripts/bench_soft_topk.py " + " ".join(sys.argv[1:] if argv is None else argv)
    header = machine_description(device)
    print(
        f"# {cmd}\n# {header}\n# grid {args.grid}, dtypes {','.join(args.dtypes)}, reps {args.reps} (1 for n >= {args.big_n}), "
        f"cell cap {args.cell_cap_s:g} s, budget {args.budget_s:g} s, mem cap {args.mem_cap_gb:g} GB",
        flush=True,
    )
    runner = Runner(args, device)
    for rows, k, n, eps in grid_cells(args.grid, args.quick, args.epsilons):
        for dtype in args.dtypes:
            for r in runner.cell(Spec(rows, k, n, eps, dtype)):
                print_row(r)
            print(f"  [{runner.elapsed():.0f} s elapsed]", flush=True)
    mt = None
    if args.grid == "default":
        mt = runner.memory_table(**(dict(k=4, iters=(50, 100, 200)) if args.quick else dict(k=10)))
    table = main_table_md(runner.rows, device)
    mtable = "" if mt is None else "\n\n### Backward memory vs iteration count\n\n" + memory_table_md(mt, device)
    total = runner.elapsed()
    print("\n" + table + mtable + f"\n\ntotal {total:.0f} s", flush=True)
    if args.markdown:
        args.markdown.write_text(
            f"Command: `{cmd}`\n\nMachine: {header}\n\nTotal run time: {total:.0f} s\n\n### Main table\n\n{table}{mtable}\n"
        )
    if args.json:
        write_json(args.json, cmd, args, device, runner.rows, mt, total)
    return 0


if __name__ == "__main__":
    sys.exit(main())
