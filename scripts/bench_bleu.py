"""BLEU benchmark: soft-beam fine-tuning vs. compute-matched MLE and MRT on Multi30k en->de.

    python scripts/bench_bleu.py [--phase valid|final] [--base CKPT|DIR] [--config NAME=ARM[:OPTIONS] ...] [--work DIR]

Two phases. ``--phase valid`` (the default, for ablations) trains or continues every configuration and
reports validation figures only; the test sets are not decoded. ``--phase final`` also decodes every test
set, once: WORK/test_read.json records each read (configurations, seeds, checkpoints), and a configuration
read before is refused unless --reread-test is given, which the report states. Every choice (the base's
checkpoint, each run's checkpoint, the configurations) is made on validation.

Protocol (every step is skipped on a re-run when its outputs exist, so an interrupted run resumes):

1. data: data_prep/prepare-multi30k.sh --tgt de (joint sentencepiece, raw files from --raw-dir,
   default <repo>/../shared/data/multi30k, never downloaded; every standard test set found there, or
   --test-sets) into WORK/data.
2. base: scripts/train_mle.sh trains a small transformer with label-smoothed MLE for --mle-updates
   updates (seed 1), with --eval-bleu validation every --mle-validate-every updates; trained once and
   shared by every configuration and seed. --base uses a base trained before instead (never retrained):
   a checkpoint file as it is, or a save folder (scripts/train_base.sh's). The base's candidates from its
   folder (--base-select: best, last, avgN = scripts/average_checkpoints.py over the newest N interval
   checkpoints) are decoded on the valid split (evaluate.py --split valid); the highest validation BLEU wins.
   With --base the continuations' model flags are read from the base checkpoint's cfg["model"] (arch, layers,
   dims, heads, dropouts, shared embeddings, ...); --arch-args, if given too, must agree with it flag by flag.
3. per seed, from the base (--finetune-from-model: weights only, same fresh optimizer and the same
   fixed learning rate --continue-lr for every configuration), --continue-updates more updates of each
   configuration: the arms of --arms under their own names, ``mle`` (scripts/train_mle.sh: the
   compute-matched baseline), ``mrt`` (scripts/finetune_soft_beam.sh with the risk loss over the hard
   search, epsilon 0: classical minimum-risk training), ``soft_hamming`` / ``soft_risk`` / ``soft_bleu``
   (the same script with --beam-loss hamming / risk / bleu over the soft search), and each
   --config NAME=ARM[:fairseq options] (the options last) into WORK/seedS/NAME. Validation BLEU (--beam)
   every --validate-every updates; fairseq keeps each run's checkpoint_best.pt by validation BLEU.
   A killed continuation resumes from its checkpoint_last.pt; WORK/seedS/NAME/config.json makes sure a
   folder is never reused for another configuration or base.
4. (final) evaluation of each checkpoint_best.pt on every prepared test set with scripts/evaluate.py
   --test-set all at --beam, with a sweep over --sweep-beams: sacreBLEU BLEU (with signature), chrF,
   lowercased BLEU, length ratio.
5. (final) significance: per test set, scripts/compare.py (paired bootstrap and approximate randomisation)
   of every configuration against the same seed's --mle-config, and of the soft ones against the same
   seed's --mrt-config; then once more on the hypotheses pooled over seeds. JSONs under WORK/compare/SET/.
6. report: valid: the base's selection, every configuration of the work folder with its best validation
   BLEU and the update it was reached at, the curves (WORK/validation.md by default). final: per
   configuration mean/std over seeds of BLEU and chrF, seconds per update (fairseq's train_wall summed over
   the run / updates), ratio to the MLE arm, peak RSS of the training process (wait4 rusage); per test set
   the scores, the beam sweep and the p-values; the test reads; the validation (ablation) table; written
   to --results (markdown, by default docs/results.md) and --json; validation BLEU over updates (PNG).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

from average_checkpoints import newest_interval_checkpoints
from bench_common import machine_info, model_flags
from bleu_report import fmt, fmt_p, plot, write_markdown, write_valid_markdown

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
    "soft_bleu": "soft beam, expected-BLEU loss",
}


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
    # by update: a run killed and resumed from its checkpoint_last validates some updates twice; the later counts
    by_update = {}
    for r in recs["valid"]:
        u, b = num(r.get("num_updates")), num(r.get("bleu"))
        if u is not None:
            by_update[int(u)] = {"num_updates": int(u), "bleu": b, "loss": num(r.get("loss"))}
    valid = [by_update[u] for u in sorted(by_update)]
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


def train_run(args, name: str, save: Path, cmd: list, env: dict, updates: int, identity: dict | None = None) -> dict:
    """Runs (or reuses) one training run; returns its stats, also saved as save/run.json. identity (the
    configuration and the base it starts from) is written to save/config.json before the first launch: a
    folder that holds another configuration's run is refused instead of being resumed or reused."""
    check_identity(save, identity)
    marker = save / "run.json"
    if marker.is_file() and (save / "checkpoint_last.pt").is_file():
        stats = json.loads(marker.read_text())
        if stats.get("num_updates", 0) >= updates:
            print(f"[bench] {name}: done before ({marker}), reusing", flush=True)
            return stats
    # a killed run left checkpoint_last.pt: fairseq resumes from it (--finetune-from-model applies only without it)
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
        identity=identity,
    )
    if stats["num_updates"] < updates or not (save / "checkpoint_last.pt").is_file():
        raise BenchError(f"{name}: expected {updates} updates and {save}/checkpoint_last.pt; log says {stats['num_updates']} ({log})")
    marker.write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def check_identity(save: Path, identity: dict | None) -> None:
    if identity is None:
        return
    path = save / "config.json"
    if path.is_file():
        recorded = json.loads(path.read_text())
        if recorded != identity:
            raise BenchError(
                f"{save} holds a run of another configuration or base ({path}: {json.dumps(recorded)}; now: {json.dumps(identity)}); "
                "give this configuration another --config name, or use another --work"
            )
        return
    save.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(identity, indent=2) + "\n")


def eval_spec(args, split: str) -> tuple[list[str], list | None, list[str]]:
    """What evaluate.py decodes: the set names of its result, the beam sweep, its options."""
    if split == "valid":
        return ["valid"], None, ["--split", "valid"]
    return args.test_set_names, args.sweep_beams, ["--test-set", "all", "--beams", ",".join(map(str, args.sweep_beams))]


def cached_eval(args, checkpoint: Path, out: Path, split: str = "test") -> dict | None:
    """out's evaluation if it is of this checkpoint, with today's sets and beams, and newer than the
    checkpoint; else None. The JSON is evaluate.py's last write, so it exists only for a finished run."""
    try:
        result = json.loads(out.read_text())
        fresh = out.stat().st_mtime >= checkpoint.stat().st_mtime
    except (OSError, ValueError):
        return None
    sets, beams, _ = eval_spec(args, split)
    same = (
        Path(result.get("checkpoint", "")) == checkpoint.resolve()
        and result.get("beam") == args.beam
        and result.get("beams") == beams
        and list(result.get("sets") or {}) == sets
    )
    return result if fresh and same else None


def evaluate(args, data: Path, checkpoint: Path, out: Path, reuse: tuple[Path, ...] = (), split: str = "test") -> dict:
    """split "test": every prepared test set at --beam with the --sweep-beams sweep, only in --phase final;
    split "valid": the valid set at --beam. out (or a valid one of reuse) is the cache."""
    if split != "valid" and args.phase != "final":
        raise BenchError(f"{checkpoint}: the test sets are decoded only in --phase final (this is --phase {args.phase})")
    for cached in (out, *reuse):
        result = cached_eval(args, checkpoint, cached, split)
        if result is not None:
            print(f"[bench] evaluation of {checkpoint} ({split}): done before ({cached}), reusing", flush=True)
            return result
    cmd = [
        PYTHON, ROOT / "scripts" / "evaluate.py", "--data", data, "--checkpoint", checkpoint,
        *eval_spec(args, split)[2], "--beam", args.beam,
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
    """The MLE base's training run (trained once into WORK/mle_base, or given by --base: never retrained) and
    the folder its candidates come from; --base FILE is the base itself (its folder: None)."""
    if args.base is None:
        base_dir = args.work / "mle_base"
        env = common_env(args, 1, args.mle_updates) | {"LR": str(args.mle_lr), "WARMUP": str(args.mle_warmup)}
        keep = max([8] + [int(c[3:]) for c in args.base_select if c.startswith("avg")])
        cmd = ["bash", ROOT / "scripts" / "train_mle.sh", data, base_dir, *eval_bleu_args(args, args.mle_validate_every),
               *select_args(args.mle_validate_every, keep), *shlex.split(args.train_extra)]  # fmt: skip
        return train_run(args, "mle_base", base_dir, cmd, env, args.mle_updates), base_dir
    folder = args.base if args.base.is_dir() else None
    print(f"[bench] mle_base: --base {args.base}, not trained here", flush=True)
    stats = {"name": "mle_base", "num_updates": None, "sec_per_update": None, "process_wall_s": 0.0, "max_rss_mib": None,
             "valid": [], "last_train_inner": {}, "command": f"(--base {args.base}: trained elsewhere)"}  # fmt: skip
    marker = (folder or args.base.parent) / "run.json"  # a base trained by this script describes itself
    if marker.is_file():
        recorded = json.loads(marker.read_text())
        if folder is not None or Path(recorded.get("checkpoint", "")).resolve() == args.base:
            stats |= {k: v for k, v in recorded.items() if k != "checkpoint"}
    return stats | {"reused_base": str(args.base)}, folder


def select_args(every: int, keep: int) -> list[str]:
    """fairseq-train keeps checkpoint_best.pt by validation BLEU, saved at every validation (without
    --save-interval-updates a validation between epoch ends would not save), and the newest keep interval ones."""
    return ["--best-checkpoint-metric", "bleu", "--maximize-best-checkpoint-metric",
            "--save-interval-updates", str(every), "--keep-interval-updates", str(keep)]  # fmt: skip


def base_candidates(args, folder: Path) -> dict[str, Path]:
    """--base-select's candidates found in folder; avgN is averaged into WORK/mle_base (never into a --base folder)."""
    out = {}
    for cand in args.base_select:
        if cand in ("best", "last"):
            path = folder / f"checkpoint_{cand}.pt"
            if path.is_file():
                out[cand] = path
            else:
                print(f"[bench] base candidate {cand}: no {path}, skipped", flush=True)
            continue
        try:
            inputs = newest_interval_checkpoints(folder, int(cand[3:]))
        except ValueError as e:
            print(f"[bench] base candidate {cand}: skipped ({e})", flush=True)
            continue
        out[cand] = averaged_checkpoint(inputs, args.work / "mle_base" / f"checkpoint_{cand}.pt")
    if not out:
        raise BenchError(f"none of --base-select {','.join(args.base_select)} is available in {folder}")
    return out


def averaged_checkpoint(inputs: list[Path], out: Path) -> Path:
    """scripts/average_checkpoints.py's average of inputs at out, reused while newer than them and of the same inputs."""
    record = out.with_suffix(".json")
    try:
        same = json.loads(record.read_text())["inputs"] == [str(p) for p in inputs]
        if same and out.stat().st_mtime >= max(p.stat().st_mtime for p in inputs):
            print(f"[bench] {out.name}: averaged before, reusing", flush=True)
            return out
    except (OSError, ValueError, KeyError):
        pass
    cmd = [PYTHON, ROOT / "scripts" / "average_checkpoints.py", "--inputs", *inputs, "--output", out]
    run_logged(cmd, out.with_suffix(".log"))
    record.write_text(json.dumps({"inputs": [str(p) for p in inputs]}, indent=2) + "\n")
    return out


def select_base(args, data: Path, folder: Path | None) -> tuple[Path, dict]:
    """The base checkpoint: --base FILE as given, else the candidate of the highest validation BLEU
    (evaluate.py --split valid at --beam; a tie goes to the earlier in --base-select). Never the test sets."""
    if folder is None:
        return args.base, {"given": str(args.base), "candidates": {}, "selected": None}
    table = {}
    for cand, path in base_candidates(args, folder).items():
        r = evaluate(args, data, path, args.work / "mle_base" / "select" / f"{cand}.valid.eval.json", split="valid")
        table[cand] = {"checkpoint": str(path), "valid_bleu": r["bleu"], "valid_chrf": r["chrf"], "bleu_signature": r["bleu_signature"]}
    best = max(table, key=lambda c: table[c]["valid_bleu"])
    print(f"[bench] base: {best} ({table[best]['checkpoint']}), valid BLEU {table[best]['valid_bleu']:.2f}", flush=True)
    return Path(table[best]["checkpoint"]), {"given": None, "candidates": table, "selected": best}


def base_identity(ckpt: Path) -> dict:
    st = ckpt.stat()
    return {"checkpoint": str(ckpt), "size": st.st_size, "mtime": int(st.st_mtime)}


def arm_command(args, config: Config, data: Path, base_ckpt: Path, save: Path, seed: int) -> tuple[list, dict]:
    """The continuation of one configuration from the base: fairseq-train's command and environment; the
    configuration's own fairseq options come last, so they override everything before them."""
    arm = config.arm
    env = common_env(args, seed, args.continue_updates) | {"MAX_TOKENS": str(args.continue_max_tokens)}
    cont_opt = ["--lr-scheduler", "fixed", "--lr", str(args.continue_lr), "--warmup-updates", "0"]
    extra = [*cont_opt, *eval_bleu_args(args, args.validate_every), *select_args(args.validate_every, 1),
             *shlex.split(args.train_extra), *config.options]  # fmt: skip
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


def train_configs(args, data: Path, base_ckpt: Path) -> dict[str, list[dict]]:
    """Every configuration, every seed, from the same base for the same number of updates (WORK/seedS/NAME)."""
    runs, base_id = {}, base_identity(base_ckpt)
    for seed in range(1, args.seeds + 1):
        for name, config in args.configs.items():
            save = args.work / f"seed{seed}" / name
            cmd, env = arm_command(args, config, data, base_ckpt, save, seed)
            identity = {"config": name, "arm": config.arm, "options": list(config.options), "base": base_id}
            stats = train_run(args, f"seed{seed}/{name}", save, cmd, env, args.continue_updates, identity)
            runs.setdefault(name, []).append(stats | {"seed": seed})
    return runs


def run_protocol(args) -> dict:
    t_start = time.time()
    data = prepare_data(args)
    prep = json.loads((data / "prep.json").read_text())
    # evaluate.py --test-set all scores the sets in prep.json's order; the first is the headline set
    args.test_set_names = list((prep.get("test_sets") or {"test": "test"}).values())

    base_stats, folder = base_run(args, data)
    base_ckpt, selection = select_base(args, data, folder)
    base_stats |= {"checkpoint": str(base_ckpt), "selection": selection}
    if args.base_only:
        return {"mle_base": {"train": base_stats, "selection": selection}}
    runs = train_configs(args, data, base_ckpt) | {"mle_base": [base_stats]}
    validation = collect_validation(args)
    if args.phase == "valid":
        return valid_summary(args, prep, runs, validation, time.time() - t_start)

    plan = test_plan(args, base_ckpt)
    marker = args.work / "test_read.json"
    read = claim_test_read(marker, plan, args.reread_test, shlex.join([Path(sys.executable).name, *sys.argv]))
    reuse = (base_ckpt.parent / "test.eval.json",) if args.base else ()
    evals = {"mle_base": [evaluate(args, data, base_ckpt, args.work / "mle_base" / "test.eval.json", reuse)]}
    for name in args.configs:
        for seed in range(1, args.seeds + 1):
            save = args.work / f"seed{seed}" / name
            evals.setdefault(name, []).append(evaluate(args, data, save / "checkpoint_best.pt", save / "test.eval.json"))
    sig = significance(args, evals)
    reads = finish_test_read(marker, read)
    summary = summarise(args, prep, runs, evals, sig, time.time() - t_start)
    return summary | {"validation": validation, "test_reads": reads, "phase": "final"}


# ---------------------------------------------------------------- configurations (--arms, --config)

ARMS = ("mle", "mrt", "soft_hamming", "soft_risk", "soft_bleu")
DEFAULT_ARMS = ("mle", "mrt", "soft_hamming", "soft_risk")
CONFIG_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
RESERVED_NAMES = ("mle_base",)


class Config(NamedTuple):
    """A configuration: an arm and the fairseq-train options added to it (last, so they win)."""

    name: str
    arm: str
    options: tuple[str, ...] = ()


def parse_config(text: str) -> Config:
    """--config NAME=ARM[:fairseq options] -> Config; ValueError saying what is wrong with text."""
    m = re.fullmatch(r"([^=:]*)=([^:]*)(?::(.*))?", text, re.S)
    if m is None:
        raise ValueError(f"--config {text!r}: expected NAME=ARM[:fairseq options], e.g. eps0.1=soft_hamming:'--soft-beam-epsilon 0.1'")
    name, arm, opts = m.groups()
    if not CONFIG_NAME_RE.fullmatch(name) or name in RESERVED_NAMES:
        raise ValueError(
            f"--config {text!r}: the name {name!r} must start with a letter or digit and hold only letters, digits, '.', '_', '+', '-' "
            f"(it names the work folder seedS/NAME), and not be {', '.join(RESERVED_NAMES)}"
        )
    if arm not in ARMS:
        raise ValueError(f"--config {text!r}: unknown arm {arm!r} (one of {', '.join(ARMS)})")
    try:
        options = tuple(shlex.split(opts or ""))
    except ValueError as e:
        raise ValueError(f"--config {text!r}: cannot split its fairseq options {opts!r} ({e})") from None
    if opts is not None and not options:
        raise ValueError(f"--config {text!r}: nothing after ':' (drop the ':' for the arm's defaults)")
    if options and not options[0].startswith("-"):
        raise ValueError(f"--config {text!r}: the fairseq options must start with an option such as --lr (got {options[0]!r})")
    return Config(name, arm, options)


def build_configs(arms: list[str], specs: list[str], mle_name: str, mrt_name: str | None) -> tuple[dict, str | None]:
    """The configurations (each of arms under its own name, then each --config) and the MRT baseline's name
    (mrt_name, else "mrt" when there is one); ValueError for a repeated name or a baseline of the wrong arm."""
    configs: dict[str, Config] = {}
    for config in [Config(a, a) for a in arms] + [parse_config(s) for s in specs]:
        if config.name in configs:
            raise ValueError(f"--config/--arms: the name {config.name!r} is given twice (each configuration needs its own)")
        configs[config.name] = config
    if configs.get(mle_name, Config("", "")).arm != "mle":
        raise ValueError(f"--mle-config {mle_name!r}: no configuration of arm mle by that name (the compute-matched baseline is required)")
    if mrt_name is None:
        return configs, ("mrt" if configs.get("mrt", Config("", "")).arm == "mrt" else None)
    if configs.get(mrt_name, Config("", "")).arm != "mrt":
        raise ValueError(f"--mrt-config {mrt_name!r}: no configuration of arm mrt by that name")
    return configs, mrt_name


def parse_base_select(text: str) -> list[str]:
    """--base-select: comma-separated best, last, avgN (N >= 1), each once."""
    cands = [c.strip() for c in text.split(",") if c.strip()]
    bad = [c for c in cands if c not in ("best", "last") and not re.fullmatch(r"avg[1-9][0-9]*", c)]
    if not cands or bad or len(set(cands)) != len(cands):
        raise ValueError(f"--base-select {text!r}: give best, last and/or avgN (N >= 1), comma-separated, each once")
    return cands


# ---------------------------------------------------------------- the base's model flags (--base)

# Keys of a fairseq checkpoint's cfg["model"] that fix the architecture (parameter names and shapes, or how the
# layers compute) and the flag that sets each: a switch (store_true) is given when its key is true. The first
# nine must be in the checkpoint; a key the checkpoint lacks is left to the arch's default. decoder_input_dim has
# no flag: the legacy transformer sets it to decoder_embed_dim.
ARCH_VALUE_KEYS = (
    "arch", "encoder_layers", "decoder_layers", "encoder_embed_dim", "decoder_embed_dim", "encoder_ffn_embed_dim",
    "decoder_ffn_embed_dim", "encoder_attention_heads", "decoder_attention_heads", "decoder_output_dim", "activation_fn",
    "dropout", "attention_dropout", "activation_dropout", "max_source_positions", "max_target_positions",
)  # fmt: skip
ARCH_SWITCH_KEYS = (
    "share_all_embeddings", "share_decoder_input_output_embed", "encoder_normalize_before", "decoder_normalize_before",
    "encoder_learned_pos", "decoder_learned_pos", "no_token_positional_embeddings", "no_scale_embedding",
    "layernorm_embedding", "no_cross_attention", "cross_self_attention",
)  # fmt: skip
ARCH_REQUIRED = ARCH_VALUE_KEYS[:9]
FLAG_ALIASES = {"-a": "--arch"}

# Run in a child: importing torch here would add its ~270 MiB to every later child's peak RSS (run_logged).
# weights_only=False: a fairseq checkpoint pickles its config (an argparse Namespace); the file is the user's own.
READ_MODEL_CFG = """
import json, sys, torch
state = torch.load(sys.argv[1], map_location="cpu", weights_only=False)
cfg = state.get("cfg") if isinstance(state, dict) else None
model = cfg.get("model") if cfg is not None else None
if model is None and isinstance(state, dict):
    model = state.get("args")  # checkpoints older than fairseq's cfg
if model is not None:
    model = dict(model) if hasattr(model, "keys") else vars(model)
print(json.dumps(model, default=str))
"""


def read_model_cfg(checkpoint: Path) -> dict:
    """The model config (cfg["model"], else args) of a fairseq checkpoint, read by a child process."""
    proc = subprocess.run([PYTHON, "-c", READ_MODEL_CFG, str(checkpoint)], capture_output=True, text=True)
    if proc.returncode != 0:
        why = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ValueError(f"--base: cannot read the checkpoint {checkpoint} ({why})")
    model = json.loads(proc.stdout.strip().splitlines()[-1])
    if not isinstance(model, dict):
        raise ValueError(f"--base: {checkpoint} holds no model config (cfg['model'] or args): not a fairseq checkpoint")
    return model


def flag_of(key: str) -> str:
    return "--" + key.replace("_", "-")


def arch_flags(model_cfg: dict, source: Path) -> list[str]:
    """fairseq-train's model flags that rebuild the model of model_cfg (a checkpoint's cfg["model"] as a dict)."""
    model_cfg = {"arch": model_cfg.get("_name")} | model_cfg  # a dataclass config names its arch only in _name
    missing = [k for k in ARCH_REQUIRED if model_cfg.get(k) is None]
    if missing:
        raise ValueError(f"--base: the model config of {source} lacks {', '.join(missing)}: not a fairseq transformer checkpoint")
    flags = []
    for key in ARCH_VALUE_KEYS:
        value = model_cfg.get(key)
        if value is not None:
            flags += [flag_of(key), repr(value) if isinstance(value, float) else str(value)]
    return flags + [flag_of(k) for k in ARCH_SWITCH_KEYS if model_cfg.get(k) is True]


def split_flags(text: str) -> list[tuple[str, str | bool, list[str]]]:
    """--arch-args as (flag, value or True for a flag without one, its tokens)."""
    tokens, out, i = shlex.split(text), [], 0
    while i < len(tokens):
        flag, eq, value = tokens[i].partition("=")
        if not flag.startswith("-"):
            raise ValueError(f"--arch-args {text!r}: {tokens[i]!r} is not a flag (expected --flag [value] ...)")
        flag = FLAG_ALIASES.get(flag, flag)
        if eq:
            out.append((flag, value, tokens[i : i + 1]))
            i += 1
        elif flag[2:].replace("-", "_") in ARCH_SWITCH_KEYS or i + 1 == len(tokens) or tokens[i + 1].startswith("--"):
            out.append((flag, True, tokens[i : i + 1]))
            i += 1
        else:
            out.append((flag, tokens[i + 1], tokens[i : i + 2]))
            i += 2
    return out


def same_value(given: str | bool, recorded) -> bool:
    if isinstance(recorded, bool):
        return given is recorded
    if isinstance(recorded, (int, float)) and isinstance(given, str):
        try:
            return float(given) == float(recorded)
        except ValueError:
            return False
    return str(given) == str(recorded)


def base_arch_args(model_cfg: dict, source: Path, arch_args: str | None) -> str:
    """The continuations' model flags: the base checkpoint's (model_cfg, read from source), then the flags of
    arch_args (--arch-args) that are not architecture keys. ValueError naming the first flag of arch_args that
    disagrees with the checkpoint (an architecture key the checkpoint lacks cannot disagree: it is kept)."""
    flags, extra = arch_flags(model_cfg, source), []
    recorded = {"arch": model_cfg.get("_name")} | model_cfg
    for flag, given, tokens in split_flags(arch_args or ""):
        key = flag[2:].replace("-", "_")
        if key not in ARCH_VALUE_KEYS + ARCH_SWITCH_KEYS or recorded.get(key) is None:
            extra += tokens
            continue
        want = recorded[key] is True if key in ARCH_SWITCH_KEYS else recorded[key]
        if not same_value(given, want):
            shown = "given" if given is True else given
            had = ("on" if want else "off") if key in ARCH_SWITCH_KEYS else want
            hint = " (another dropout for the continuations: --train-extra or a --config's options)" if "dropout" in key else ""
            raise ValueError(
                f"--arch-args: {flag} {shown} disagrees with the base checkpoint {source}, whose {key} is {had}; "
                f"with --base the model flags are read from the checkpoint, so --arch-args can be left out{hint}"
            )
    return " ".join(flags + extra)


def base_arch_checkpoint(base: Path) -> Path:
    """The checkpoint whose model config stands for --base: the file itself, or its folder's best, last or newest interval one."""
    if base.is_file():
        return base
    for name in ("checkpoint_best.pt", "checkpoint_last.pt"):
        if (base / name).is_file():
            return base / name
    try:
        return newest_interval_checkpoints(base, 1)[0]
    except ValueError:
        raise ValueError(f"--base {base}: the folder holds no checkpoint_best.pt, checkpoint_last.pt or checkpoint_E_U.pt") from None


# ---------------------------------------------------------------- the test sets, read once (--phase final)


def test_plan(args, base_ckpt: Path) -> dict:
    """What the final phase decodes on the test sets: per configuration its arm, options, seeds and checkpoints."""
    configs = {"mle_base": {"arm": "mle", "options": [], "seeds": [1], "checkpoints": [str(base_ckpt)]}}
    seeds = list(range(1, args.seeds + 1))
    for name, c in args.configs.items():
        ckpts = [str(args.work / f"seed{s}" / name / "checkpoint_best.pt") for s in seeds]
        missing = [c for c in ckpts if not Path(c).is_file()]
        if missing:
            raise BenchError(
                f"{missing[0]} not found: a run trained before runs kept their best checkpoint? Remove its folder to retrain it"
            )
        configs[name] = {"arm": c.arm, "options": list(c.options), "seeds": seeds, "checkpoints": ckpts}
    return {"configs": configs, "test_sets": list(args.test_set_names)}


def write_json_atomic(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def claim_test_read(marker: Path, plan: dict, reread: bool, command: str) -> int:
    """Records in marker that the test sets are read for plan's configurations, before any is decoded; returns
    the read's index. An unfinished read of the same plan is resumed (a killed final phase). Raises BenchError
    when a configuration of plan was read before, unless reread (--reread-test), which the read then records."""
    reads = json.loads(marker.read_text())["reads"] if marker.is_file() else []
    last = reads[-1] if reads else None
    if last is not None and last["finished"] is None and {k: last[k] for k in plan} == plan:
        print(f"[bench] resuming the unfinished test read of {last['started']} ({marker})", flush=True)
        return len(reads) - 1
    before = [name for name in plan["configs"] if any(name in r["configs"] for r in reads)]
    if before and not reread:
        when = ", ".join(r["started"] for r in reads)
        raise BenchError(
            f"the test sets were already read for {', '.join(before)} ({marker}: read(s) of {when}); the test is read "
            "once, for the final table. Pass --reread-test to read it again (the report will say so)"
        )
    now = dt.datetime.now().isoformat(timespec="seconds")
    reads.append({"started": now, "finished": None, "reread": before, "command": command} | plan)
    write_json_atomic(marker, {"reads": reads})
    return len(reads) - 1


def finish_test_read(marker: Path, index: int) -> dict:
    """Marks read index finished; returns what the report says about the test reads."""
    reads = json.loads(marker.read_text())["reads"]
    reads[index]["finished"] = dt.datetime.now().isoformat(timespec="seconds")
    write_json_atomic(marker, {"reads": reads})
    brief = [{k: r[k] for k in ("started", "finished", "reread")} | {"configs": list(r["configs"])} for r in reads]
    return {"file": str(marker), "this_read": index, "reads": brief}


# ---------------------------------------------------------------- validation figures (every configuration)


def best_point(points: list[dict]) -> dict | None:
    """The validation of the highest BLEU, the later on a tie: the one fairseq's checkpoint_best.pt holds
    (it replaces the best on >= with --maximize-best-checkpoint-metric)."""
    scored = [p for p in points if p.get("bleu") is not None]
    return max(scored, key=lambda p: (p["bleu"], p["num_updates"])) if scored else None


def config_validation(name: str, runs: list[dict], in_this_run: bool) -> dict:
    """One configuration over its seeds: best validation BLEU (mean, std), the update of each, the last BLEU."""
    ident = runs[0].get("identity") or {"arm": name if name in ARMS else "?", "options": []}
    out = {"arm": ident["arm"], "options": ident["options"], "seeds": [r["seed"] for r in runs], "in_this_run": in_this_run,
           "updates": [r.get("num_updates") for r in runs], "label": config_label(name, ident["arm"], ident["options"])}  # fmt: skip
    best = [best_point(r.get("valid", [])) for r in runs]
    with_stats(out, "best_bleu", [b["bleu"] if b else None for b in best])
    out["best_update"] = [b["num_updates"] if b else None for b in best]
    last = [next((p["bleu"] for p in reversed(r.get("valid", [])) if p.get("bleu") is not None), None) for r in runs]
    with_stats(out, "last_bleu", last)
    out["sec_per_update"] = mean_std([r.get("sec_per_update") for r in runs])[0]
    return out


def collect_validation(args) -> dict[str, dict]:
    """Every configuration trained in the work folder (WORK/seedS/NAME/run.json), of this invocation or an
    earlier one, best validation BLEU first: the ablation table."""
    found: dict[str, list[dict]] = {}
    for marker in args.work.glob("seed*/*/run.json"):
        seed = marker.parent.parent.name.removeprefix("seed")
        if seed.isdigit():
            found.setdefault(marker.parent.name, []).append(json.loads(marker.read_text()) | {"seed": int(seed)})
    table = {name: config_validation(name, sorted(rs, key=lambda r: r["seed"]), name in args.configs) for name, rs in found.items()}
    return dict(sorted(table.items(), key=lambda kv: -(kv[1]["best_bleu_mean"] if kv[1]["best_bleu_mean"] is not None else -1e9)))


def config_label(name: str, arm: str, options) -> str:
    label = ARM_LABELS.get(arm, arm)
    if name == arm and not options:
        return label
    return f"{name}: {label}" + (f", `{shlex.join(options)}`" if options else "")


# ---------------------------------------------------------------- significance (scripts/compare.py)


def comparisons(configs: dict, mle: str, mrt: str | None) -> list[tuple[str, str, list[str]]]:
    """(role, baseline, systems): every configuration against the MLE continuation (role "mle"), the soft
    ones against MRT (role "mrt") too; by configuration name."""
    out = [("mle", mle, [n for n in configs if n != mle])]
    soft = [n for n, c in configs.items() if c.arm.startswith("soft_")]
    if mrt is not None and soft:
        out.append(("mrt", mrt, soft))
    return [(r, b, s) for r, b, s in out if s]


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
    """set -> role ("mle", "mrt") -> system configuration -> {"per_seed": [entry per seed], "pooled": entry}, each
    entry from compare.py (paired bootstrap and approximate randomisation, BLEU and chrF); JSONs under WORK/compare."""
    out = {}
    for name in args.test_set_names:
        ref = Path(evals[args.mle_config][0]["sets"][name]["references_file"])
        hyp = {c: [Path(e["sets"][name]["hypotheses_file"]) for e in evals[c]] for c in args.configs}
        folder = args.work / "compare" / name
        for role, baseline, systems in comparisons(args.configs, args.mle_config, args.mrt_config):
            per = out.setdefault(name, {}).setdefault(role, {c: {"per_seed": []} for c in systems})
            for i, seed in enumerate(range(1, args.seeds + 1)):
                path = folder / f"seed{seed}.vs_{role}.json"
                result = run_compare(args, ref, hyp[baseline][i], [hyp[c][i] for c in systems], path)
                for j, c in enumerate(systems):
                    per[c]["per_seed"].append(compare_entry(result, j, path) | {"seed": seed})
            pooled = {c: pool(hyp[c], ref, folder / "pooled" / f"{c}.hyp.txt")[0] for c in [baseline, *systems]}
            path = folder / f"pooled.vs_{role}.json"
            result = run_compare(args, folder / "pooled" / "ref.txt", pooled[baseline], [pooled[c] for c in systems], path)
            for j, c in enumerate(systems):
                per[c]["pooled"] = compare_entry(result, j, path) | {"seeds": list(range(1, args.seeds + 1))}
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


def arm_summary(name: str, arm: str, rs: list[dict], es: list[dict], sig: dict) -> dict:
    """A configuration over its seeds; bleu/chrf (and their mean, std) are the first test set's, the headline one."""
    spu = [r.get("sec_per_update") for r in rs]
    spu_fallback = [r["process_wall_s"] / r["num_updates"] for r in rs if r.get("num_updates")]
    options = (rs[0].get("identity") or {}).get("options", []) if rs else []
    label = ARM_LABELS["mle_base"] if name == "mle_base" else config_label(name, arm, options)
    a = {"label": label, "arm": arm, "options": options, "n_seeds": len(es), "seeds": [r.get("seed", 1) for r in rs]}
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
        "checkpoints": [e.get("checkpoint") for e in es],
        "eval_files": [e.get("generate_output") for e in es],
        "sets": {
            set_name: set_summary([e["sets"][set_name] for e in es], {role: s.get(name) for role, s in sig.get(set_name, {}).items()})
            for set_name in (es[0]["sets"] if es else {})
        },
    }


def add_ratios(arms: dict, mle_name: str) -> None:
    mle = arms.get(mle_name, {})
    for name, a in arms.items():
        if name == "mle_base":  # other batch size and schedule: no per-update comparison
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


def common_summary(args, prep, runs, elapsed, eval_s: float) -> dict:
    """What both phases' reports say about the run: when, how, where, with which settings and base."""
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "configs"}
    settings["configs"] = {n: {"arm": c.arm, "options": list(c.options)} for n, c in args.configs.items()}
    base = runs["mle_base"][0]
    return {
        "created": dt.datetime.now().isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "elapsed_s": elapsed,
        "compute_s": sum(r.get("process_wall_s", 0.0) for rs in runs.values() for r in rs) + eval_s,
        "machine": machine_info("cuda" if args.gpu else "cpu"),
        "settings": settings,
        "data": prep,
        "base": {"checkpoint": base["checkpoint"], "reused": args.base is not None, "selection": base["selection"]},
        "baselines": {"mle": args.mle_config, "mrt": args.mrt_config},
    }


def valid_summary(args, prep, runs, validation, elapsed) -> dict:
    """--phase valid: validation figures only (the test sets are not decoded)."""
    arms = {name: arm_summary(name, "mle" if name == "mle_base" else args.configs[name].arm, rs, [], {}) for name, rs in runs.items()}
    for a in arms.values():
        a["n_seeds"] = len(a["seeds"])
    return common_summary(args, prep, runs, elapsed, 0.0) | {"phase": "valid", "validation": validation, "arms": arms}


def summarise(args, prep, runs, evals, sig, elapsed) -> dict:
    names = ["mle_base", *args.configs]
    arms = {n: arm_summary(n, "mle" if n == "mle_base" else args.configs[n].arm, runs.get(n, []), evals.get(n, []), sig) for n in names}
    add_ratios(arms, args.mle_config)
    first = evals["mle_base"][0]
    soft = [a for a in arms.values() if a["arm"].startswith("soft_")]
    targets = {
        "soft_beam_plus_1_bleu": {a["label"]: (a["delta_bleu_vs_mle"] is not None and a["delta_bleu_vs_mle"] >= 1.0) for a in soft},
        "cost_ratio_at_most_3x": {a["label"]: (a["cost_ratio_vs_mle"] is not None and a["cost_ratio_vs_mle"] <= 3.0) for a in soft},
        "full_protocol": args.seeds >= 3 and not args.subset and not args.tiny,
    }
    eval_s = sum(e.get("process_wall_s", 0.0) for es in evals.values() for e in es)
    return common_summary(args, prep, runs, elapsed, eval_s) | {
        "test_sets": {name: first["sets"][name]["n_sentences"] for name in first["sets"]},
        "bleu_signature": first["bleu_signature"],
        "chrf_signature": first["chrf_signature"],
        "test_sentences": first.get("n_sentences"),
        "significance_files": sorted({e["compare_json"] for e in sig_entries(sig)}),
        "arms": arms,
        "targets": targets,
    }


# ---------------------------------------------------------------- CLI


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
                   help="use this MLE base instead of training one (same data; its model flags are read from it): a "
                        "checkpoint file, used as it is, or a save folder (scripts/train_base.sh's), whose --base-select "
                        "candidates are compared")  # fmt: skip
    p.add_argument("--base-select", default="best,last,avg8",
                   help="base candidates of the base's folder, comma-separated: best (checkpoint_best.pt), last "
                        "(checkpoint_last.pt), avgN (the average of the newest N checkpoint_E_U.pt); the one of the "
                        "highest validation BLEU (evaluate.py --split valid) is the base; missing ones are skipped")  # fmt: skip
    p.add_argument("--continue-updates", type=int, default=200)
    p.add_argument("--continue-lr", type=float, default=1e-4)
    p.add_argument("--validate-every", type=int, default=None, help="default: continue-updates / 4")
    p.add_argument("--seeds", type=int, default=3, help="continuation seeds 1..N (the base MLE run is shared)")
    p.add_argument("--arms", default=",".join(DEFAULT_ARMS),
                   help=f"comma-separated subset of {','.join(ARMS)}, each a configuration named after its arm")  # fmt: skip
    p.add_argument("--config", action="append", default=[], metavar="NAME=ARM[:OPTIONS]",
                   help="a named configuration (repeatable): ARM continued from the base with these fairseq-train options "
                        "last, e.g. eps0.1=soft_hamming:'--soft-beam-epsilon 0.1'; its runs go to WORK/seedS/NAME")  # fmt: skip
    p.add_argument("--mle-config", default="mle", help="the configuration (arm mle) every other is compared with")
    p.add_argument("--mrt-config", default=None, help="the configuration (arm mrt) the soft ones are compared with (default: mrt if run)")
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
    p.add_argument("--arch-args", default=None,
                   help="model flags for fairseq-train (default: the small transformer; with --base: the base checkpoint's, "
                        "which these, if given, must agree with)")  # fmt: skip
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
    p.add_argument(
        "--results", type=Path, default=None, help="markdown report (default: docs/results.md; --phase valid: WORK/validation.md)"
    )  # noqa: E501
    p.add_argument("--json", type=Path, default=None, help="default: --results with .json")
    p.add_argument("--plot", type=Path, default=None, help="default: --results with _valid_bleu.png")
    p.add_argument("--base-only", action="store_true",
                   help="stop after the base MLE run and its selection on validation (printed as JSON); later runs reuse it")  # fmt: skip
    p.add_argument("--phase", choices=("valid", "final"), default="valid",
                   help="valid: train/continue every configuration and report validation figures only (the test sets are "
                        "not decoded); final: also decode every test set, once (WORK/test_read.json), for the final table")  # fmt: skip
    p.add_argument("--reread-test", action="store_true",
                   help="--phase final: decode the test sets again for configurations read before (the report says so)")  # fmt: skip


def check_args(p, args) -> None:
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in args.arms if a not in ARMS]
    if bad or len(set(args.arms)) != len(args.arms):
        p.error(f"--arms: a comma-separated subset of {', '.join(ARMS)}, each once (got {args.arms})")
    try:
        args.configs, args.mrt_config = build_configs(args.arms, args.config, args.mle_config, args.mrt_config)
        args.base_select = parse_base_select(args.base_select)
    except ValueError as e:
        p.error(str(e))
    try:
        args.sweep_beams = [int(b) for b in args.sweep_beams.split(",")]
    except ValueError:
        args.sweep_beams = []
    if not args.sweep_beams or min(args.sweep_beams) < 1 or len(set(args.sweep_beams)) != len(args.sweep_beams):
        p.error(f"--sweep-beams needs distinct positive beam sizes, comma-separated (got {args.sweep_beams!r})")
    if min(args.mle_updates, args.continue_updates, args.seeds, args.paired_bs_n, args.paired_ar_n) < 1:
        p.error("--mle-updates, --continue-updates, --seeds, --paired-bs-n and --paired-ar-n must be >= 1")
    if args.reread_test and args.phase != "final":
        p.error("--reread-test is for --phase final (--phase valid never reads the test sets)")
    if not args.raw_dir.is_dir():
        p.error(f"--raw-dir {args.raw_dir} not found (the Multi30k raw .gz files)")
    if args.base is not None:
        check_base(p, args)


def check_base(p, args) -> None:
    """--base exists; the continuations' model flags (args.arch_args) are read from its checkpoint (args.arch_args_from)."""
    if not args.base.exists():
        hint = "an MLE checkpoint or save folder trained on the same data, e.g. WORK/mle_base/checkpoint_best.pt"
        p.error(f"--base {args.base}: no such checkpoint file or folder (give {hint})")
    args.base = args.base.resolve()
    try:
        source = base_arch_checkpoint(args.base)
        args.arch_args = base_arch_args(read_model_cfg(source), source, args.arch_args)
    except ValueError as e:
        p.error(str(e))
    args.arch_args_from = str(source)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_data_options(p)
    add_training_options(p)
    add_eval_options(p)
    args = p.parse_args(argv)
    args.arch_args_from = None
    check_args(p, args)
    args.arch_args = args.arch_args or (TINY_ARCH if args.tiny else SMALL_ARCH)
    args.mle_validate_every = args.mle_validate_every or max(1, args.mle_updates // 5)
    args.continue_max_tokens = args.continue_max_tokens or args.max_tokens
    args.validate_every = args.validate_every or max(1, args.continue_updates // 4)
    args.work = args.work.resolve()
    args.results = args.results or (ROOT / "docs" / "results.md" if args.phase == "final" else args.work / "validation.md")
    args.json = args.json or args.results.with_suffix(".json")
    args.plot = args.plot or args.results.with_name(args.results.stem + "_valid_bleu.png")
    args.gpu = not args.cpu and cuda_available()
    return args


def cuda_available() -> bool:
    # asked of a child: importing torch here would add its ~270 MiB to every later child's peak RSS (run_logged)
    probe = [PYTHON, "-c", "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"]
    return subprocess.run(probe, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0


def print_final(summary: dict) -> None:
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


def print_valid(summary: dict) -> None:
    for name, v in summary["validation"].items():
        at = ", ".join(map(str, v["best_update"]))
        print(f"[bench] {name:13s} best valid BLEU {fmt(v['best_bleu_mean'])} ± {fmt(v['best_bleu_std'])} at update(s) {at}")


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
    if args.phase == "final":
        write_markdown(summary, args.results, args.plot, args.json)
        print_final(summary)
    else:
        write_valid_markdown(summary, args.results, args.plot, args.json)
        print_valid(summary)
    print(f"[bench] wrote {args.results}, {args.json}, {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
