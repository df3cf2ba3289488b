#!/usr/bin/env bash
# The one command the device tool's `run` executes on the GPU machine (issue 16): installs what
# scripts/gpu_bundle.sh carried, builds fairseq-fixed there, then runs scripts/gpu_check.sh --device cuda,
# all inside one 10-minute call. docs/gpu/README.md has the exact run call.
#
#   bash scripts/gpu_device_run.sh [--bundle DIR] [--out DIR] [--budget-s N] [--build-limit-s N] [--dry-run]
#
# Steps: (1) the bundle's wheels into WORK/site (pip --target, no index); (2) the fairseq-fixed sdist built
# against the machine's torch (--no-build-isolation --no-deps, build_ext in parallel on every core, CUDA_HOME
# unset so that only the CPU extensions fairseq needs are compiled: about 1 to 2 minutes on 16 cores, capped
# by --build-limit-s); (3) a Python whose folder holds fairseq-train, -preprocess, -generate and -interactive
# (a --without-pip venv in WORK that sees the image's site-packages, because gpu_check.sh and tests/helpers.py
# take the tools from beside the interpreter), with PYTHONPATH=WORK/site:<repo>; (4) gpu_check.sh with each
# part's limit scaled down so that everything ends within --budget-s. A failed build does not stop step 4
# (the parts without fairseq still run; the others are reported failed).
# Writes into OUT: gpu_check.sh's report (<device>.md, .json and up to 4 raw JSONs) and device-run.log (this
# script's whole output, the build's included): at most 7 files, under the tool's 8.
#
# Options:
#   --bundle DIR        what gpu_bundle.sh filled (default <repo>/.gpu_bundle)
#   --out DIR           default $OUT (set by the device tool)
#   --budget-s N        the whole run, build included (default 550: the tool's limit is 600)
#   --build-limit-s N   the fairseq build's own limit (default 240)
#   --dry-run           check that the carried pieces exist, print the commands and the part limits, run nothing
# Env: PYTHON (default python3: the device's interpreter with torch), GPU_CHECK_LIMIT_S_<PART> (kept as given),
#   GPU_DEVICE_RUN_WORK (default /tmp/gpu_device_run).
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; }
die() { echo "gpu_device_run.sh: error: $*" >&2; exit 2; }
log() { echo "gpu_device_run.sh: $*" >&2; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUNDLE="$REPO/.gpu_bundle" OUT_DIR=${OUT:-} BUDGET=550 BUILD_LIMIT=240 DRY=0
while (($#)); do
    case $1 in
    -h | --help) usage; exit 0 ;;
    --bundle) BUNDLE=${2:?--bundle needs a value}; shift 2 ;;
    --out) OUT_DIR=${2:?--out needs a value}; shift 2 ;;
    --budget-s) BUDGET=${2:?--budget-s needs a value}; shift 2 ;;
    --build-limit-s) BUILD_LIMIT=${2:?--build-limit-s needs a value}; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    *) usage >&2; die "unknown option: $1" ;;
    esac
done
[[ $BUDGET =~ ^[0-9]+$ ]] || die "--budget-s must be a whole number of seconds, got '$BUDGET'"
[[ $BUILD_LIMIT =~ ^[0-9]+$ && $BUILD_LIMIT -ge 1 ]] || die "--build-limit-s must be a whole number >= 1, got '$BUILD_LIMIT'"
[[ -n $OUT_DIR ]] || die "--out DIR is needed (the device tool sets \$OUT)"
BUNDLE=$(cd "$BUNDLE" 2>/dev/null && pwd) || die "--bundle $BUNDLE does not exist: run scripts/gpu_bundle.sh here and carry it"
PY=${PYTHON:-python3}
FAIRSEQ_VERSION=0.12.3.1
WORK=${GPU_DEVICE_RUN_WORK:-/tmp/gpu_device_run}
SITE=$WORK/site VENV=$WORK/venv
SDIST=$BUNDLE/sdist/fairseq_fixed-$FAIRSEQ_VERSION.tar.gz
RAW_FILES=(train.en.gz train.de.gz val.en.gz val.de.gz test_2016_flickr.en.gz test_2016_flickr.de.gz)
# gpu_check.sh's own defaults (its DEFAULT_LIMIT), scaled below; the report takes about REPORT_S after them
PARTS=(pytest topk setup train generate syncs) PART_S=(75 90 120 90 60 30) REPORT_S=20 INSTALL_S=15

check_carried() {  # every piece the run needs, each missing one named
    local missing=() f
    compgen -G "$BUNDLE/whl/*.whl" >/dev/null || missing+=("$BUNDLE/whl/*.whl")
    [[ -f $SDIST ]] || missing+=("$SDIST")
    for f in "${RAW_FILES[@]}"; do [[ -f $BUNDLE/multi30k/$f ]] || missing+=("$BUNDLE/multi30k/$f"); done
    for f in scripts/gpu_check.sh soft_beam/__init__.py fairseq_plugins/__init__.py; do
        [[ -f $REPO/$f ]] || missing+=("$REPO/$f")
    done
    ((${#missing[@]} == 0)) || die "not carried: ${missing[*]} (run scripts/gpu_bundle.sh, and name its folder in carry)"
}

step() {  # prints the command; runs it unless --dry-run
    echo "+ $(printf '%q ' "$@")" >&2
    ((DRY)) || "$@"
}

# part_limits SECONDS: gpu_check.sh's part limits, scaled down (never up) to fit SECONDS; one assignment a line
part_limits() {
    local left=$1 total=0 i s var
    for s in "${PART_S[@]}"; do total=$((total + s)); done
    for i in "${!PARTS[@]}"; do
        var="GPU_CHECK_LIMIT_S_${PARTS[$i]^^}"
        if [[ -n ${!var:-} ]]; then s=${!var}; elif ((left < total)); then s=$((PART_S[i] * left / total)); else s=${PART_S[$i]}; fi
        echo "$var=$((s < 10 ? 10 : s))"
    done
}

preflight() {  # what the image is expected to provide (device_needs.txt), and the headers the build needs
    nvidia-smi -L || true
    "$PY" - "$BUNDLE/device_needs.txt" <<'PY' || true
import importlib.metadata as m, sys, sysconfig, os
import torch
print(f"python {sys.version.split()[0]} ({sys.executable}), torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"GPU {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}, {os.cpu_count()} CPUs")
names = open(sys.argv[1]).read().split() if os.path.exists(sys.argv[1]) else []
missing = [n for n in names if not any(True for _ in m.distributions(name=n))]
print("missing on this machine (gpu_bundle.sh assumed them here):", ", ".join(missing) if missing else "none")
header = os.path.join(sysconfig.get_paths()["include"], "Python.h")
print("Python.h:", header if os.path.exists(header) else f"NOT FOUND at {header}: the fairseq build will fail")
PY
}

build_fairseq() {  # the sdist, with build_ext's parallel option set in its setup.cfg (every core)
    local src=$WORK/src/fairseq_fixed-$FAIRSEQ_VERSION cores
    cores=$(nproc 2>/dev/null || echo 4)
    step mkdir -p "$WORK/src"
    step tar -xzf "$SDIST" -C "$WORK/src"
    echo "+ printf '[build_ext]\nparallel = $cores\n' >>$src/setup.cfg" >&2
    ((DRY)) || printf '\n[build_ext]\nparallel = %s\n' "$cores" >>"$src/setup.cfg"
    step env -u CUDA_HOME MAX_JOBS="$cores" timeout "$BUILD_LIMIT" "$PY" -m pip install -q --no-index --no-deps \
        --no-build-isolation --no-cache-dir --upgrade --target "$SITE" "$src"
}

make_python() {  # sets GPU_PY: a python with fairseq's console scripts beside it
    local tool module wrap_dir
    GPU_PY=$VENV/bin/python wrap_dir=$VENV/bin
    if ! step "$PY" -m venv --without-pip "$VENV"; then
        log "WARNING: no venv; the tools go on PATH (tests that take them from beside python will fail)"
        GPU_PY=$(command -v "$PY") wrap_dir=$WORK/bin
        step mkdir -p "$wrap_dir"
        export PATH="$wrap_dir:$PATH"
    elif ((!DRY)); then
        # the venv sees the image's packages (torch, ...) through a .pth that runs site.addsitedir on them
        "$PY" -c 'import site; print("".join(f"import site; site.addsitedir({p!r})\n" for p in site.getsitepackages()))' \
            >"$("$GPU_PY" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/_device_image.pth"
    fi
    for tool in train preprocess generate interactive; do
        module=fairseq_cli.$tool
        echo "+ write $wrap_dir/fairseq-$tool (runs $module.cli_main with $GPU_PY)" >&2
        ((DRY)) && continue
        printf '#!/usr/bin/env bash\nexec %q -c %q "$@"\n' "$GPU_PY" \
            "import sys; from $module import cli_main; sys.argv[0] = 'fairseq-$tool'; sys.exit(cli_main())" >"$wrap_dir/fairseq-$tool"
        chmod +x "$wrap_dir/fairseq-$tool"
    done
}

summary() {  # the report's tables last: the reply shows the end of the output
    local md
    echo "== files in $OUT_DIR (the tool brings back at most 8):"
    ls -la "$OUT_DIR"
    (($(find "$OUT_DIR" -type f | wc -l) <= 8)) || log "WARNING: more than 8 files in $OUT_DIR: some will not come back"
    for md in "$OUT_DIR"/*.md; do [[ -f $md ]] && grep -E '^(#|\|)' "$md" | head -n 20; done
}

check_carried
START=$SECONDS
if ((DRY)); then
    log "dry run: the bundle is complete; the commands the device would run:"
else
    mkdir -p "$OUT_DIR"
    OUT_DIR=$(cd "$OUT_DIR" && pwd)
    exec > >(tee -a "$OUT_DIR/device-run.log") 2>&1
    TEE_PID=$!
    rm -rf "$WORK"
    mkdir -p "$WORK"
    preflight
fi
step "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$BUNDLE"/whl/*.whl ||
    log "WARNING: the wheels did not install (rc $?)"
build_rc=0
build_fairseq || build_rc=$?
((build_rc == 0)) || log "WARNING: the fairseq build failed (rc $build_rc; 124: over --build-limit-s $BUILD_LIMIT)"
export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
make_python
((DRY)) || "$GPU_PY" -c 'import torch, fairseq, fairseq_plugins, soft_beam; print("imports ok: fairseq", fairseq.__version__)' ||
    log "WARNING: the imports failed; gpu_check.sh will report the parts that need them as failed"
# the time left for gpu_check.sh; a dry run assumes the build takes its whole limit
used=$((DRY ? BUILD_LIMIT + INSTALL_S : SECONDS - START))
left=$((BUDGET - used - REPORT_S))
echo "+ part limits for $left s left of --budget-s $BUDGET ($used s used):" >&2
while read -r assignment; do
    echo "+ export $assignment" >&2
    export "${assignment?}"
done < <(part_limits "$left")
check_rc=0
step timeout $((left + REPORT_S)) env PYTHON="$GPU_PY" bash "$REPO/scripts/gpu_check.sh" --device cuda \
    --raw-dir "$BUNDLE/multi30k" --out "$OUT_DIR" || check_rc=$?
((DRY)) && exit 0
log "gpu_check.sh: rc $check_rc after $((SECONDS - START)) s in all (build rc $build_rc)"
summary
exec >&- 2>&-
wait "$TEE_PID" 2>/dev/null || true  # the log's last lines are in before the tool collects OUT
