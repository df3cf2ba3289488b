#!/usr/bin/env bash
# Everything a GPU must show about soft-beam, in one call of at most 8 minutes (issue 16, part 1).
#
#   scripts/gpu_check.sh [--device cuda|cpu] [--quick] [--out DIR] [--raw-dir DIR] [--keep-work]
#
# Writes OUT/<device>.md (the report) and OUT/<device>.json (each part's status and the targets),
# plus each part's raw JSON as OUT/<device>-<part>.json; <device> is torch's device name slugified:
# nvidia-h200, cpu-intel-xeon-.... The parts, in this order, each under its own time limit:
#   pytest     pytest -m cuda: the CUDA tests (without CUDA they are collected and skipped)
#   topk       scripts/bench_soft_topk.py on the beam-search grid, float32 and bfloat16, against torch.topk
#   setup      a tiny model in a temporary folder: data_prep/prepare-multi30k.sh (--no-download, from
#              --raw-dir) and scripts/train_mle.sh for a few updates
#   train      scripts/bench_train_step.py: the MLE step against the soft_beam step (k = 4), whole batch
#              and --search-fractions 0.25, fp32 and bf16 (fp32 only on the CPU)
#   generate   bench_train_step.py --parts generate: our generator against stock fairseq's, same checkpoint
#   syncs      scripts/bench_syncs.py: host reads and CUDA sync warnings per decoding step
# A part that fails is reported "failed (rc N)" with the last lines of its log; one that overruns its
# limit is "not run (timeout after N s)"; train, generate and syncs are "not run" without a model. No
# part stops the others, and the script exits 0 once the report is written.
#
# Options:
#   --device cuda|cpu  default cuda when torch sees a GPU; without one you must say --device cpu
#   --quick            smoke sizes: the CPU mode that tests/test_gpu_check.py runs (about a minute of CPU time)
#   --out DIR          where the report goes (default docs/gpu)
#   --raw-dir DIR      the Multi30k .gz files (default ../shared/data/multi30k beside the checkout)
#   --keep-work        keep the temporary folder (data, model, logs) and print its path
# Env: PYTHON (default .venv/bin/python; fairseq-preprocess and fairseq-train beside it, else on PATH), and
#   GPU_CHECK_LIMIT_S_<PART> (PART = PYTEST TOPK SETUP TRAIN GENERATE SYNCS): a part's limit in seconds.
#   Defaults: 75 90 120 90 60 30 (465 s in all); with --quick: 120 each (a busy CPU is slow).
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; }
die() { echo "gpu_check.sh: error: $*" >&2; exit 2; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEVICE="" QUICK=0 OUT="$REPO/docs/gpu" RAW_DIR="$REPO/../shared/data/multi30k" KEEP=0
while (($#)); do
    case $1 in
    -h | --help) usage; exit 0 ;;
    --device) DEVICE=${2:?--device needs a value}; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --out) OUT=${2:?--out needs a value}; shift 2 ;;
    --raw-dir) RAW_DIR=${2:?--raw-dir needs a value}; shift 2 ;;
    --keep-work) KEEP=1; shift ;;
    *) usage >&2; die "unknown option: $1" ;;
    esac
done

PY=${PYTHON:-$REPO/.venv/bin/python}
[[ -x $PY ]] || PY=$(command -v "${PYTHON:-python3}") || die "no python: set PYTHON or run make env"
BIN=$(dirname "$PY")
tool() { if [[ -x $BIN/$1 ]]; then echo "$BIN/$1"; else command -v "$1" || echo "$BIN/$1"; fi; }
FAIRSEQ_PREPROCESS=$(tool fairseq-preprocess) FAIRSEQ_TRAIN=$(tool fairseq-train)
"$PY" -c 'import torch' 2>/dev/null || die "$PY cannot import torch (run make env, or set PYTHON)"
HAS_CUDA=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))')
case $DEVICE in
"") ((HAS_CUDA)) || die "torch sees no CUDA GPU; pass --device cpu to run the CPU mode"; DEVICE=cuda ;;
cuda) ((HAS_CUDA)) || die "--device cuda: torch sees no CUDA GPU; pass --device cpu" ;;
cpu) ;;
*) die "--device must be cuda or cpu, got '$DEVICE'" ;;
esac
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

# The device's name, slugified: "NVIDIA H200" -> nvidia-h200; a CPU -> cpu-<its model>.
NAME=$("$PY" - "$DEVICE" <<'PY'
import re, sys, platform
import torch
if sys.argv[1] == "cuda":
    name = torch.cuda.get_device_name(0)
else:
    model = next((line.split(":", 1)[1] for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    name = "cpu " + (model or "unknown")
name = re.sub(r"\((r|tm)\)", "", name.lower())
print(re.sub(r"[^a-z0-9]+", "-", name).strip("-"))
PY
)

WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
if ((KEEP)); then echo "gpu_check.sh: work folder $WORK" >&2; else trap 'rm -rf "$WORK"' EXIT; fi
mkdir -p "$WORK/logs" "$WORK/sections"
STATUS="$WORK/status.tsv"  # part, rc, seconds, limit, raw JSON file
: >"$STATUS"
START=$SECONDS

declare -A DEFAULT_LIMIT=([pytest]=75 [topk]=90 [setup]=120 [train]=90 [generate]=60 [syncs]=30)
for part in "${!DEFAULT_LIMIT[@]}"; do  # checked up front: a typo must not surface after minutes
    if ((QUICK)); then DEFAULT_LIMIT[$part]=120; fi
    var="GPU_CHECK_LIMIT_S_${part^^}"
    value=${!var:-${DEFAULT_LIMIT[$part]}}
    [[ $value =~ ^[0-9]+$ && $value -ge 1 ]] || die "$var must be a whole number of seconds >= 1, got '$value'"
    DEFAULT_LIMIT[$part]=$value
done

# run_part PART JSON_NAME FUNCTION: runs the exported FUNCTION under PART's limit, stdout to
# sections/PART.md (the report's text), stderr to logs/PART.log. Never fails itself.
run_part() {
    local part=$1 json=$2 limit=${DEFAULT_LIMIT[$1]} rc=0 t0=$SECONDS
    echo "gpu_check.sh: $part (limit $limit s)" >&2
    timeout --kill-after=10 "$limit" bash -c 'set -euo pipefail; "$@"' _ "$3" >"$WORK/sections/$part.md" 2>"$WORK/logs/$part.log" || rc=$?
    if ((rc == 137)); then rc=124; fi  # killed after the grace period: still a timeout
    printf '%s\t%s\t%s\t%s\t%s\n' "$part" "$rc" "$((SECONDS - t0))" "$limit" "$json" >>"$STATUS"
    echo "gpu_check.sh: $part: rc $rc after $((SECONDS - t0)) s" >&2
}

skip_part() {  # skip_part PART REASON
    printf '%s\tskip\t0\t%s\t%s\n' "$1" "${DEFAULT_LIMIT[$1]}" "$2" >>"$STATUS"
}

has_flag() {  # has_flag SCRIPT FLAG: does SCRIPT's --help list FLAG? (flags other helpers are adding)
    "$PY" "$REPO/scripts/$1" --help 2>/dev/null | grep -q -- "$2"
}

# ---------------------------------------------------------------- sizes
if ((QUICK)); then
    SUBSET=400 VOCAB=300 MAX_UPDATE=10 MAX_TOKENS_TRAIN=1024 STEP_TOKENS=512 BATCHES=1 REPS=1 GEN_SENTENCES=128 SYNC_SENTENCES=8
    TINY_ARCH="--arch transformer --share-all-embeddings --encoder-layers 1 --decoder-layers 1 --encoder-embed-dim 32
      --decoder-embed-dim 32 --encoder-ffn-embed-dim 64 --decoder-ffn-embed-dim 64 --encoder-attention-heads 2
      --decoder-attention-heads 2 --dropout 0.1"
else
    SUBSET=29000 VOCAB=8000 MAX_UPDATE=300 MAX_TOKENS_TRAIN=4096 STEP_TOKENS=4096 BATCHES=4 REPS=3 GEN_SENTENCES=0 SYNC_SENTENCES=64
    TINY_ARCH=""  # train_mle.sh's default: the Multi30k transformer (3+3 layers, dim 256)
fi
if [[ $DEVICE == cuda ]]; then PRECISIONS=fp32,bf16 DEVICE_ARGS=""; else PRECISIONS=fp32 DEVICE_ARGS="--cpu"; fi
export REPO PY FAIRSEQ_PREPROCESS FAIRSEQ_TRAIN DEVICE QUICK OUT NAME WORK RAW_DIR SUBSET VOCAB MAX_UPDATE MAX_TOKENS_TRAIN STEP_TOKENS BATCHES REPS \
    GEN_SENTENCES SYNC_SENTENCES TINY_ARCH PRECISIONS DEVICE_ARGS

# Each part is a function, run by run_part in a fresh `bash -c` under its limit (hence exported).
has_flag() {  # has_flag SCRIPT FLAG: does SCRIPT's --help list FLAG? (flags that other work may add)
    "$PY" "$REPO/scripts/$1" --help 2>/dev/null | grep -q -- "$2"
}

pytest_part() {  # 1. the CUDA tests; without CUDA, conftest.py skips each one
    "$PY" -m pytest -m cuda -q -p no:cacheprovider -rs "$REPO/tests"
}

topk_part() {  # 2. the operator against torch.topk
    local args=(--device "$DEVICE" --markdown "$WORK/topk.md")
    if has_flag bench_soft_topk.py --grid; then args+=(--grid beam-search); fi
    if has_flag bench_soft_topk.py --dtypes; then args+=(--dtypes float32,bfloat16); fi
    if has_flag bench_soft_topk.py --json; then args+=(--json "$OUT/$NAME-topk.json"); fi
    if ((QUICK)); then args+=(--quick); fi
    "$PY" "$REPO/scripts/bench_soft_topk.py" "${args[@]}" >&2
    cat "$WORK/topk.md"
}

setup_part() {  # a tiny model in $WORK: Multi30k (one test set), a few MLE updates
    PYTHON="$PY" FAIRSEQ_PREPROCESS="$FAIRSEQ_PREPROCESS" bash "$REPO/data_prep/prepare-multi30k.sh" --tgt de \
        --no-download --raw-dir "$RAW_DIR" --test-sets test_2016_flickr --subset "$SUBSET" --vocab-size "$VOCAB" \
        --out "$WORK/data" >&2
    FAIRSEQ_TRAIN="$FAIRSEQ_TRAIN" ARCH_ARGS="$TINY_ARCH" DEVICE_ARGS="$DEVICE_ARGS" MAX_UPDATE="$MAX_UPDATE" \
        MAX_TOKENS="$MAX_TOKENS_TRAIN" WARMUP=$((MAX_UPDATE / 2 + 1)) LR=1e-3 LOG_INTERVAL=5 \
        bash "$REPO/scripts/train_mle.sh" "$WORK/data" "$WORK/mle" --no-save-optimizer-state --disable-validation >&2
    [[ -s $WORK/mle/checkpoint_last.pt ]] || { echo "train_mle.sh wrote no checkpoint_last.pt" >&2; return 1; }
    local arch=${TINY_ARCH:-"the default architecture of train_mle.sh (3+3 layers, dim 256)"}
    echo "Multi30k en-de, at most $SUBSET training pairs, vocabulary $VOCAB, $MAX_UPDATE updates of" $arch.
}

model_args() { echo --data "$WORK/data" --checkpoint "$WORK/mle/checkpoint_last.pt" --device "$DEVICE"; }

train_part() {  # 3. the MLE step against the soft_beam step
    local args=(--parts train --beams 4 --search-fractions 1,0.25 --max-tokens "$STEP_TOKENS" --batches "$BATCHES"
        --reps "$REPS" --json "$OUT/$NAME-train.json")
    if has_flag bench_train_step.py --precisions; then args+=(--precisions "$PRECISIONS"); fi
    # shellcheck disable=SC2046  # model_args: paths without spaces (mktemp's)
    "$PY" "$REPO/scripts/bench_train_step.py" $(model_args) "${args[@]}"
}

generate_part() {  # 4. our generator (eps 0) against fairseq's SequenceGenerator, same checkpoint
    # shellcheck disable=SC2046
    "$PY" "$REPO/scripts/bench_train_step.py" $(model_args) --parts generate --beams 4 --gen-beam 5 \
        --gen-sentences "$GEN_SENTENCES" --reps "$REPS" --batches 1 --json "$OUT/$NAME-generate.json"
}

syncs_part() {  # 5. host reads and sync warnings per decoding step
    # shellcheck disable=SC2046
    "$PY" "$REPO/scripts/bench_syncs.py" $(model_args) --sentences "$SYNC_SENTENCES" --beam 5 --json "$OUT/$NAME-syncs.json"
}
export -f has_flag pytest_part topk_part setup_part model_args train_part generate_part syncs_part

for part in topk train generate syncs; do rm -f "$OUT/$NAME-$part.json"; done  # never report a stale figure
run_part pytest "" pytest_part
run_part topk "$NAME-topk.json" topk_part
run_part setup "" setup_part
setup_rc=$(tail -n 1 "$STATUS" | cut -f2)
for part in train generate syncs; do
    if [[ $setup_rc == 0 ]]; then
        run_part "$part" "$NAME-$part.json" "${part}_part"
    else
        skip_part "$part" "no model: the setup part did not finish"
    fi
done

# ---------------------------------------------------------------- the report
GIT_REV=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
git -C "$REPO" diff --quiet HEAD 2>/dev/null || GIT_REV="$GIT_REV (with uncommitted changes)"
"$PY" - "$WORK" "$OUT" "$NAME" "$DEVICE" "$QUICK" "$((SECONDS - START))" "$GIT_REV" <<'PY'
import json, os, platform, re, subprocess, sys, time
from pathlib import Path

work, out, name, device, quick, total, rev = Path(sys.argv[1]), Path(sys.argv[2]), *sys.argv[3:]
TITLES = {"pytest": "1. pytest -m cuda", "topk": "2. soft top-k against torch.topk (bench_soft_topk.py)",
          "setup": "setup: tiny model (prepare-multi30k.sh, train_mle.sh)",
          "train": "3. training step, MLE against soft_beam (bench_train_step.py)",
          "generate": "4. generation against stock fairseq (bench_train_step.py --parts generate)",
          "syncs": "5. host-device syncs per decoding step (bench_syncs.py)"}


def tail(path, n=15):
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    return "\n".join(lines[-n:]) or "(no output)"


def status_of(part, rc, limit, extra):
    if rc == "skip":
        return f"not run ({extra})"
    if rc == "124":
        return f"not run (timeout after {limit} s)"
    if rc != "0":
        return f"failed (rc {rc})"
    if part == "pytest":
        line = tail(work / "sections/pytest.md", 1)
        counts = ", ".join(f"{n} {word}" for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)", line))
        return (counts or "ok") + (" (no CUDA)" if device == "cpu" else "")
    return "ok"


rows = [line.split("\t") for line in (work / "status.tsv").read_text().splitlines()]
parts = {}
for part, rc, seconds, limit, extra in rows:
    js = extra if rc != "skip" and extra and (out / extra).exists() else None
    parts[part] = {"status": status_of(part, rc, limit, extra), "rc": None if rc == "skip" else int(rc),
                   "seconds": int(seconds), "limit_s": int(limit), "json": js}


def nested(text):
    """A benchmark's markdown under the report's "## part" heading: its "# note" lines as text, its
    headings one level down."""
    lines = [line[2:] if line.startswith("# ") else "#" + line if line.startswith("#") else line for line in text.splitlines()]
    return "\n".join(lines)


def load(part):
    js = parts.get(part, {}).get("json")
    return json.loads((out / js).read_text()) if js else None


def topk_target():
    doc = load("topk")
    if doc is None:
        return None
    cells = [r for r in doc.get("rows", []) if r.get("method") == "ours-fb" and r.get("x_topk") is not None
             and r.get("n") == 2 * r.get("k", 0) ** 2]
    if not cells:
        return None
    worst = max(cells, key=lambda r: r["x_topk"])
    return (f"worst cell {worst['x_topk']:.2f}x (rows {worst.get('rows')}, k {worst.get('k')}, {worst.get('dtype')})",
            all(r["x_topk"] <= 3 for r in cells))


def train_target():
    doc = load("train")
    if doc is None:
        return None
    found = []
    for precision, by_tokens in doc.get("train", {}).items():
        for tokens, methods in by_tokens.items():
            for method, r in methods.items():
                if method.startswith("soft_beam") and ("fraction" not in method or "fraction 1)" in method or "fraction 1," in method):
                    found.append((f"{precision}, {tokens} tokens: {r['ratio']:.2f}x", r["ratio"] <= 3))
    if not found:
        return None
    return "; ".join(t for t, _ in found), all(ok for _, ok in found)


def generate_target():
    doc = load("generate")
    gen = (doc or {}).get("generate", {})
    ours = gen.get("soft-beam generator (eps 0)")
    if not ours:
        return None
    same = gen.get("identical")
    return f"{ours['ratio']:.3f}x stock; top hypotheses identical: {same}", ours["ratio"] <= 1.10 and bool(same)


targets = {}
for key, label, fn in (("topk", "soft top-k forward + backward within 3x torch.topk (pruned beam-search cells)", topk_target),
                       ("train", "whole-batch soft_beam step within 3x the MLE step", train_target),
                       ("generate", "generation within 10% of stock fairseq, same output", generate_target)):
    try:
        got = fn()
    except (KeyError, TypeError, ValueError) as e:  # a benchmark changed its JSON: say so, keep the report
        got = (f"could not read the JSON ({type(e).__name__}: {e})", None)
    targets[key] = {"target": label, "measured": got[0] if got else "not measured", "reached": got[1] if got else None}

try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=20).stdout.strip()
except (OSError, subprocess.SubprocessError):
    smi = ""
import torch  # noqa: E402

machine = {"device": device, "device_name": name, "torch": torch.__version__, "cuda": torch.version.cuda,
           "nvidia_smi": smi or None, "python": platform.python_version(), "cpu_count": os.cpu_count()}
summary = {"device_name": name, "quick": quick == "1", "commit": rev, "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
           "total_s": int(total), "machine": machine, "parts": parts, "targets": targets}
(out / f"{name}.json").write_text(json.dumps(summary, indent=2) + "\n")

md = [f"# gpu_check.sh on {name}", "",
      f"{summary['date_utc']} UTC, commit {rev}, {'--quick' if quick == '1' else 'full sizes'}, {total} s in all. "
      f"torch {torch.__version__} (CUDA {torch.version.cuda}), Python {machine['python']}, {machine['cpu_count']} CPUs"
      + (f"; nvidia-smi: {smi}" if smi else "") + ".", "",
      "| part | status | seconds | limit (s) |", "|---|---|---|---|"]
md += [f"| {TITLES[p]} | {r['status']} | {r['seconds']} | {r['limit_s']} |" for p, r in parts.items()]
md += ["", "## Targets", "", "| target | measured | reached |", "|---|---|---|"]
word = {True: "yes", False: "no", None: "not measured"}
md += [f"| {t['target']} | {t['measured']} | {word[t['reached']]} |" for t in targets.values()]
for part, r in parts.items():
    md += ["", f"## {TITLES[part]}", "", f"Status: {r['status']}." + (f" Raw figures: `{r['json']}`." if r["json"] else "")]
    text = (work / f"sections/{part}.md").read_text().strip() if r["rc"] is not None else ""
    if r["rc"] == 0:
        md += ["", f"```\n{text}\n```" if part == "pytest" else nested(text) or "(no output)"]
    elif r["rc"] is not None:
        log = tail(work / f"logs/{part}.log")
        md += ["", "Last lines of its output:", "", "```", tail(work / f"sections/{part}.md") if log == "(no output)" else log, "```"]
(out / f"{name}.md").write_text("\n".join(md) + "\n")
print(f"gpu_check.sh: wrote {out / (name + '.md')} and {out / (name + '.json')}", file=sys.stderr)
PY
