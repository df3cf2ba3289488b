#!/usr/bin/env bash
# Create or reuse the project's virtual environment in .venv (idempotent).
#
# Used by `make demo`, `make test` and CI. A second run on a ready environment
# only checks a stamp file and returns in a second or two.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SOFT_BEAM_VENV:-$ROOT/.venv}"
WHEELHOUSE="$ROOT/wheelhouse"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="2.13.0"
FAIRSEQ_VERSION="0.12.3.1"
STAMP="$VENV/.soft-beam-env"
# The stamp records what was installed; any change to these files re-runs the install.
WANT="torch=$TORCH_VERSION fairseq-fixed=$FAIRSEQ_VERSION setup.cfg=$(cksum <"$ROOT/setup.cfg" | cut -d' ' -f1)"

log() { echo "[setup_env] $*" >&2; }

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

# torch: on a machine without an NVIDIA GPU take the CPU build, never the CUDA one
# (the CUDA wheel drags in several GB of nvidia-* packages).
if ! "$PY" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  TORCH_ARGS=("torch==$TORCH_VERSION")
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    # Resolve without installing: which build would pip take?
    pick=$("$PY" -m pip install --dry-run --quiet --no-deps --report - "torch==$TORCH_VERSION" 2>/dev/null \
      | "$PY" -c 'import json,sys; r=json.load(sys.stdin)["install"]; print(r[0]["metadata"]["version"] if r else "")' || true)
    if [[ "$pick" != *+cpu ]]; then
      log "no GPU found: taking torch $TORCH_VERSION from the PyTorch CPU index"
      TORCH_ARGS+=(--index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple)
    fi
  fi
  log "installing torch $TORCH_VERSION"
  "${PIP[@]}" "${TORCH_ARGS[@]}"
fi

log "installing build dependencies of fairseq-fixed"
"${PIP[@]}" numpy cython setuptools wheel

# fairseq-fixed compiles C++/Cython extensions against the torch and numpy above, so it must
# be built without build isolation and without letting pip re-resolve (and replace) torch.
if ! "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('fairseq-fixed') != '$FAIRSEQ_VERSION')" 2>/dev/null; then
  mkdir -p "$WHEELHOUSE"
  if ! ls "$WHEELHOUSE"/fairseq_fixed-"$FAIRSEQ_VERSION"-*.whl >/dev/null 2>&1; then
    log "building the fairseq-fixed $FAIRSEQ_VERSION wheel once into wheelhouse/ (about 2 minutes)"
    "$PY" -m pip wheel --quiet --no-build-isolation --no-deps -w "$WHEELHOUSE" "fairseq-fixed==$FAIRSEQ_VERSION"
  fi
  log "installing fairseq-fixed from wheelhouse/"
  "${PIP[@]}" --no-deps "$WHEELHOUSE"/fairseq_fixed-"$FAIRSEQ_VERSION"-*.whl
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
