#!/usr/bin/env bash
# Create or reuse the project's virtual environment in .venv (idempotent).
#
# Used by `make demo`, `make test` and CI. A second run on a ready environment
# only checks a stamp file and returns in a second or two.
#
# torch: where `nvidia-smi -L` lists a GPU, PyPI's torch (the CUDA build: torch 2.13.0 is built for
# CUDA 13.0, which needs an NVIDIA driver >= 580); elsewhere the CPU build. Env: PYTHON (the base
# interpreter, default python3), SOFT_BEAM_VENV (default .venv), TORCH_INDEX_URL (take torch from this
# index instead, PyPI as the extra index: e.g. another CUDA build's PyTorch index for an older driver).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SOFT_BEAM_VENV:-$ROOT/.venv}"
WHEELHOUSE="$ROOT/wheelhouse"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="2.13.0"
FAIRSEQ_VERSION="0.12.3.1"
STAMP="$VENV/.soft-beam-env"

log() { echo "[setup_env] $*" >&2; }

# A GPU is a device that nvidia-smi lists, not the tool alone (a driver can be installed without one).
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then BUILD=cuda; else BUILD=cpu; fi
# The stamp records what was installed; any change to these files, or a GPU appearing, re-runs the install
# (a CPU environment's stamp reads as it did before the build was recorded).
WANT="torch=$TORCH_VERSION$([[ $BUILD == cuda ]] && echo " build=cuda") fairseq-fixed=$FAIRSEQ_VERSION setup.cfg=$(cksum <"$ROOT/setup.cfg" | cut -d' ' -f1)"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" && -x "$VENV/bin/python" ]]; then
  exit 0
fi

"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
  || { log "Python >= 3.11 is required; '$PYTHON' is $("$PYTHON" --version 2>&1)"; exit 1; }

if [[ ! -x "$VENV/bin/python" ]]; then
  log "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" --upgrade "pip>=23"

# Which torch build would pip take? (resolved, not installed)
torch_pick() {
    "$PY" -m pip install --dry-run --quiet --no-deps --ignore-installed --report - "torch==$TORCH_VERSION" 2>/dev/null \
        | "$PY" -c 'import json,sys; r=json.load(sys.stdin)["install"]; print(r[0]["metadata"]["version"] if r else "")' || true
}

# torch: on a machine without an NVIDIA GPU take the CPU build, never the CUDA one (the CUDA wheel drags
# in several GB of nvidia-* packages); with a GPU never the CPU one. "torch==2.13.0" also matches
# 2.13.0+cpu, which a pip configuration's find-links or index can serve and pip then prefers.
want_torch="import torch, sys; v = torch.__version__; sys.exit(v.split('+')[0] != '$TORCH_VERSION' or (v.endswith('+cpu') and '$BUILD' == 'cuda'))"
if ! "$PY" -c "$want_torch" 2>/dev/null; then
  TORCH_ARGS=("torch==$TORCH_VERSION")
  TORCH_ENV=()
  if [[ -n ${TORCH_INDEX_URL:-} ]]; then
    TORCH_ARGS+=(--index-url "$TORCH_INDEX_URL" --extra-index-url https://pypi.org/simple)
  elif [[ $BUILD == cpu && "$(torch_pick)" != *+cpu ]]; then
    log "no GPU found: taking torch $TORCH_VERSION from the PyTorch CPU index"
    TORCH_ARGS+=(--index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple)
  elif [[ $BUILD == cuda && "$(torch_pick)" == *+cpu ]]; then
    log "a GPU is there, but pip's configuration offers the CPU build of torch: resolving torch without it (PyPI)"
    TORCH_ENV=(env -u PIP_FIND_LINKS -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null)
  fi
  log "installing torch $TORCH_VERSION ($BUILD build)"
  "${TORCH_ENV[@]}" "${PIP[@]}" "${TORCH_ARGS[@]}"
fi
if [[ $BUILD == cuda ]]; then
  "$PY" - <<'PYCUDA' || true
import torch
if not torch.cuda.is_available():
    print(f"[setup_env] WARNING: nvidia-smi lists a GPU, but torch {torch.__version__} (CUDA {torch.version.cuda}) cannot use it: "
          "is the driver older than its CUDA needs? Set TORCH_INDEX_URL to the PyTorch index of an older CUDA build.")
PYCUDA
fi

log "installing build dependencies of fairseq-fixed"
"${PIP[@]}" numpy cython setuptools wheel

# fairseq-fixed compiles C++/Cython extensions against the torch and numpy above, so it must
# be built without build isolation and without letting pip re-resolve (and replace) torch.
if ! "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('fairseq-fixed') != '$FAIRSEQ_VERSION')" 2>/dev/null; then
  mkdir -p "$WHEELHOUSE"
  # the wheel of this interpreter (cp311, cp312, ...): the folder may hold another Python's
  CP=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
  if ! ls "$WHEELHOUSE"/fairseq_fixed-"$FAIRSEQ_VERSION"-"$CP"-*.whl >/dev/null 2>&1; then
    log "building the fairseq-fixed $FAIRSEQ_VERSION wheel once into wheelhouse/ (about 2 minutes)"
    "$PY" -m pip wheel --quiet --no-build-isolation --no-deps -w "$WHEELHOUSE" "fairseq-fixed==$FAIRSEQ_VERSION"
  fi
  log "installing fairseq-fixed from wheelhouse/"
  "${PIP[@]}" --no-deps "$WHEELHOUSE"/fairseq_fixed-"$FAIRSEQ_VERSION"-"$CP"-*.whl
fi

log "installing soft-beam (editable) with its runtime and test dependencies"
"${PIP[@]}" -e "$ROOT[test,dev]"

"$PY" - <<'PYCHECK'
import importlib.metadata as m
bad = [name for name in ("torchaudio",) if any(d.metadata["Name"] == name for d in m.distributions())]
if bad:
    raise SystemExit(f"[setup_env] {bad} must not be installed: fairseq would import it and fail")
import torch, fairseq, soft_beam, fairseq_plugins  # noqa: F401
print(f"[setup_env] ready: torch {torch.__version__}, fairseq {fairseq.__version__}")
PYCHECK
echo "$WANT" >"$STAMP"
