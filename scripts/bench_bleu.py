"""BLEU benchmark: soft-beam fine-tuning vs. compute-matched MLE and MRT on Multi30k en->de.

    python scripts/bench_bleu.py [--seeds 3] [--mle-updates N | --base CKPT] [--continue-updates N] [--work DIR]

Protocol (every step is skipped on a re-run when its outputs exist, so an interrupted run resumes):

1. data: data_prep/prepare-multi30k.sh --tgt de (joint sentencepiece, raw files from --raw-dir,
   default <repo>/../shared/data/multi30k, never downloaded; every standard test set found there, or
   --test-sets) into WORK/data.
2. base: scripts/train_mle.sh trains a small transformer with label-smoothed MLE for --mle-updates
   updates (seed 1), with --eval-bleu validation every --mle-validate-every updates; trained once and
   shared by every arm and seed. --base CKPT uses a checkpoint trained before instead (never retrained).
3. per seed, from the base (--finetune-from-model: weights only, same fresh optimizer and the same
   fixed learning rate --continue-lr for every arm), --continue-updates more updates of:
   ``mle`` (scripts/train_mle.sh: the compute-matched baseline), ``mrt`` (scripts/finetune_soft_beam.sh
   with the risk loss over the hard search, epsilon 0: classical minimum-risk training) and
   ``soft_hamming`` / ``soft_risk`` (the same script with --beam-loss hamming / risk over the soft search),
   validation BLEU (--beam) every --validate-every updates.
4. evaluation of each last checkpoint on every prepared test set with scripts/evaluate.py --test-set all
   at --beam, with a sweep over --sweep-beams: sacreBLEU BLEU (with signature), chrF, lowercased BLEU,
   length ratio.
5. significance: per test set, scripts/compare.py (paired bootstrap and approximate randomisation) of
   every arm against the same seed's ``mle``, and of the soft arms against the same seed's ``mrt``;
   then once more on the hypotheses pooled over seeds. JSONs under WORK/compare/SET/.
6. report: per arm mean/std over seeds of BLEU and chrF, seconds per update (fairseq's train_wall summed
   over the run / updates), ratio to the MLE arm, peak RSS of the training process (wait4 rusage); per
   arm and test set the scores, the beam sweep and the p-values; validation BLEU over updates (PNG);
   written to --results (markdown) and --json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_common import machine_info, model_flags

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
DEFAULT_RAW = ROOT.parent / "shared" / "data" / "multi30k"

# The default model is train_mle.sh's small transformer, passed explicitly so that results.md shows it;
# --tiny is for smoke tests only (seconds per update on a CPU, meaningless BLEU).
SMALL_ARCH = model_flags("small")
TINY_ARCH = model_flags("tiny")

ARM_LABELS = {
    "mle_base": "MLE base (start of the continuations)",
    "mle": "MLE, continued (compute-matched baseline)",
    "mrt": "MRT (risk loss, hard beam search)",
    "soft_hamming": "soft beam, hamming loss",
    "soft_risk": "soft beam, risk loss",
}
PUBLISHED = "~37-41 BLEU (text-only transformer baselines on Multi30k en-de test2016 in the 2020-2022 multimodal MT literature)"


class BenchError(Exception):
    pass


# ---------------------------------------------------------------- subprocess with peak memory


def run_logged(cmd: list, log: Path, env: dict | None = None) -> dict:
    """Runs cmd, appending its output to log; returns wall time and the peak RSS (MiB) of the process
    (and its waited-for descendants) from wait4's rusage. Raises BenchError with the log tail on failure.

    Linux starts a child's peak RSS at this process's RSS when it spawns the child (exec keeps the old
    address space's high-water mark), so this process must stay small until the children have run: it
    does not import torch (see cuda_available) or fairseq before then."""
    cmd = [str(c) for c in cmd]
    log.parent.mkdir(parents=True, exist_ok=True)
    full_env = dict(os.environ, PYTHONWARNINGS="ignore", **(env or {}))
    shown_env = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
    line = (shown_env + " " if shown_env else "") + shlex.join(cmd)
    print(f"[bench] running: {line}\n[bench]   log: {log}", flush=True)
    t0 = time.monotonic()
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"\n### bench_bleu {dt.datetime.now().isoformat(timespec='seconds')}: {line}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=full_env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-40:])
        raise BenchError(f"{cmd[0]} exited {proc.returncode} (log {log}):\n{tail}")
    return {"command": line, "wall_s": wall, "max_rss_mib": usage.ru_maxrss / 1024.0}


# ---------------------------------------------------------------- fairseq json logs


def parse_fairseq_log(text: str) -> dict:
    """train epoch records, train_inner records and valid records of a --log-format json log."""
    out = {"train": [], "train_inner": [], "valid": []}
    for line in text.splitlines():
        for tag in out:
            marker = f"| {tag} | "
            if marker in line:
                try:
                    rec = json.loads(line.split(marker, 1)[1])
                except ValueError:
                    continue
                prefix = tag + "_" if tag != "train_inner" else ""
                out[tag].append({(k[len(prefix) :] if prefix and k.startswith(prefix) else k): v for k, v in rec.items()})
    return out


def num(x):
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def train_stats(log_text: str) -> dict:
    recs = parse_fairseq_log(log_text)
    train = recs["train"]
    updates = max([int(num(r.get("num_updates")) or 0) for r in train + recs["train_inner"]] or [0])
    train_wall = sum(num(r.get("train_wall")) or 0.0 for r in train)
    valid = []
    for r in recs["valid"]:
        u, b = num(r.get("num_updates")), num(r.get("bleu"))
        if u is not None:
            valid.append({"num_updates": int(u), "bleu": b, "loss": num(r.get("loss"))})
    last_inner = recs["train_inner"][-1] if recs["train_inner"] else {}
    keys = ("loss", "nll_loss", "beam_loss", "top_bleu", "solver_iters", "marginal_err", "search_steps")
    return {
        "num_updates": updates,
        "train_wall_s": train_wall,
        "sec_per_update": train_wall / updates if updates and train_wall > 0 else None,
        "valid": valid,
        "last_train_inner": {k: num(last_inner.get(k)) for k in keys if k in last_inner},
    }


# ---------------------------------------------------------------- steps


def prepare_data(args) -> Path:
    data = args.work / "data"
    cmd = [
        "bash",
        ROOT / "data_prep" / "prepare-multi30k.sh",
        "--tgt",
        "de",
        "--out",
        data,
        "--raw-dir",
        args.raw_dir,
        "--no-download",
        "--vocab-size",
        args.vocab_size,
        "--workers",
        args.workers,
    ]
    if args.subset:
        cmd += ["--subset", args.subset]
    if args.test_sets:
        cmd += ["--test-sets", args.test_sets]
    env = {
        "PYTHON": PYTHON,
        "FAIRSEQ_PREPROCESS": str(Path(PYTHON).parent / "fairseq-preprocess"),
        "PATH": f"{Path(PYTHON).parent}:{os.environ.get('PATH', '')}",
    }
    if not (Path(PYTHON).parent / "fairseq-preprocess").exists():
        env.pop("FAIRSEQ_PREPROCESS")
    run_logged(cmd, args.work / "logs" / "prepare.log", env)  # it skips its own finished steps
    return data


def eval_bleu_args(args, every: int) -> list[str]:
    return [
        "--eval-bleu",
        "--eval-bleu-args",
        json.dumps({"beam": args.beam, "max_len_a": args.eval_max_len_a, "max_len_b": args.eval_max_len_b}),
        "--eval-bleu-detok",
        "space",
        "--eval-bleu-remove-bpe",
        "sentencepiece",
        "--validate-interval-updates",
        str(every),
        "--validate-interval",
        "1000000",
        "--max-tokens-valid",
        str(args.max_tokens_valid),
    ] + (["--batch-size-valid", str(args.max_valid_sentences), "--max-valid-steps", "1"] if args.max_valid_sentences else [])


def common_env(args, seed: int, updates: int) -> dict:
    return {
        "ARCH_ARGS": args.arch_args,
        "SEED": str(seed),
        "MAX_UPDATE": str(updates),
        "MAX_TOKENS": str(args.max_tokens),
        "DEVICE_ARGS": "" if args.gpu else "--cpu",
        "LOG_INTERVAL": str(args.log_interval),
        "LOG_FORMAT": "json",
    }


def train_run(args, name: str, save: Path, cmd: list, env: dict, updates: int) -> dict:
    """Runs (or reuses) one training run; returns its stats, also saved as save/run.json."""
    marker = save / "run.json"
    if marker.is_file() and (save / "checkpoint_last.pt").is_file():
        stats = json.loads(marker.read_text())
        if stats.get("num_updates", 0) >= updates:
            print(f"[bench] {name}: done before ({marker}), reusing", flush=True)
            return stats
    log = save / "train.log"
    proc = run_logged(cmd, log, env)
    stats = train_stats(log.read_text(encoding="utf-8", errors="replace"))
    stats.update(
        name=name,
        command=proc["command"],
        process_wall_s=proc["wall_s"],
        max_rss_mib=proc["max_rss_mib"],
        checkpoint=str(save / "checkpoint_last.pt"),
        log=str(log),
    )
    if stats["num_updates"] < updates or not (save / "checkpoint_last.pt").is_file():
        raise BenchError(f"{name}: expected {updates} updates and {save}/checkpoint_last.pt; log says {stats['num_updates']} ({log})")
    marker.write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def cached_eval(args, checkpoint: Path, out: Path) -> dict | None:
    """out's evaluation if it is of this checkpoint, with today's test sets and beams, and newer than the
    checkpoint; else None. The JSON is evaluate.py's last write, so it exists only for a finished run."""
    try:
        result = json.loads(out.read_text())
        fresh = out.stat().st_mtime >= checkpoint.stat().st_mtime
    except (OSError, ValueError):
        return None
    same = (
        Path(result.get("checkpoint", "")) == checkpoint.resolve()
        and result.get("beam") == args.beam
        and result.get("beams") == args.sweep_beams
        and list(result.get("sets") or {}) == args.test_set_names
    )
    return result if fresh and same else None


def evaluate(args, data: Path, checkpoint: Path, out: Path, reuse: tuple[Path, ...] = ()) -> dict:
    """Every prepared test set at --beam, with the --sweep-beams sweep; out (or a valid one of reuse) is the cache."""
    for cached in (out, *reuse):
        result = cached_eval(args, checkpoint, cached)
        if result is not None:
            print(f"[bench] evaluation of {checkpoint}: done before ({cached}), reusing", flush=True)
            return result
    cmd = [
        PYTHON, ROOT / "scripts" / "evaluate.py", "--data", data, "--checkpoint", checkpoint,
        "--test-set", "all", "--beam", args.beam, "--beams", ",".join(map(str, args.sweep_beams)),
        "--lenpen", "1.0", "--max-len-a", args.eval_max_len_a, "--max-len-b", args.eval_max_len_b,
        "--task", "translation_soft_beam", "--output", out,
        # no JSON means no finished evaluation: hypotheses left by a killed or older run are replaced
        "--overwrite",
    ]  # fmt: skip
    if not args.gpu:
        cmd.append("--cpu")
    proc = run_logged(cmd, out.with_suffix(".log"))
    result = json.loads(out.read_text()) | {"process_wall_s": proc["wall_s"]}
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def base_run(args, data: Path) -> tuple[dict, Path]:
    """The MLE base: trained once into WORK/mle_base, or the checkpoint given by --base (never retrained)."""
    if args.base is None:
        base_dir = args.work / "mle_base"
        env = common_env(args, 1, args.mle_updates) | {"LR": str(args.mle_lr), "WARMUP": str(args.mle_warmup)}
        cmd = ["bash", ROOT / "scripts" / "train_mle.sh", data, base_dir,
               *eval_bleu_args(args, args.mle_validate_every), *shlex.split(args.train_extra)]  # fmt: skip
        return train_run(args, "mle_base", base_dir, cmd, env, args.mle_updates), base_dir / "checkpoint_last.pt"
    ckpt = args.base
    print(f"[bench] mle_base: --base {ckpt}, not trained here", flush=True)
    stats = {"name": "mle_base", "num_updates": None, "sec_per_update": None, "process_wall_s": 0.0, "max_rss_mib": None,
             "valid": [], "last_train_inner": {}, "command": f"(--base {ckpt}: trained elsewhere)"}  # fmt: skip
    marker = ckpt.parent / "run.json"  # a base trained by this script describes itself
    if marker.is_file():
        recorded = json.loads(marker.read_text())
        if Path(recorded.get("checkpoint", "")).resolve() == ckpt:
            stats |= recorded
    return stats | {"checkpoint": str(ckpt), "reused_base": str(ckpt)}, ckpt


def arm_command(args, arm: str, data: Path, base_ckpt: Path, save: Path, seed: int) -> tuple[list, dict]:
    """The continuation of one arm from the base: fairseq-train's command and environment."""
    env = common_env(args, seed, args.continue_updates) | {"MAX_TOKENS": str(args.continue_max_tokens)}
    cont_opt = ["--lr-scheduler", "fixed", "--lr", str(args.continue_lr), "--warmup-updates", "0"]
    extra = [*cont_opt, *eval_bleu_args(args, args.validate_every), *shlex.split(args.train_extra)]
    if arm == "mle":
        return ["bash", ROOT / "scripts" / "train_mle.sh", data, save, "--finetune-from-model", base_ckpt, *extra], env
    # mrt is the risk loss over the hard search (epsilon 0): everything else as the soft arms, so that
    # the comparison isolates the relaxation
    env |= {
        "BEAM_LOSS": "risk" if arm == "mrt" else arm.removeprefix("soft_"),
        "MLE_WEIGHT": str(args.mle_weight),
        "RISK_SHARPNESS": str(args.risk_sharpness),
        "BEAM_SIZE": str(args.soft_beam_size),
        "BEAM_EPSILON": "0" if arm == "mrt" else str(args.soft_beam_epsilon),
        "BEAM_CANDIDATES": str(args.soft_beam_candidates or ""),
        "SEARCH_FRACTION": str(args.search_fraction),
        "LR": str(args.continue_lr),
        "SEARCH_MAX_LEN_B": str(args.search_max_len_b),
    }
    return ["bash", ROOT / "scripts" / "finetune_soft_beam.sh", data, base_ckpt, save, *extra], env


def run_protocol(args) -> dict:
    t_start = time.time()
    data = prepare_data(args)
    prep = json.loads((data / "prep.json").read_text())
    # evaluate.py --test-set all scores the sets in prep.json's order; the first is the headline set
    args.test_set_names = list((prep.get("test_sets") or {"test": "test"}).values())

    base_stats, base_ckpt = base_run(args, data)
    runs = {"mle_base": [base_stats]}
    reuse = (base_ckpt.parent / "test.eval.json",) if args.base else ()
    evals = {"mle_base": [evaluate(args, data, base_ckpt, args.work / "mle_base" / "test.eval.json", reuse)]}
    if args.base_only:
        return {"mle_base": {"train": runs["mle_base"][0], "test": evals["mle_base"][0]}}

    for seed in range(1, args.seeds + 1):
        for arm in args.arms:
            save = args.work / f"seed{seed}" / arm
            cmd, env = arm_command(args, arm, data, base_ckpt, save, seed)
            runs.setdefault(arm, []).append(train_run(args, f"seed{seed}/{arm}", save, cmd, env, args.continue_updates) | {"seed": seed})
            evals.setdefault(arm, []).append(evaluate(args, data, save / "checkpoint_last.pt", save / "test.eval.json"))

    sig = significance(args, evals)
    return summarise(args, prep, runs, evals, sig, time.time() - t_start)


# ---------------------------------------------------------------- significance (scripts/compare.py)


def comparisons(arms: list[str]) -> list[tuple[str, list[str]]]:
    """(baseline, systems): every arm against the MLE continuation, the soft arms against MRT too."""
    out = [("mle", [a for a in arms if a != "mle"])]
    soft = [a for a in arms if a.startswith("soft_")]
    if "mrt" in arms and soft:
        out.append(("mrt", soft))
    return [(b, s) for b, s in out if s]


def run_compare(args, ref: Path, baseline: Path, systems: list[Path], out: Path) -> dict:
    """compare.py's JSON at out, reused while it is newer than its inputs and made with the same settings."""
    inputs = [ref, baseline, *systems]
    try:
        cached = json.loads(out.read_text())
        fresh = out.stat().st_mtime >= max(p.stat().st_mtime for p in inputs)
        same = (
            cached["baseline"]["file"] == str(baseline)
            and [s["file"] for s in cached["systems"]] == [str(s) for s in systems]
            and (cached["tests"]["paired_bs"]["n"], cached["tests"]["paired_ar"]["n"]) == (args.paired_bs_n, args.paired_ar_n)
        )
        if fresh and same:
            return cached
    except (OSError, ValueError, KeyError):
        pass
    cmd = [PYTHON, ROOT / "scripts" / "compare.py", "--ref", ref, "--baseline", baseline,
           *[x for s in systems for x in ("--system", s)],
           "--paired-bs-n", args.paired_bs_n, "--paired-ar-n", args.paired_ar_n, "--json", out]  # fmt: skip
    run_logged(cmd, out.with_suffix(".log"))
    return json.loads(out.read_text())


def write_if_changed(path: Path, text: str) -> Path:
    # an unchanged pooled file keeps its mtime, so the comparison on it stays cached
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return path


def pool(files_by_seed: list[Path], ref: Path, out: Path) -> tuple[Path, Path]:
    """One arm's hypotheses over the seeds, concatenated in seed order, and the references repeated as
    often: the pooled test pairs every sentence of every seed with the same seed's baseline sentence."""
    hyps = "".join(p.read_text(encoding="utf-8") for p in files_by_seed)
    return write_if_changed(out, hyps), write_if_changed(out.with_name("ref.txt"), ref.read_text(encoding="utf-8") * len(files_by_seed))


def compare_entry(result: dict, i: int, path: Path) -> dict:
    s = result["systems"][i]
    keep = ("difference", "bootstrap", "p_value", "identical_to_baseline")
    return {k: s[k] for k in keep} | {"baseline_bootstrap": result["baseline"]["bootstrap"], "n_sentences": result["n_sentences"],
                                      "compare_json": str(path)}  # fmt: skip


def significance(args, evals: dict) -> dict:
    """set -> baseline arm -> system arm -> {"per_seed": [entry per seed], "pooled": entry}, each entry from
    compare.py (paired bootstrap and approximate randomisation, BLEU and chrF); JSONs under WORK/compare."""
    out = {}
    for name in args.test_set_names:
        ref = Path(evals["mle"][0]["sets"][name]["references_file"])
        hyp = {arm: [Path(e["sets"][name]["hypotheses_file"]) for e in evals[arm]] for arm in args.arms}
        folder = args.work / "compare" / name
        for baseline, systems in comparisons(args.arms):
            per = out.setdefault(name, {}).setdefault(baseline, {arm: {"per_seed": []} for arm in systems})
            for i, seed in enumerate(range(1, args.seeds + 1)):
                path = folder / f"seed{seed}.vs_{baseline}.json"
                result = run_compare(args, ref, hyp[baseline][i], [hyp[a][i] for a in systems], path)
                for j, arm in enumerate(systems):
                    per[arm]["per_seed"].append(compare_entry(result, j, path) | {"seed": seed})
            pooled = {arm: pool(hyp[arm], ref, folder / "pooled" / f"{arm}.hyp.txt")[0] for arm in [baseline, *systems]}
            path = folder / f"pooled.vs_{baseline}.json"
            result = run_compare(args, folder / "pooled" / "ref.txt", pooled[baseline], [pooled[a] for a in systems], path)
            for j, arm in enumerate(systems):
                per[arm]["pooled"] = compare_entry(result, j, path) | {"seeds": list(range(1, args.seeds + 1))}
    return out


# ---------------------------------------------------------------- summary, plot, markdown


def mean_std(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def with_stats(out: dict, key: str, values: list) -> dict:
    out[key] = values
    out[f"{key}_mean"], out[f"{key}_std"] = mean_std(values)
    return out


def set_summary(entries: list[dict], sig: dict) -> dict:
    """One arm on one test set over its seeds: scores, the beam sweep, and its comparisons (vs_mle, vs_mrt)."""
    out = {"n_sentences": entries[0].get("n_sentences"), "hypotheses_files": [e["hypotheses_file"] for e in entries]}
    for key in ("bleu", "chrf", "bleu_lowercase", "length_ratio"):
        with_stats(out, key, [e.get(key) for e in entries])
    out["beam_sweep"] = []
    for i, point in enumerate(entries[0].get("beam_sweep", [])):
        sweep = {"beam": point["beam"]}
        for key in ("bleu", "chrf", "length_ratio"):
            with_stats(sweep, key, [e["beam_sweep"][i][key] for e in entries])
        out["beam_sweep"].append(sweep)
    for baseline in ("mle", "mrt"):
        out[f"vs_{baseline}"] = sig.get(baseline)
    return out


def arm_summary(arm: str, rs: list[dict], es: list[dict], sig: dict) -> dict:
    """An arm over its seeds; bleu/chrf (and their mean, std) are the first test set's, the headline one."""
    spu = [r.get("sec_per_update") for r in rs]
    spu_fallback = [r["process_wall_s"] / r["num_updates"] for r in rs if r.get("num_updates")]
    a = {"label": ARM_LABELS.get(arm, arm), "n_seeds": len(es), "seeds": [r.get("seed", 1) for r in rs]}
    with_stats(a, "bleu", [e["bleu"] for e in es])
    with_stats(a, "chrf", [e["chrf"] for e in es])
    rss = [r["max_rss_mib"] for r in rs if r.get("max_rss_mib") is not None]
    return a | {
        "updates": rs[0]["num_updates"] if rs else None,
        "sec_per_update": mean_std(spu)[0],
        "process_sec_per_update": mean_std(spu_fallback)[0],
        "max_rss_mib": max(rss, default=None),
        "valid_curves": [{"seed": r.get("seed", 1), "points": r["valid"]} for r in rs],
        "last_train_inner": [r.get("last_train_inner", {}) for r in rs],
        "commands": [r["command"] for r in rs],
        "eval_files": [e.get("generate_output") for e in es],
        "sets": {
            name: set_summary([e["sets"][name] for e in es], {b: s.get(arm) for b, s in sig.get(name, {}).items()})
            for name in es[0]["sets"]
        },
    }


def add_ratios(arms: dict) -> None:
    mle = arms.get("mle", {})
    for arm, a in arms.items():
        if arm == "mle_base":  # other batch size and schedule: no per-update comparison
            a["cost_ratio_vs_mle"] = a["process_cost_ratio_vs_mle"] = None
            a["delta_bleu_vs_mle"] = None
            continue
        for key, src in (
            ("cost_ratio_vs_mle", "sec_per_update"),
            ("process_cost_ratio_vs_mle", "process_sec_per_update"),
        ):
            a[key] = a[src] / mle[src] if mle.get(src) and a.get(src) else None
        a["delta_bleu_vs_mle"] = (
            (a["bleu_mean"] - mle["bleu_mean"]) if mle.get("bleu_mean") is not None and a["bleu_mean"] is not None else None
        )


def sig_entries(sig: dict):
    for by_baseline in sig.values():
        for by_arm in by_baseline.values():
            for entry in by_arm.values():
                yield from [*entry["per_seed"], entry["pooled"]]


def summarise(args, prep, runs, evals, sig, elapsed) -> dict:
    arms = {arm: arm_summary(arm, runs.get(arm, []), evals.get(arm, []), sig) for arm in ["mle_base", *args.arms]}
    add_ratios(arms)
    first = evals["mle_base"][0]
    soft = [a for k, a in arms.items() if k.startswith("soft_")]
    targets = {
        "soft_beam_plus_1_bleu": {a["label"]: (a["delta_bleu_vs_mle"] is not None and a["delta_bleu_vs_mle"] >= 1.0) for a in soft},
        "cost_ratio_at_most_3x": {a["label"]: (a["cost_ratio_vs_mle"] is not None and a["cost_ratio_vs_mle"] <= 3.0) for a in soft},
        "full_protocol": args.seeds >= 3 and not args.subset and not args.tiny,
    }
    return {
        "created": dt.datetime.now().isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "elapsed_s": elapsed,
        "compute_s": sum(r.get("process_wall_s", 0.0) for rs in runs.values() for r in rs)
        + sum(e.get("process_wall_s", 0.0) for es in evals.values() for e in es),
        "machine": machine_info("cuda" if args.gpu else "cpu"),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "data": prep,
        "base": {"checkpoint": runs["mle_base"][0]["checkpoint"], "reused": args.base is not None},
        "test_sets": {name: first["sets"][name]["n_sentences"] for name in first["sets"]},
        "bleu_signature": first["bleu_signature"],
        "chrf_signature": first["chrf_signature"],
        "test_sentences": first.get("n_sentences"),
        "significance_files": sorted({e["compare_json"] for e in sig_entries(sig)}),
        "arms": arms,
        "targets": targets,
    }


def plot(summary: dict, path: Path, mle_updates: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = summary["arms"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    base_pts = [p for p in arms["mle_base"]["valid_curves"][0]["points"] if p["bleu"] is not None]
    start = base_pts[-1]["bleu"] if base_pts else None
    colors = {"mle_base": "black", "mle": "tab:blue", "mrt": "tab:red", "soft_hamming": "tab:orange", "soft_risk": "tab:green"}
    for ax, zoom in zip(axes, (False, True), strict=True):
        if not zoom and base_pts:
            ax.plot(
                [p["num_updates"] for p in base_pts],
                [p["bleu"] for p in base_pts],
                "o-",
                color="black",
                label=ARM_LABELS["mle_base"],
            )
        for arm, a in arms.items():
            if arm == "mle_base":
                continue
            by_update: dict[int, list[float]] = {}
            for curve in a["valid_curves"]:
                for p in curve["points"]:
                    if p["bleu"] is not None:
                        by_update.setdefault(p["num_updates"], []).append(p["bleu"])
            xs = sorted(by_update)
            if not xs:
                continue
            ys = [statistics.fmean(by_update[x]) for x in xs]
            lo = [min(by_update[x]) for x in xs]
            hi = [max(by_update[x]) for x in xs]
            gx = [mle_updates + x for x in xs]
            if start is not None:
                gx, ys, lo, hi = [mle_updates, *gx], [start, *ys], [start, *lo], [start, *hi]
            c = colors.get(arm)
            ax.plot(gx, ys, "o-", color=c, label=f"{a['label']} (mean of {a['n_seeds']})")
            if a["n_seeds"] > 1:
                ax.fill_between(gx, lo, hi, color=c, alpha=0.15)
        ax.set_xlabel("updates (base MLE, then continuation)")
        ax.set_ylabel("valid BLEU (beam 5, fairseq --eval-bleu)")
        ax.set_title("continuation only" if zoom else "whole schedule")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle("Multi30k en-de: validation BLEU over updates")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fmt(x, nd=2):
    return "n/a" if x is None else f"{x:.{nd}f}"


def fmt_p(x):
    return "n/a" if x is None else ("<0.001" if x < 0.001 else f"{x:.3f}")


def md_header(summary: dict, rel_json: str) -> list[str]:
    s, base = summary["settings"], summary["arms"]["mle_base"]
    L = ["# Results: soft-beam fine-tuning vs. compute-matched MLE on Multi30k en-de\n"]
    L.append(
        f"Generated by `scripts/bench_bleu.py` on {summary['created']}; the training and evaluation processes took "
        f"{summary['compute_s'] / 60:.1f} min wall-clock in all (this invocation: {summary['elapsed_s'] / 60:.1f} min; "
        f"finished steps are reused). Raw numbers: [{rel_json}]({rel_json}).\n"
    )
    if not summary["targets"]["full_protocol"]:
        L.append(
            f"**Reduced scale:** {s['seeds']} seed(s), {base['updates'] or '?'} base MLE updates, {s['continue_updates']} "
            f"continuation updates{', training subset ' + str(s['subset']) + ' pairs' if s['subset'] else ''}"
            f"{', tiny smoke-test model' if s['tiny'] else ''}. The full protocol (3 seeds, ~60 min base MLE) was not run.\n"  # noqa: E501
        )
    return L


def md_main_table(summary: dict) -> list[str]:
    arms, first = summary["arms"], next(iter(summary["test_sets"]))
    L = [f"## Test BLEU / chrF ({first}, beam {summary['settings']['beam']})\n"]
    L.append(
        "| arm | seeds | updates | BLEU mean ± std | chrF mean ± std | Δ BLEU vs MLE cont. | s/update | cost ratio vs MLE | process s/update | peak RSS (MiB) |"  # noqa: E501
    )
    L.append("|---|---|---|---|---|---|---|---|---|---|")
    for arm, a in arms.items():
        L.append(
            f"| {a['label']} | {a['n_seeds']} | {a['updates'] if a['updates'] is not None else 'n/a'} | "
            f"{fmt(a['bleu_mean'])} ± {fmt(a['bleu_std'])} | {fmt(a['chrf_mean'])} ± {fmt(a['chrf_std'])} | "
            f"{fmt(a['delta_bleu_vs_mle']) if arm != 'mle_base' else '—'} | {fmt(a['sec_per_update'], 3)} | "
            f"{fmt(a['cost_ratio_vs_mle'])} | {fmt(a['process_sec_per_update'], 2)} | {fmt(a['max_rss_mib'], 0)} |"
        )
    L.append("")
    L.append("Per-seed BLEU: " + "; ".join(f"{a['label']}: {', '.join(fmt(b) for b in a['bleu'])}" for a in arms.values()) + "\n")
    L.append(
        f"BLEU signature: `{summary['bleu_signature']}`  \nchrF signature: `{summary['chrf_signature']}`  \n"
        f"({summary['test_sentences']} test sentences, detokenised hypotheses against the raw references.)\n"
    )
    L.append(
        "s/update = fairseq's `train_wall` summed over the run / number of updates (validation excluded); "
        "cost ratio = that of the arm / that of the MLE continuation; peak RSS = `ru_maxrss` of the "
        "fairseq-train process (wait4), the largest over seeds. fairseq rounds `train_wall` to whole seconds, so "
        "short runs have coarse s/update; process s/update = wall-clock of the whole fairseq-train process "
        "(start-up and validation included) / updates.\n"
    )
    return L


def md_test_sets(summary: dict) -> list[str]:
    s = summary["settings"]
    beams = s["sweep_beams"]
    L = [f"## Every test set (beam {s['beam']}; beam sweep {', '.join(map(str, beams))})\n"]
    for name, n in summary["test_sets"].items():
        L.append(f"### {name} ({n} sentences)\n")
        L.append("| arm | seeds | BLEU mean ± std | chrF mean ± std | lowercased BLEU | length ratio | "
                 + " | ".join(f"BLEU beam {b}" for b in beams) + " |")  # fmt: skip
        L.append("|---" * (6 + len(beams)) + "|")
        for a in summary["arms"].values():
            t = a["sets"][name]
            sweep = {p["beam"]: p for p in t["beam_sweep"]}
            L.append(
                f"| {a['label']} | {a['n_seeds']} | {fmt(t['bleu_mean'])} ± {fmt(t['bleu_std'])} | "
                f"{fmt(t['chrf_mean'])} ± {fmt(t['chrf_std'])} | {fmt(t['bleu_lowercase_mean'])} | "
                f"{fmt(t['length_ratio_mean'], 3)} | " + " | ".join(fmt(sweep.get(b, {}).get("bleu_mean")) for b in beams) + " |"
            )
        L.append("")
    L.append("Lowercased BLEU is sacreBLEU's BLEU with `-lc` (much of the Multi30k literature reports it); the beam "
             "sweep is the mean over seeds of cased BLEU at each beam size.\n")  # fmt: skip
    return L


def md_significance(summary: dict) -> list[str]:
    s = summary["settings"]
    L = ["## Significance\n"]
    L.append(
        f"`scripts/compare.py` (sacreBLEU's paired bootstrap, {s['paired_bs_n']} resamples, and approximate "
        f"randomisation, {s['paired_ar_n']} trials) of each arm against the same seed's MLE continuation (vs MLE) "
        "and of each soft arm against the same seed's MRT (vs MRT). Pooled: the hypotheses of all seeds "
        "concatenated (the references repeated as often) and tested once. Δ BLEU = system − baseline corpus "
        "BLEU on the pooled set; 95% CI = sacreBLEU's bootstrap mean ± half-width of the system's pooled BLEU "
        "(of the system's score, not of the difference); p: bs = paired bootstrap, ar = approximate randomisation.\n"
    )
    L.append(
        "| test set | arm | vs | Δ BLEU | BLEU 95% CI | p BLEU (bs) | p chrF (bs) | p BLEU (ar) | p chrF (ar) | p BLEU (bs) per seed |"
    )  # noqa: E501
    L.append("|---|---|---|---|---|---|---|---|---|---|")
    for name in summary["test_sets"]:
        for a in summary["arms"].values():
            for baseline in ("mle", "mrt"):
                sig = a["sets"][name].get(f"vs_{baseline}")
                if not sig:
                    continue
                pooled, p, ci = sig["pooled"], sig["pooled"]["p_value"], sig["pooled"]["bootstrap"]["bleu"]
                seeds = ", ".join(f"s{e['seed']} {fmt_p(e['p_value']['paired_bs']['bleu'])}" for e in sig["per_seed"])
                L.append(
                    f"| {name} | {a['label']} | {baseline.upper()} | {pooled['difference']['bleu']:+.2f} | "
                    f"{ci['mean']:.2f} ± {ci['ci95']:.2f} | {fmt_p(p['paired_bs']['bleu'])} | {fmt_p(p['paired_bs']['chrf'])} | "
                    f"{fmt_p(p['paired_ar']['bleu'])} | {fmt_p(p['paired_ar']['chrf'])} | {seeds} |"
                )
    L.append("")
    return L


def md_targets(summary: dict) -> list[str]:
    arms = summary["arms"]
    first, mle = next(iter(summary["test_sets"])), arms.get("mle", {})
    L = ["## Targets\n"]
    for a in (a for k, a in arms.items() if k.startswith("soft_")):
        d, r = a["delta_bleu_vs_mle"], a["cost_ratio_vs_mle"]
        sig = a["sets"][first].get("vs_mle")
        p = fmt_p(sig["pooled"]["p_value"]["paired_bs"]["bleu"]) if sig else "n/a"
        L.append(
            f"- {a['label']}: ≥ +1.0 BLEU over compute-matched MLE (mean of {a['n_seeds']} seed(s)): "
            f"**{'reached' if d is not None and d >= 1.0 else 'NOT reached'}** (Δ = {fmt(d)}, pooled paired-bootstrap p = {p}); "  # noqa: E501
            f"per-update cost ≤ 3x MLE: **{'reached' if r is not None and r <= 3 else 'NOT reached'}** (ratio {fmt(r)})."  # noqa: E501
        )
    if not summary["targets"]["full_protocol"]:
        L.append("- These are not the 3-seed full-protocol numbers the targets refer to.")
    L.append(
        f"- MLE baseline vs. published: {fmt(mle.get('bleu_mean'))} BLEU here (compute-matched MLE arm) against "
        f"{PUBLISHED}. The published systems train larger models for far more updates (typically on a GPU); "
        "this CPU-sized model and schedule is not expected to reach them.\n"
    )
    return L


def md_settings(summary: dict) -> list[str]:
    s, d, base = summary["settings"], summary["data"], summary["arms"]["mle_base"]
    sets = ", ".join(summary["test_sets"])
    L = ["## Settings\n"]
    L.append(
        f"- data: Multi30k task 1 en->de, `data_prep/prepare-multi30k.sh` (train {d.get('train_pairs', d.get('n_train', '?'))}"  # noqa: E501
        f" pairs{', subset ' + str(s['subset']) if s['subset'] else ''}; joint sentencepiece vocab {s['vocab_size']});"
        f" test sets {sets}; valid = val."
    )
    L.append(
        f"- model: `{s['arch_args']}`; label smoothing 0.1; adam (0.9, 0.98); max tokens {s['max_tokens']} (base), {s['continue_max_tokens']} (continuations)."  # noqa: E501
    )
    if summary["base"]["reused"]:
        L.append(f"- base MLE: reused with --base `{summary['base']['checkpoint']}` ({base['updates'] or '?'} updates), not trained here.")  # noqa: E501
    else:
        L.append(
            f"- base MLE: {s['mle_updates']} updates, inverse_sqrt lr {s['mle_lr']} warmup {s['mle_warmup']}, seed 1, "
            f"validation BLEU every {s['mle_validate_every']} updates; shared by every arm and seed."
        )
    L.append(
        f"- continuation (all arms): {s['continue_updates']} updates from the base's last checkpoint with "
        f"--finetune-from-model (fresh adam state), fixed lr {s['continue_lr']}, validation BLEU every {s['validate_every']} "  # noqa: E501
        f"updates; seeds 1..{s['seeds']}."
    )
    L.append(
        f"- soft beam: beam size {s['soft_beam_size']}, epsilon {s['soft_beam_epsilon']}, candidates "
        f"{s.get('soft_beam_candidates') or '2k²'}, MLE weight "
        f"{s['mle_weight']}, search on {s.get('search_fraction', 1.0):g} of each batch's sentences, search max length 1.2·src + {s['search_max_len_b']}; losses {', '.join(x for x in s['arms'] if x.startswith('soft_'))}; risk sharpness α {s.get('risk_sharpness', 1.0):g}."  # noqa: E501
    )
    if "mrt" in s["arms"]:
        L.append("- MRT: the risk loss over fairseq's hard beam search (--soft-beam-epsilon 0: classical minimum-risk "
                 "training over the n-best), every other setting as the soft arms'.")  # fmt: skip
    L.append(
        f"- evaluation: `scripts/evaluate.py --test-set all` (fairseq-generate with the plugin, exact beam search), beam {s['beam']} "  # noqa: E501
        f"(sweep {', '.join(map(str, s['sweep_beams']))}), lenpen 1.0, max len {s['eval_max_len_a']}·src + {s['eval_max_len_b']}; "  # noqa: E501
        f"checkpoint_last of every run; validation BLEU on {'the first ' + str(s['max_valid_sentences']) + ' (shortest) sentences of' if s['max_valid_sentences'] else 'all of'} val.\n"  # noqa: E501
    )
    return L


def write_markdown(summary: dict, path: Path, plot_path: Path, json_path: Path) -> None:
    rel_plot = os.path.relpath(plot_path, path.parent)
    rel_json = os.path.relpath(json_path, path.parent)
    L = md_header(summary, rel_json) + md_main_table(summary) + md_test_sets(summary) + md_significance(summary)
    L += md_targets(summary)
    L.append(f"## Validation BLEU over updates\n\n![validation BLEU]({rel_plot})\n")
    L += md_settings(summary)
    L.append("## Machine\n")
    L.append(", ".join(f"{k}: {v}" for k, v in summary["machine"].items()) + "\n")
    L.append("## Commands\n")
    L.append(f"```\n{summary['command']}\n```\n")
    L.append("Each step (from the run logs):\n\n```")
    for a in summary["arms"].values():
        L.extend(a["commands"])
    L.append("```\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(L) + "\n", encoding="utf-8")


# ---------------------------------------------------------------- CLI

ARMS = ("mle", "mrt", "soft_hamming", "soft_risk")


def add_data_options(p) -> None:
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_bleu", help="working folder (data, checkpoints, logs)")
    p.add_argument("--raw-dir", type=Path, default=DEFAULT_RAW, help="Multi30k raw .gz files")
    p.add_argument("--test-sets", default=None, help="prepare-multi30k.sh --test-sets (default: every standard set in --raw-dir)")
    p.add_argument("--subset", type=int, default=None, help="keep only the first N training pairs")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8))


def add_training_options(p) -> None:
    # Sizing: the default model with 4096-token batches ran at ~15 s/update on a 2-core CPU shared with other jobs
    # (about 0.6 core free); ~4-5 s/update is expected with both cores free, so 800 updates (~5.5 epochs of
    # Multi30k) is about 60 min there. This is an estimate, not a measurement.
    p.add_argument("--mle-updates", type=int, default=800,
                   help="base MLE updates (800 x 4096 tokens, ~5.5 epochs: ~60 min on a free 2-core CPU, estimated)")  # fmt: skip
    p.add_argument("--mle-lr", type=float, default=7e-4)
    p.add_argument("--mle-warmup", type=int, default=400)
    p.add_argument("--mle-validate-every", type=int, default=None, help="default: mle-updates / 5")
    p.add_argument("--base", type=Path, default=None,
                   help="use this MLE checkpoint as the base instead of training one (same data and --arch-args)")  # fmt: skip
    p.add_argument("--continue-updates", type=int, default=200)
    p.add_argument("--continue-lr", type=float, default=1e-4)
    p.add_argument("--validate-every", type=int, default=None, help="default: continue-updates / 4")
    p.add_argument("--seeds", type=int, default=3, help="continuation seeds 1..N (the base MLE run is shared)")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)} (mle is required)")
    p.add_argument("--mle-weight", type=float, default=0.5)
    p.add_argument("--risk-sharpness", type=float, default=1.0, help="MRT's alpha (mrt and soft_risk)")
    p.add_argument("--soft-beam-size", type=int, default=4)
    p.add_argument("--soft-beam-epsilon", type=float, default=0.01)
    p.add_argument("--soft-beam-candidates", type=int, default=None, help="candidates per sentence (default 2k^2)")
    p.add_argument("--search-fraction", type=float, default=1.0, help="share of each batch's sentences searched (soft arms, mrt)")
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--continue-max-tokens", type=int, default=None, help="batch size of the continuations (default: --max-tokens)")
    p.add_argument("--search-max-len-b", type=int, default=10, help="the training search's length limit is 1.2*src + this")
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--tiny", action="store_true", help="tiny model (smoke tests; meaningless BLEU)")
    p.add_argument("--arch-args", default=None, help="model flags for fairseq-train (default: the small transformer)")
    p.add_argument("--train-extra", default="", help="more fairseq-train arguments for every run, one string")
    p.add_argument("--cpu", action="store_true", help="do not use a GPU even if there is one")


def add_eval_options(p) -> None:
    p.add_argument("--beam", type=int, default=5, help="beam of validation and test decoding")
    p.add_argument("--sweep-beams", default="1,5,10", help="test decoding also at these beam sizes")
    p.add_argument("--paired-bs-n", type=int, default=1000, help="compare.py's bootstrap resamples")
    p.add_argument("--paired-ar-n", type=int, default=10000, help="compare.py's approximate randomisation trials")
    p.add_argument("--max-tokens-valid", type=int, default=8192)
    p.add_argument("--max-valid-sentences", type=int, default=None,
                   help="validate (--eval-bleu) on only the first batch of this many sentences (smoke tests; default: all)")  # fmt: skip
    p.add_argument("--eval-max-len-a", type=float, default=1.2, help="decoding length limit a*src + b, validation and test")
    p.add_argument("--eval-max-len-b", type=int, default=10)
    p.add_argument("--results", type=Path, default=ROOT / "docs" / "results.md")
    p.add_argument("--json", type=Path, default=None, help="default: --results with .json")
    p.add_argument("--plot", type=Path, default=None, help="default: --results with _valid_bleu.png")
    p.add_argument("--base-only", action="store_true",
                   help="stop after the base MLE run and its test score (printed as JSON); later runs reuse it")  # fmt: skip


def check_args(p, args) -> None:
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in args.arms if a not in ARMS]
    if bad or "mle" not in args.arms or len(set(args.arms)) != len(args.arms):
        p.error(f"--arms must include mle and may add {', '.join(ARMS[1:])}, each once (got {args.arms})")
    try:
        args.sweep_beams = [int(b) for b in args.sweep_beams.split(",")]
    except ValueError:
        args.sweep_beams = []
    if not args.sweep_beams or min(args.sweep_beams) < 1 or len(set(args.sweep_beams)) != len(args.sweep_beams):
        p.error(f"--sweep-beams needs distinct positive beam sizes, comma-separated (got {args.sweep_beams!r})")
    if min(args.mle_updates, args.continue_updates, args.seeds, args.paired_bs_n, args.paired_ar_n) < 1:
        p.error("--mle-updates, --continue-updates, --seeds, --paired-bs-n and --paired-ar-n must be >= 1")
    if not args.raw_dir.is_dir():
        p.error(f"--raw-dir {args.raw_dir} not found (the Multi30k raw .gz files)")
    if args.base is not None:
        if not args.base.is_file():
            hint = "an MLE checkpoint trained on the same data, e.g. WORK/mle_base/checkpoint_last.pt"
            p.error(f"--base {args.base}: no such checkpoint file (give {hint})")
        args.base = args.base.resolve()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_data_options(p)
    add_training_options(p)
    add_eval_options(p)
    args = p.parse_args(argv)
    check_args(p, args)
    args.arch_args = args.arch_args or (TINY_ARCH if args.tiny else SMALL_ARCH)
    args.mle_validate_every = args.mle_validate_every or max(1, args.mle_updates // 5)
    args.continue_max_tokens = args.continue_max_tokens or args.max_tokens
    args.validate_every = args.validate_every or max(1, args.continue_updates // 4)
    args.json = args.json or args.results.with_suffix(".json")
    args.plot = args.plot or args.results.with_name(args.results.stem + "_valid_bleu.png")
    args.work = args.work.resolve()
    args.gpu = not args.cpu and cuda_available()
    return args


def cuda_available() -> bool:
    # asked of a child: importing torch here would add its ~270 MiB to every later child's peak RSS (run_logged)
    probe = [PYTHON, "-c", "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"]
    return subprocess.run(probe, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        summary = run_protocol(args)
    except BenchError as e:
        print(f"bench_bleu.py: error: {e}", file=sys.stderr)
        return 1
    if args.base_only:
        print(json.dumps(summary, indent=2))
        return 0
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    plot(summary, args.plot, summary["arms"]["mle_base"]["updates"] or 0)
    write_markdown(summary, args.results, args.plot, args.json)
    for arm, a in summary["arms"].items():
        print(
            f"[bench] {arm:13s} BLEU {fmt(a['bleu_mean'])} ± {fmt(a['bleu_std'])}  chrF {fmt(a['chrf_mean'])}  "
            f"s/update {fmt(a['sec_per_update'], 3)}  ratio {fmt(a['cost_ratio_vs_mle'])}  RSS {fmt(a['max_rss_mib'], 0)} MiB"  # noqa: E501
        )
    for arm, a in summary["arms"].items():
        for name, t in a["sets"].items():
            ps = ", ".join(
                f"vs {b.upper()} p={fmt_p(t[f'vs_{b}']['pooled']['p_value']['paired_bs']['bleu'])}"
                for b in ("mle", "mrt")
                if t.get(f"vs_{b}")
            )
            print(f"[bench] {arm:13s} {name}: BLEU {fmt(t['bleu_mean'])}" + (f"  ({ps})" if ps else ""))
    print(f"[bench] wrote {args.results}, {args.json}, {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
