#!/usr/bin/env bash
# Fills .gpu_bundle/ (git-ignored) with everything the workplace's GPU machine lacks, so that
# scripts/gpu_device_run.sh can run scripts/gpu_check.sh there in one call, with no network (issue 16).
#
#   scripts/gpu_bundle.sh [--dest DIR] [--raw-dir DIR] [--check-only]
#
# The GPU machine (kind nvidia-h200: Python 3.12, torch 2.11+cu130, x86-64) has the packages listed in
# DEVICE_HAS below (read from the device tool's KINDS.md, 2026-11-17) and no fairseq. This script, run on a
# machine with network access to PyPI, puts into DEST:
#   whl/        cp312 manylinux (or pure-Python) wheels of every runtime dependency of fairseq-fixed and of
#               soft-beam that the device lacks (WHEELS; antlr4-python3-runtime has no wheel on PyPI: its
#               sdist is built into one here, it is pure Python)
#   sdist/      the fairseq-fixed sdist, compiled on the device against its torch (its C++/Cython extensions
#               link against torch's C++ library, so no wheel built here would load there)
#   multi30k/   a copy of the Multi30k .gz files (--raw-dir): ../shared beside the checkout does not travel
#   MANIFEST    what is in it; device_needs.txt: the packages the bundle expects the device to provide
# It then checks the bundle (also alone, with --check-only, no network): every Requires-Dist of the wheels,
# of fairseq-fixed and of soft-beam (setup.cfg) is in the bundle or on the device, each bundled version meets
# its requirers' specifiers, one version per package, and the working tree plus the bundle fit the 64 MiB
# that travel. It fails naming what is missing. Last it prints the `run` call's carry list.
#
# Options:
#   --dest DIR      default <repo>/.gpu_bundle (must be git-ignored to be carried; .gitignore lists it)
#   --raw-dir DIR   the Multi30k .gz files (default ../shared/data/multi30k beside the checkout)
#   --check-only    check an existing DEST, download nothing
# Env: PYTHON (a python with pip >= 22 and packaging; default .venv/bin/python, else python3).
# Takes about a minute (12 MB from PyPI, the antlr4 wheel built in an isolated build environment).
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; }
die() { echo "gpu_bundle.sh: error: $*" >&2; exit 2; }
log() { echo "gpu_bundle.sh: $*" >&2; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEST="$REPO/.gpu_bundle" RAW_DIR="$REPO/../shared/data/multi30k" CHECK_ONLY=0
while (($#)); do
    case $1 in
    -h | --help) usage; exit 0 ;;
    --dest) DEST=${2:?--dest needs a value}; shift 2 ;;
    --raw-dir) RAW_DIR=${2:?--raw-dir needs a value}; shift 2 ;;
    --check-only) CHECK_ONLY=1; shift ;;
    *) usage >&2; die "unknown option: $1" ;;
    esac
done
PY=${PYTHON:-$REPO/.venv/bin/python}
[[ -x $PY ]] || PY=$(command -v "${PYTHON:-python3}") || die "no python: set PYTHON"

FAIRSEQ_VERSION=0.12.3.1
# The device's runtime gaps, pinned to the versions this project's .venv tests with. Derived by comparing
# fairseq-fixed's and setup.cfg's Requires-Dist (and theirs) with DEVICE_HAS; check_bundle below re-derives
# the closure and fails if this list falls short.
WHEELS=(hydra-core==1.3.2 omegaconf==2.3.0 bitarray==3.12.3 cffi==2.1.1 pycparser==3.12)
SDIST_ONLY=(antlr4-python3-runtime==4.9.3)  # no wheel on PyPI; pure Python, so the wheel built here runs there
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# KINDS.md, "Python packages already there", nvidia-h200, as read on 2026-11-17 (torch there is 2.11.0+cu130).
DEVICE_HAS="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit
cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist
fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta
jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas
nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand
nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13
nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil
pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham
simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl
tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm
transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt
xarray xxhash yarl zipp"
RAW_FILES=(train.en.gz train.de.gz val.en.gz val.de.gz test_2016_flickr.en.gz test_2016_flickr.de.gz)
LIMIT_BYTES=$((64 * 1024 * 1024))

pip_() { "$PY" -m pip --disable-pip-version-check "$@"; }

fetch() {  # downloads every piece into a fresh DEST (stale versions would break the device's install)
    [[ -d $RAW_DIR ]] || die "--raw-dir $RAW_DIR does not exist (the Multi30k .gz files)"
    rm -rf "$DEST/whl" "$DEST/sdist" "$DEST/multi30k"
    mkdir -p "$DEST/whl" "$DEST/sdist" "$DEST/multi30k"
    log "cp312 wheels: ${WHEELS[*]}"
    pip_ download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
        -d "$DEST/whl" "${WHEELS[@]}"
    log "pure-Python wheels built from sdists: ${SDIST_ONLY[*]}"
    pip_ wheel -q --no-deps --no-binary=:all: -w "$DEST/whl" "${SDIST_ONLY[@]}"
    log "fairseq-fixed $FAIRSEQ_VERSION sdist"
    # --no-build-isolation: pip reads the sdist's metadata with this python's setuptools/torch instead of
    # downloading torch into a build environment (minutes)
    pip_ download -q --no-deps --no-binary=:all: --no-build-isolation -d "$DEST/sdist" "fairseq-fixed==$FAIRSEQ_VERSION"
    for f in "${RAW_FILES[@]}"; do
        [[ -f $RAW_DIR/$f ]] || die "--raw-dir $RAW_DIR has no $f"
    done
    cp "$RAW_DIR"/*.gz "$DEST/multi30k/"
    chmod -R u+w "$DEST/multi30k"  # the shared copy is read-only; a later run must be able to replace it
    git -C "$REPO" rev-parse HEAD >"$DEST/MANIFEST" 2>/dev/null || echo unknown >"$DEST/MANIFEST"
    (cd "$DEST" && find whl sdist multi30k -type f | sort) >>"$DEST/MANIFEST"
}

# The closure check (check_bundle): argv DEST SDIST SETUP_CFG, env DEVICE_HAS. Markers are evaluated for the
# device (CPython 3.12, Linux x86-64) without extras.
CLOSURE_PY=$(
    cat <<'PY'
import configparser, os, re, sys, tarfile, zipfile
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "platform_system": "Linux",
       "platform_machine": "x86_64", "implementation_name": "cpython", "platform_python_implementation": "CPython",
       "os_name": "posix", "extra": ""}


def fail(message):
    sys.exit(f"gpu_bundle.sh: error: {message}")


def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def needs(lines):  # the requirements that apply on the device (no extras)
    reqs = [Requirement(line) for line in lines]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(ENV)]


def read_wheels(folder, requirers):
    """{name: version} of the wheels in folder; their requirements added to requirers."""
    bundled = {}
    for whl in sorted(folder.glob("*.whl")):
        with zipfile.ZipFile(whl) as z:
            meta_name = next((n for n in z.namelist() if n.endswith(".dist-info/METADATA")), None)
            if meta_name is None:
                fail(f"{whl.name} has no .dist-info/METADATA")
            meta = Parser().parsestr(z.read(meta_name).decode())
        name = norm(meta["Name"])
        if name in bundled:
            fail(f"two versions of {name} in {folder}: keep one (two stop the install)")
        bundled[name] = Version(meta["Version"])
        tags = whl.name[:-4].split("-")[-3:]
        if not (tags[0] in ("py3", "cp312", "py2.py3") and (tags[2] == "any" or "x86_64" in tags[2])):
            fail(f"{whl.name} is not a Python 3.12 x86-64 wheel")
        for r in needs(meta.get_all("Requires-Dist") or []):
            requirers.setdefault(r, []).append(name)
    return bundled


def read_roots(sdist, setup_cfg, requirers):
    """fairseq-fixed's requirements (its sdist's PKG-INFO) and soft-beam's (setup.cfg) added to requirers."""
    with tarfile.open(sdist) as t:
        info = t.extractfile(next(m for m in t.getmembers() if m.name.count("/") == 1 and m.name.endswith("/PKG-INFO")))
        for r in needs(Parser().parsestr(info.read().decode()).get_all("Requires-Dist") or []):
            requirers.setdefault(r, []).append("fairseq-fixed")
    cfg = configparser.ConfigParser()
    cfg.read(setup_cfg)
    for r in needs([line for line in cfg["options"]["install_requires"].splitlines() if line.strip()]):
        requirers.setdefault(r, []).append("soft-beam (setup.cfg)")


def main(dest, sdist, setup_cfg):
    requirers = {}  # requirement -> who asked
    bundled = read_wheels(dest / "whl", requirers)
    read_roots(sdist, setup_cfg, requirers)
    device_has = set(os.environ["DEVICE_HAS"].split())
    errors, on_device = [], set()
    for r, who in requirers.items():
        name = norm(r.name)
        if name == "fairseq-fixed":
            continue
        if name in bundled:
            if bundled[name] not in r.specifier:
                errors.append(f"{name} {bundled[name]} (bundled) does not meet {r} (required by {', '.join(who)})")
        elif name in device_has:
            on_device.add(name)
        else:
            errors.append(f"missing on the device and not in the bundle: {name} (required by {', '.join(who)} as {r})")
    for line in errors:
        print(f"gpu_bundle.sh: error: {line}", file=sys.stderr)
    if errors:
        sys.exit(1)
    (dest / "device_needs.txt").write_text("\n".join(sorted(on_device)) + "\n")
    print(f"gpu_bundle.sh: closure ok: bundled {', '.join(f'{n} {v}' for n, v in sorted(bundled.items()))}; "
          f"from the device: {', '.join(sorted(on_device))}", file=sys.stderr)


main(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
PY
)

check_bundle() {  # the closure of Requires-Dist, the specifiers, one version each; writes device_needs.txt
    local sdist=$DEST/sdist/fairseq_fixed-$FAIRSEQ_VERSION.tar.gz f
    [[ -f $sdist ]] || die "$DEST/sdist has no fairseq_fixed-$FAIRSEQ_VERSION.tar.gz"
    for f in "${RAW_FILES[@]}"; do [[ -f $DEST/multi30k/$f ]] || die "$DEST/multi30k has no $f"; done
    DEVICE_HAS="$DEVICE_HAS" "$PY" -c "$CLOSURE_PY" "$DEST" "$sdist" "$REPO/setup.cfg"
}

check_size() {  # what travels: tracked and untracked-not-ignored files, plus the carried bundle
    local tree bundle
    tree=$(cd "$REPO" && git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s -- 2>/dev/null |
        awk '{s += $1} END {print s + 0}')
    bundle=$(find "$DEST" -type f -printf '%s\n' | awk '{s += $1} END {print s + 0}')
    log "sizes: working tree $((tree / 1024)) KiB, bundle $((bundle / 1024)) KiB (limit $((LIMIT_BYTES / 1024)) KiB together)"
    ((tree + bundle <= LIMIT_BYTES)) || die "working tree + bundle = $(((tree + bundle) / 1048576)) MiB: over the 64 MiB that travel"
}

ensure_ignored() {  # carry takes ignored paths; an unignored bundle would also risk a 12 MB commit
    local rel=${DEST#"$REPO"/}
    [[ $rel != "$DEST" ]] || { log "$DEST is outside the repository: copy it in before the run call"; return; }
    if ! git -C "$REPO" check-ignore -q "$rel/MANIFEST" 2>/dev/null; then
        echo "/$rel/" >>"$(git -C "$REPO" rev-parse --git-path info/exclude)"
        log "added /$rel/ to .git/info/exclude"
    fi
}

if ((!CHECK_ONLY)); then fetch; fi
check_bundle
check_size
ensure_ignored
REL=${DEST#"$REPO"/}
log "ready. The run call (docs/gpu/README.md):"
echo "  command:   bash scripts/gpu_device_run.sh --bundle $REL"
echo "  carry:     [\"$REL\"]"
echo "  timeout_s: 600"
