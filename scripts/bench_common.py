"""Shared by the scripts/bench_*.py benchmarks: the machine they ran on, the model flags, and the
memory and timing helpers.

torch is imported where it is used: ``bench_bleu.py`` must stay small while it runs its training
processes, whose peak RSS Linux counts from its own (see ``bench_bleu.run_logged``).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

# ---------------------------------------------------------------- the machine


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _ram_gib() -> float | None:
    try:
        mem_kb = int(next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal")).split()[1])
    except (OSError, StopIteration, ValueError):
        return None
    return round(mem_kb / 2**20, 1)


def _fairseq_distribution() -> str | None:
    # the installed distribution, not `import fairseq`: importing it reconfigures logging
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("fairseq-fixed", "fairseq"):
        try:
            return f"{dist} {version(dist)}"
        except PackageNotFoundError:
            continue
    return None


def machine_info(device: str = "cpu") -> dict:
    """The machine as a dict (for JSON): platform, python, cpu, cpu_count, gpu (the device's name when
    ``device`` is a CUDA device, else None), ram_gib, torch, torch_threads, fairseq; a fact that cannot be
    read is left out."""
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "gpu": None,
    }
    ram = _ram_gib()
    if ram is not None:
        info["ram_gib"] = ram
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.device(device).type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    except Exception:  # noqa: BLE001 - informational only
        pass
    fairseq = _fairseq_distribution()
    if fairseq:
        info["fairseq"] = fairseq
    return info


def machine_description(device: str = "cpu") -> str:
    """The machine in one line, for a benchmark's header: the facts of ``machine_info``."""
    m = machine_info(device)
    parts = [
        f"CPU: {m['cpu']}, {m['cpu_count']} logical cores (torch threads {m.get('torch_threads', '?')})",
        f"torch {m.get('torch', '?')}, python {m['python']}",
        f"device: {device}",
    ]
    if m["gpu"]:
        parts.append(f"GPU: {m['gpu']}")
    return "; ".join(parts)


# ---------------------------------------------------------------- the model flags

# The small transformer of scripts/train_mle.sh (its DEFAULT_ARCH in train_common.sh, repeated here so that
# results can show it) and a tiny one for smoke tests (seconds per update on a CPU, meaningless BLEU).
ARCHS = {
    "small": {"layers": 3, "embed_dim": 256, "ffn_dim": 512, "heads": 4, "dropout": 0.3},
    "tiny": {"layers": 1, "embed_dim": 32, "ffn_dim": 64, "heads": 2, "dropout": 0.1},
}


def model_args(size: str = "small", dropout: float | None = None) -> list[str]:
    """fairseq-train's model flags for ``size`` (a key of ARCHS), as an argument list."""
    if size not in ARCHS:
        raise ValueError(f"unknown model size {size!r}; one of {', '.join(ARCHS)}")
    a = ARCHS[size]
    flags = ["--arch", "transformer", "--share-all-embeddings"]
    for name, key in (("layers", "layers"), ("embed-dim", "embed_dim"), ("ffn-embed-dim", "ffn_dim"), ("attention-heads", "heads")):
        flags += [f"--encoder-{name}", str(a[key]), f"--decoder-{name}", str(a[key])]
    return [*flags, "--dropout", f"{a['dropout'] if dropout is None else dropout:g}"]


def model_flags(size: str = "small", dropout: float | None = None) -> str:
    """The same flags as one string (the ARCH_ARGS of scripts/train_mle.sh and finetune_soft_beam.sh)."""
    return " ".join(model_args(size, dropout))


# ---------------------------------------------------------------- timing and memory


def sync(device) -> None:
    """Waits for the device's queued work, so that a timer around it measures the work (CUDA runs
    asynchronously); nothing to wait for on a CPU."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SavedBytes:
    """Counts the bytes of the distinct storages autograd saves for backward while active (a weight
    saved at every decoding step counts once); ``add`` counts a tensor saved otherwise, such as an
    output kept by the caller."""

    def __init__(self):
        self.storages: dict[int, int] = {}

    def add(self, t) -> None:
        if t is not None:
            storage = t.untyped_storage()
            self.storages[storage.data_ptr()] = storage.nbytes()

    def _pack(self, t):
        self.add(t)
        return t

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())

    @property
    def mb(self) -> float:
        return self.bytes / 2**20

    def __enter__(self):
        import torch

        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
