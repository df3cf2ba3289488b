"""Benchmark of the SOFT top-k operator (``soft_beam.sorted_soft_topk``) at beam-search shapes.

    python scripts/bench_soft_topk.py [--quick] [--reps N] [--device cpu|cuda] [--markdown PATH]

For batch 64, beam k in {4, 5, 10}, candidates n = 2 k^2 (pruned) and n = 10000 k (full
vocabulary), epsilon in {0.1, 0.01, 0.001}, float32, it times, side by side and interleaved
(A, B, C, A, B, C, ... repetitions; medians):

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

All methods use the same per-row cost as ``soft_beam.topk`` (min-max normalised scores, anchors
1, 1 - 1/k, ..., 0, masses 1/n and (n - k)/n), so rows never see each other.

Columns: median time; memory ("saved MB": bytes of the distinct storages that autograd saves for
backward, counted with torch.autograd.graph.saved_tensors_hooks, plus the output; on CUDA also the
peak of torch.cuda.max_memory_allocated above the inputs); the marginal error of the method's plan,
relative, max over rows of max(|P 1 / mu - 1|, |P^T 1 / nu - 1|) (ours and the unrolled solver have
P 1 = mu by construction, so this is SolverInfo.marginal_error; the reference ends on a column
update, so its error is in the rows); the speed-up of ours-fb over each reference row, counted only
where ours reaches an equal or smaller marginal error.

Budget (CPU): a slow method in a cell is first probed (a few Sinkhorn iterations, or ours on 8 of
the 64 rows) and skipped, with the projected time in the table, when the projection exceeds
--cell-cap-s, or the run's --budget-s would be overrun; cells with n >= --big-n run one repetition;
the unrolled solver is skipped when the bytes it would save exceed --mem-cap-gb. Nothing is
dropped silently: every skipped measurement is a row with its reason.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_common import SavedBytes, machine_description, sync

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from soft_beam import sorted_soft_topk  # noqa: E402
from soft_beam.ot import plan_from_potentials, sinkhorn_potentials  # noqa: E402
from soft_beam.topk import build_problem  # noqa: E402

BATCH = 64
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
    out.backward(grad)
    return P.detach(), {"mu": mu, "nu": nu, "out": out, "xgrad": xl.grad}


def _ref(x, k, eps, grad, mode, n_iter=REF_ITERS):
    xl = x.detach().requires_grad_()
    C, mu, nu, cnt = problem(xl, k)
    flags: list[str] = []
    gamma = RefTopKFunc.apply(C, mu.unsqueeze(-1), nu.unsqueeze(1), eps, n_iter, mode, flags)
    out = (gamma * cnt.unsqueeze(-1))[..., :k]
    out.backward(grad)
    return gamma.detach(), {"mu": mu, "nu": nu, "flags": flags, "out": out, "xgrad": xl.grad}


def m_ref_plain(x, k, eps, grad):
    return _ref(x, k, eps, grad, "plain")


def m_ref_release(x, k, eps, grad):
    return _ref(x, k, eps, grad, "release")


# --------------------------------------------------------------------------- measurement


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    res = fn()
    sync(device)
    return (time.perf_counter() - t) * 1e3, res


def memory_run(fn, device):
    """One untimed run under the saved-tensor hooks; returns (saved MB, cuda peak MB or None, res)."""
    base = None
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    with SavedBytes() as sb:
        res = fn()
    sb.add(res[1].get("out"))
    peak = None
    if device.type == "cuda":
        sync(device)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return sb.mb, peak, res


def fmt_err(e):
    if e is None:
        return "-"
    return "NaN/inf" if not math.isfinite(e) else f"{e:.1e}"


def fmt_ms(t):
    if t is None:
        return "-"
    return f"{t:.3g}" if t < 100 else f"{t:.0f}"


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

    def probe_sinkhorn_s(self, x, k, eps, grad, kind):
        """Seconds projected for REF_ITERS iterations from a 2-iteration run (+ cost build and backward)."""
        fns = {
            "unrolled": lambda it: m_unrolled(x, k, eps, grad, n_iter=it),
            "ref-plain": lambda it: _ref(x, k, eps, grad, "plain", n_iter=it),
            "ref-release": lambda it: _ref(x, k, eps, grad, "release", n_iter=it),
        }
        t2, _ = timed(lambda: fns[kind](2), self.device)
        t4, _ = timed(lambda: fns[kind](4), self.device)
        per_iter = max(t4 - t2, 0.0) / 2
        return (t2 + per_iter * (REF_ITERS - 2)) / 1e3

    def unrolled_bytes_gb(self, x, k, eps, grad):
        with SavedBytes() as s1:
            m_unrolled(x, k, eps, grad, n_iter=1)
        with SavedBytes() as s2:
            m_unrolled(x, k, eps, grad, n_iter=2)
        per_iter = s2.mb - s1.mb
        return (s1.mb + per_iter * (REF_ITERS - 1)) / 1024, per_iter

    def cell(self, k, n, eps):
        a, dev = self.args, self.device
        g = torch.Generator().manual_seed(1000 * k + n)
        x = torch.randn(BATCH, n, generator=g).to(dev)
        grad = torch.randn(BATCH, n, k, generator=g).to(dev)
        big = n >= a.big_n
        reps = 1 if big else a.reps
        label = dict(k=k, n=n, eps=eps)
        methods = [("topk", m_topk), ("ours-fwd", m_ours_fwd), ("ours-fb", m_ours_fb), ("unrolled", m_unrolled), ("ref-plain", m_ref_plain)]
        if eps <= 1e-2:
            methods.append(("ref-release", m_ref_release))
        skip: dict[str, str] = {}
        notes: dict[str, list[str]] = {name: [] for name, _ in methods}
        if big and dev.type == "cpu":
            # Ours: project from 8 of the 64 rows (fwd+bwd ~ fwd); Sinkhorn kinds: 2 vs 4 iterations.
            t8, _ = timed(lambda: m_ours_fb(x[:8], k, eps, grad[:8]), dev)
            proj = t8 / 1e3 * BATCH / 8
            for name in ("ours-fwd", "ours-fb"):
                reason = self.over_budget(proj)
                if reason:
                    skip[name] = reason + " (from 8 rows)"
            gb, per_iter_mb = self.unrolled_bytes_gb(x, k, eps, grad)
            if gb > a.mem_cap_gb:
                skip["unrolled"] = (
                    f"skipped: would save {gb:.1f} GB for backward "
                    f"({per_iter_mb:.0f} MB per iteration x {REF_ITERS}) > cap {a.mem_cap_gb:g} GB"
                )
            for name in ("unrolled", "ref-plain", "ref-release"):
                if name in skip or name not in dict(methods):
                    continue
                reason = self.over_budget(self.probe_sinkhorn_s(x, k, eps, grad, name))
                if reason:
                    skip[name] = reason
        active = [(nm, fn) for nm, fn in methods if nm not in skip]
        times: dict[str, list[float]] = {nm: [] for nm, _ in active}
        results = {}
        mem = {}
        # Memory (and warm-up) run, untimed, when there are several repetitions; else in the one rep.
        if reps > 1:
            for nm, fn in active:
                mem[nm] = memory_run(lambda fn=fn: fn(x, k, eps, grad), dev)
                results[nm] = mem[nm][2]
        for _ in range(reps):
            for nm, fn in active:  # interleaved: A, B, C, A, B, C, ...
                if reps == 1:
                    if dev.type == "cuda":
                        sync(dev)
                        base = torch.cuda.memory_allocated(dev)
                        torch.cuda.reset_peak_memory_stats(dev)
                    with SavedBytes() as sb:
                        t, res = timed(lambda fn=fn: fn(x, k, eps, grad), dev)
                    sb.add(res[1].get("out"))
                    peak = (torch.cuda.max_memory_allocated(dev) - base) / 2**20 if dev.type == "cuda" else None
                    mem[nm] = (sb.mb, peak, res)
                    results[nm] = res
                else:
                    t, res = timed(lambda fn=fn: fn(x, k, eps, grad), dev)
                times[nm].append(t)
        # Errors.
        errs, info_of = {}, {}
        for nm, _ in active:
            P, extra = results[nm]
            if "info" in extra:
                info_of[nm] = extra["info"]
                errs[nm] = extra["info"].marginal_error
            elif P is not None:
                errs[nm] = marginal_error(P, extra["mu"], extra["nu"])
                if not bool(torch.isfinite(P).all()):
                    notes[nm].append("plan has NaN/inf (plain-kernel underflow/overflow)")
                for f in dict.fromkeys(extra.get("flags", [])):
                    notes[nm].append(f)
                if bool(torch.isfinite(P).all()) and not bool(torch.isfinite(extra["xgrad"]).all()):
                    notes[nm].append("gradient has NaN/inf")
        # Ours again at the reference's error, if the reference is more accurate than ours.
        ours_err = errs.get("ours-fb")
        ref_errs = [errs[r] for r in ("ref-plain", "ref-release") if r in errs and math.isfinite(errs[r])]
        matched = None
        if ours_err is not None and ref_errs and min(ref_errs) < ours_err:
            tol = max(min(ref_errs), 1e-6)
            name = f"ours-fb@tol={tol:.0e}"
            reason = None
            if big and dev.type == "cpu":
                reason = self.over_budget(statistics.median(times["ours-fb"]) / 1e3 * 1.5)
            if reason:
                skip[name] = reason
            else:
                ts = []
                for _ in range(reps):
                    t, res = timed(lambda: m_ours_fb(x, k, eps, grad, tol=tol), dev)
                    ts.append(t)
                info = res[1]["info"]
                times[name] = ts
                errs[name] = info.marginal_error
                info_of[name] = info
                mem[name] = (mem["ours-fb"][0], None, None)
                notes[name] = ["timed after the interleaved reps (not interleaved)"]
                matched = name
        # Rows.
        order = [nm for nm, _ in methods] + ([matched] if matched else []) + [nm for nm in skip if nm.startswith("ours-fb@")]
        for nm in order:
            row = dict(label, method=nm, reps=len(times.get(nm, [])))
            if nm in skip:
                row.update(skipped=skip[nm])
                self.rows.append(row)
                continue
            row["ms"] = statistics.median(times[nm])
            row["saved_mb"] = mem[nm][0]
            row["cuda_peak_mb"] = mem[nm][1]
            row["err"] = errs.get(nm)
            if nm in info_of:
                inf = info_of[nm]
                notes[nm].insert(0, f"{inf.iterations} it {inf.method}" + ("" if inf.converged else " NOT conv."))
            row["note"] = "; ".join(notes.get(nm, []))
            self.rows.append(row)
        # Speed-ups of ours over each reference row, at equal or smaller error.
        ours_candidates = [nm for nm in ("ours-fb", matched) if nm and nm in times]
        for row in self.rows[-len(order) :]:
            if row["method"] not in ("ref-plain", "ref-release", "unrolled") or "skipped" in row:
                continue
            ref_err = row["err"]
            ok = [nm for nm in ours_candidates if ref_err is not None and math.isfinite(ref_err) and errs[nm] <= ref_err]
            if ref_err is None or not math.isfinite(ref_err):
                row["speedup"] = "n/a (reference plan NaN/inf)"
            elif not ok:
                best = min(ours_candidates, key=lambda nm: errs[nm]) if ours_candidates else None
                row["speedup"] = (
                    (
                        f"n/a at equal error (ours err {fmt_err(errs[best])} > ref; raw ratio "
                        f"{row['ms'] / statistics.median(times['ours-fb']):.2g}x)"
                    )
                    if best
                    else "n/a (ours skipped)"
                )
            else:
                nm = ok[0]  # default tol first, the matched-tol run only if needed
                s = row["ms"] / statistics.median(times[nm])
                row["speedup"] = f"{s:.1f}x" + (" vs " + nm if nm != "ours-fb" else "") + (" (>=5x: yes)" if s >= 5 else " (>=5x: NO)")
        return [r for r in self.rows[-len(order) :]]

    def memory_table(self, k=10, n=None, iters=(50, 100, 200, 400), eps=1e-3):
        """Saved-for-backward bytes vs iteration count: unrolled Sinkhorn vs ours (implicit)."""
        dev = self.device
        n = n or 2 * k * k
        g = torch.Generator().manual_seed(7)
        x = torch.randn(BATCH, n, generator=g).to(dev)
        grad = torch.randn(BATCH, n, k, generator=g).to(dev)
        rows = []
        for it in iters:
            mb, peak, (P, extra) = memory_run(lambda it=it: m_unrolled(x, k, eps, grad, n_iter=it), dev)
            t, _ = timed(lambda it=it: m_unrolled(x, k, eps, grad, n_iter=it), dev)
            rows.append(
                dict(
                    method=f"unrolled log-domain Sinkhorn, {it} it",
                    iters=it,
                    saved_mb=mb,
                    cuda_peak_mb=peak,
                    err=marginal_error(P, extra["mu"], extra["nu"]),
                    ms=t,
                )
            )
        for e in (1e-1, 1e-2, 1e-3):
            mb, peak, (_, extra) = memory_run(lambda e=e: m_ours_fb(x, k, e, grad), dev)
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
        "| k | n | eps | method | reps | median ms | saved MB |"
        + (" CUDA peak MB |" if cuda else "")
        + " marginal err | ours-fb speed-up vs this | notes |"
    )
    sep = "|" + "---|" * (head.count("|") - 1)
    out = [head, sep]
    for r in rows:
        if "skipped" in r:
            cells = [r["k"], r["n"], f"{r['eps']:g}", r["method"], 0, "-", "-"] + (["-"] if cuda else []) + ["-", "-", r["skipped"]]
        else:
            cells = [r["k"], r["n"], f"{r['eps']:g}", r["method"], r["reps"], fmt_ms(r["ms"]), f"{r['saved_mb']:.1f}"]
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small subset for a smoke run (< 1 minute)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per cell (n < --big-n)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--markdown", type=Path, help="write the tables as markdown to this file")
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
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    if args.cell_cap_s is None:
        args.cell_cap_s = 45.0 if device.type == "cpu" else 0.0
    if args.budget_s is None:
        args.budget_s = 840.0 if device.type == "cpu" else 0.0
    if args.threads is None:
        args.threads = 1 if device.type == "cpu" else torch.get_num_threads()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    if args.quick:
        grid = [(4, 2 * 4 * 4, e) for e in (0.1, 0.001)] + [(10, 200, 0.01), (4, 4000, 0.1)]
        args.reps = min(args.reps, 3)
        mem_kw = dict(k=4, iters=(50, 100, 200))
    else:
        grid = [
            (k, n, e)
            for n_kind in ("pruned", "full")
            for k in (4, 5, 10)
            for n in [2 * k * k if n_kind == "pruned" else 10000 * k]
            for e in (0.1, 0.01, 0.001)
        ]
        mem_kw = dict(k=10)

    cmd = "python scripts/bench_soft_topk.py " + " ".join(sys.argv[1:] if argv is None else argv)
    header = machine_description(device)
    print(
        f"# {cmd}\n# {header}\n# batch {BATCH}, float32, reps {args.reps} (1 for n >= {args.big_n}), "
        f"cell cap {args.cell_cap_s:g} s, budget {args.budget_s:g} s, unrolled mem cap {args.mem_cap_gb:g} GB",
        flush=True,
    )
    runner = Runner(args, device)
    for k, n, eps in grid:
        rows = runner.cell(k, n, eps)
        for r in rows:
            if "skipped" in r:
                print(f"k={k} n={n} eps={eps:g} {r['method']:<16} {r['skipped']}", flush=True)
            else:
                print(
                    f"k={k} n={n} eps={eps:g} {r['method']:<16} {fmt_ms(r['ms']):>8} ms  "
                    f"saved {r['saved_mb']:8.1f} MB  "
                    f"err {fmt_err(r.get('err')):>8}  {r.get('speedup', '')}  {r.get('note', '')}",
                    flush=True,
                )
        print(f"  [{runner.elapsed():.0f} s elapsed]", flush=True)
    mt = runner.memory_table(**mem_kw)
    table = main_table_md(runner.rows, device)
    mtable = memory_table_md(mt, device)
    total = runner.elapsed()
    print("\n" + table + "\n\n" + mtable + f"\n\ntotal {total:.0f} s", flush=True)
    if args.markdown:
        args.markdown.write_text(
            f"Command: `{cmd}`\n\nMachine: {header}\n\nTotal run time: {total:.0f} s\n\n"
            f"### Main table\n\n{table}\n\n### Backward memory vs iteration count\n\n{mtable}\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
