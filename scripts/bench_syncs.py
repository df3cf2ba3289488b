#!/usr/bin/env python
"""Host-device synchronisations per decoding step of ``soft_beam.search.beam_search``.

    python scripts/bench_syncs.py [--device cpu|cuda] [--data DIR --checkpoint CKPT] [--json PATH]

A host read (``.item()``, ``int()``, ``bool()``, ``.tolist()``, ``nonzero``, boolean-mask indexing,
``unique``, a device-to-host copy ...) makes the host wait until the GPU has run everything queued
before it, so a search with several per step keeps a GPU idle between its small kernels. Two
counters, per decoding step, for the hard search (epsilon 0, fairseq's) and the soft one:

  host reads   a ``TorchDispatchMode`` that counts the aten ops that read device data on the host,
               attributed to the innermost frame of this repository (search.py, the solver's
               topk.py/ot.py, the model). It works on any device: on the CPU it counts the reads
               that would wait for a GPU, since every tensor there is host memory anyway.
  sync warns   CUDA only: ``torch.cuda.set_sync_debug_mode("warn")``, the warnings counted. This
               also sees blocking host-to-device copies, which the first counter does not.

Model: by default a small pure-torch recurrent decoder (random weights, hypotheses end at varied
steps); with --data and --checkpoint, a fairseq checkpoint decoding the first --sentences of the
test split through the plugin's ``FairseqStepModel``, as ``fairseq-generate`` would.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from soft_beam.search import SearchConfig, beam_search  # noqa: E402

# aten ops (overload packets) whose result the host must wait for: a value read back, or an output
# whose size depends on the data.
HOST_READ_OPS = {
    "_local_scalar_dense",  # .item(), int(), float(), bool(), `if tensor:`
    "is_nonzero",
    "nonzero",
    "nonzero_static",
    "masked_select",
    "_unique",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "unique_dim_consecutive",
    "equal",
    "repeat_interleave",  # without output_size the output's length is read back
}
# methods that read a tensor on the host without an aten op that a dispatch mode sees on the CPU
HOST_READ_METHODS = ("tolist", "numpy")
MODES = {"hard": 0.0, "soft": 0.01}


def _tensors(args, kwargs):
    for a in [*args, *kwargs.values()]:
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (t for t in a if isinstance(t, torch.Tensor))


def host_read_kind(func, args, kwargs, any_device: bool) -> str | None:
    """The kind of host read that aten op ``func`` on these arguments is, or None. With
    ``any_device`` False only reads of data on an accelerator count."""
    name = func.overloadpacket.__name__
    tensors = list(_tensors(args, kwargs))
    on_device = any_device or any(t.device.type != "cpu" for t in tensors)
    if name in HOST_READ_OPS:
        return name if on_device else None
    if name in ("index", "index_put", "index_put_"):  # x[mask]: the mask's nonzero() is inside the kernel
        masks = [t for t in _tensors(args[1:2], {}) if t.dtype == torch.bool]
        return f"{name} (bool mask)" if masks and on_device else None
    if name in ("_to_copy", "copy_") and tensors:
        src = tensors[1] if name == "copy_" else tensors[0]
        dst = kwargs.get("device") if name == "_to_copy" else tensors[0].device
        if src.device.type != "cpu" and dst is not None and torch.device(dst).type == "cpu":
            return "device-to-host copy"
    return None


class HostReadCounter(TorchDispatchMode):
    """Counts host reads, per decoding step (``mark_step``) and per place in this repository.

    Args:
        any_device: count reads of CPU tensors too (the default on the CPU, where every tensor is
            host memory); False counts only reads of accelerator data.

    ``events`` holds (step, kind, where); step -1 is before the first ``mark_step``. Reads inside
    ``torch.nn.functional.one_hot(x, num_classes)`` are not counted: only its CPU kernel makes them.
    """

    def __init__(self, any_device: bool = True):
        super().__init__()
        self.any_device = any_device
        self.step = -1
        self.events: list[tuple[int, str, str]] = []
        self._inside_method = False
        self._saved = {}

    def mark_step(self) -> None:
        self.step += 1

    def _record(self, kind: str) -> None:
        self.events.append((self.step, kind, _caller()))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self._inside_method:
            kind = host_read_kind(func, args, kwargs, self.any_device)
            if kind is not None:
                self._record(kind)
        return func(*args, **kwargs)

    def _wrap(self, name):
        original = self._saved[name]
        counter = self

        def method(tensor, *args, **kwargs):
            if counter._inside_method:
                return original(tensor, *args, **kwargs)
            if counter.any_device or tensor.device.type != "cpu":
                counter._record(name)
            counter._inside_method = True  # its own copy to the host is the same read
            try:
                return original(tensor, *args, **kwargs)
            finally:
                counter._inside_method = False

        return method

    def _one_hot(self):
        original = self._saved["one_hot"]
        counter = self

        def one_hot(tensor, num_classes=-1):
            # With num_classes, CUDA relies on device asserts; only the CPU reads min and max.
            if num_classes < 0 or counter._inside_method:
                return original(tensor, num_classes)
            counter._inside_method = True
            try:
                return original(tensor, num_classes)
            finally:
                counter._inside_method = False

        return one_hot

    def __enter__(self):
        for name in HOST_READ_METHODS:
            self._saved[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._wrap(name))
        self._saved["one_hot"] = torch.nn.functional.one_hot
        torch.nn.functional.one_hot = self._one_hot()
        return super().__enter__()

    def __exit__(self, *exc):
        torch.nn.functional.one_hot = self._saved.pop("one_hot")
        for name, method in self._saved.items():
            setattr(torch.Tensor, name, method)
        self._saved.clear()
        return super().__exit__(*exc)

    def per_step(self, where: str | None = None, steps: int | None = None) -> list[int]:
        """Reads in each step 0 .. steps-1 (default: up to the last marked), those whose place
        starts with ``where`` if given; reads after the last mark count in the last step."""
        steps = self.step + 1 if steps is None else steps
        counts = [0] * steps
        for step, _, place in self.events:
            if step >= 0 and (where is None or place.startswith(where)):
                counts[min(step, steps - 1)] += 1
        return counts


def _caller() -> str:
    """The innermost frame of this repository (outside this file) or of fairseq, as 'path:function';
    fairseq's as 'fairseq/...': its decoder's own reads are not the search's."""
    frame = sys._getframe(2)
    here = Path(__file__).resolve()
    while frame is not None:
        path = Path(frame.f_code.co_filename)
        if "site-packages" in path.parts:
            rel = path.parts[path.parts.index("site-packages") + 1 :]
            if rel and rel[0] == "fairseq":
                return f"{'/'.join(rel)}:{frame.f_code.co_name}"
        elif path.is_absolute() and ROOT in path.parents and path.resolve() != here:
            return f"{path.relative_to(ROOT)}:{frame.f_code.co_name}"
        frame = frame.f_back
    return "elsewhere"


class SyncWarnings:
    """CUDA only: counts ``torch.cuda.set_sync_debug_mode('warn')`` warnings per step."""

    def __init__(self):
        self.marks: list[int] = []
        self._caught = None
        self._context = None

    def mark_step(self) -> None:
        self.marks.append(len(self._caught))

    def __enter__(self):
        self._context = warnings.catch_warnings(record=True)
        self._caught = self._context.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode("default")
        self.total = sum("synchroniz" in str(w.message) for w in self._caught)
        self.per_step = [b - a for a, b in zip(self.marks, self.marks[1:] + [len(self._caught)])]
        self.places = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in self._caught if "synchroniz" in str(w.message))
        return self._context.__exit__(*exc)


class Marked:
    """A StepModel that tells the counters where each decoding step starts."""

    def __init__(self, model, counters):
        self.model, self.counters = model, counters

    def step(self, tokens, input_embedding):
        for c in self.counters:
            c.mark_step()
        return self.model.step(tokens, input_embedding)

    def embed(self, tokens):
        return self.model.embed(tokens)

    def reorder(self, order):
        self.model.reorder(order)

    def mix(self, weights):
        self.model.mix(weights)


# --------------------------------------------------------------------------- models


class TinyDecoder:
    """A small recurrent StepModel in pure torch: h_t = tanh(E[prev] + h W), log-probs from h O,
    plus ``eos_rate * t`` on EOS so that hypotheses end at varied steps. fairseq's specials."""

    BOS = EOS = 2
    PAD, UNK = 1, 3

    def __init__(self, sentences: int, beam: int, vocab: int = 200, dim: int = 32, device="cpu", eos_rate=0.4, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.embedding = torch.randn(vocab, dim, generator=g).to(device)  # (V, D)
        self.recurrence = (torch.randn(dim, dim, generator=g) * 1.5 * dim**-0.5).to(device)  # (D, D)
        self.output = (torch.randn(dim, vocab, generator=g) * 2).to(device)  # (D, V)
        h0 = (torch.randn(sentences, dim, generator=g) * 2).to(device)  # (S, D)
        self.h = h0.repeat_interleave(beam, 0)  # (S K, D)
        self.eos_rate, self.t = eos_rate, 0

    def step(self, tokens, input_embedding):
        x = self.embedding[tokens[:, -1]] if input_embedding is None else input_embedding  # (rows, D)
        self.h = torch.tanh(x + self.h @ self.recurrence)  # (rows, D)
        logits = self.h @ self.output  # (rows, V)
        logits[:, self.EOS] += self.eos_rate * self.t
        self.t += 1
        return torch.log_softmax(logits, -1)

    def embed(self, tokens):
        return self.embedding[tokens]  # (..., D)

    def reorder(self, order):
        self.h = self.h[order]  # (new_rows, D)

    def mix(self, weights):
        S, K, _ = weights.shape  # (sentences, new beams, old beams)
        self.h = torch.bmm(weights.to(self.h.dtype), self.h.view(S, K, -1)).reshape(S * K, -1)  # (rows, D)


def tiny_setup(sentences: int, beam: int, device: torch.device):
    """(make_model, batch, src_len, specials, label) for the pure-torch decoder."""
    specials = {"bos": TinyDecoder.BOS, "eos": TinyDecoder.EOS, "pad": TinyDecoder.PAD, "unk": TinyDecoder.UNK}
    return (lambda: TinyDecoder(sentences, beam, device=device)), sentences, 20, specials, "tiny recurrent decoder (pure torch)"


def fairseq_setup(data: Path, checkpoint: Path, sentences: int, beam: int, device: torch.device):
    """The same for a fairseq checkpoint on the first ``sentences`` of the test split."""
    from fairseq import checkpoint_utils, options, tasks, utils

    import fairseq_plugins  # noqa: F401  (registers the task)
    from fairseq_plugins.decoding import FairseqStepModel

    data_bin = data / "data-bin" if (data / "data-bin").is_dir() else data
    argv = [str(data_bin), "--user-dir", str(ROOT / "fairseq_plugins"), "--task", "translation_soft_beam", "--arch", "transformer"]
    cfg = options.parse_args_and_arch(options.get_training_parser(), argv + (["--cpu"] if device.type == "cpu" else []))
    task = tasks.setup_task(cfg)
    model = checkpoint_utils.load_model_ensemble([str(checkpoint)], task=task)[0][0].to(device).eval()
    task.load_dataset("test")
    itr = task.get_batch_iterator(task.dataset("test"), max_sentences=sentences, seed=1).next_epoch_itr(shuffle=False)
    sample = next(iter(itr))
    sample = utils.move_to_cuda(sample) if device.type == "cuda" else sample
    d = task.target_dictionary
    specials = {"bos": d.eos(), "eos": d.eos(), "pad": d.pad(), "unk": d.unk()}
    src = sample["net_input"]["src_tokens"]  # (B, src_len)
    label = f"fairseq checkpoint {checkpoint.name}, {src.shape[0]} test sentences"
    return (lambda: FairseqStepModel(model, sample["net_input"], beam)), src.shape[0], src.shape[1], specials, label, model


# --------------------------------------------------------------------------- measuring


def count_syncs(make_model, batch: int, src_len: int, cfg: SearchConfig, specials: dict, device: torch.device) -> dict:
    """One search under the counters (after one uncounted warm-up search). The hard search runs as
    generation (no autograd), the soft one as in training (autograd on, no backward)."""
    grad = cfg.epsilon > 0

    def search(model):
        with torch.set_grad_enabled(grad):
            return beam_search(model, batch, src_len, cfg, device=device, **specials)

    search(make_model())
    reads = HostReadCounter(any_device=device.type == "cpu")
    syncs = SyncWarnings() if device.type == "cuda" else None
    counters = [reads] + ([syncs] if syncs else [])
    if syncs:
        syncs.__enter__()
    try:
        with reads:
            hyps = search(Marked(make_model(), counters))
    finally:
        if syncs:
            syncs.__exit__(None, None, None)
    return summarise(reads, syncs, hyps)


def _stats(counts: list[int]) -> dict:
    return {"total": sum(counts), "mean": sum(counts) / max(len(counts), 1), "max": max(counts, default=0)}


def summarise(reads: HostReadCounter, syncs: SyncWarnings | None, hyps) -> dict:
    steps = reads.step + 1
    solver = [a + b for a, b in zip(reads.per_step("soft_beam/topk.py", steps), reads.per_step("soft_beam/ot.py", steps))]
    every = reads.per_step(None, steps)
    search = reads.per_step("soft_beam/search.py", steps)
    out = {
        "steps": steps,
        "hypotheses": sum(len(h) for h in hyps),
        "host_reads": _stats(every),
        "search_py": _stats(search),
        "solver": _stats(solver),
        "other": _stats([a - b - c for a, b, c in zip(every, search, solver)]),
        "before_first_step": sum(1 for step, _, _ in reads.events if step < 0),
        "places": dict(Counter(f"{where} [{kind}]" for _, kind, where in reads.events).most_common()),
        "sync_warnings": None,
    }
    if syncs is not None:
        out["sync_warnings"] = {**_stats(syncs.per_step), "places": dict(syncs.places.most_common())}
    return out


def markdown(results: dict) -> str:
    lines = [f"Model: {results['model']}; device {results['device']}; beam {results['beam']}.", ""]
    lines += ["| search | steps | host reads / step (mean, max) | in search.py | in the solver | elsewhere | CUDA sync warnings / step |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for mode, r in results["modes"].items():

        def cell(s):
            return f"{s['mean']:.2f}, {s['max']}"

        warn = "-" if r["sync_warnings"] is None else cell(r["sync_warnings"])
        lines.append(f"| {mode} (eps {results['epsilons'][mode]:g}) | {r['steps']} | {cell(r['host_reads'])} | {cell(r['search_py'])} "
                     f"| {cell(r['solver'])} | {cell(r['other'])} | {warn} |")  # fmt: skip
    lines += ["", "Where the host reads are (whole search, all steps):", "", "| search | place [kind] | reads |", "|---|---|---|"]
    for mode, r in results["modes"].items():
        lines += [f"| {mode} | `{place}` | {n} |" for place, n in r["places"].items()]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data", type=Path, help="a folder from data_prep/prepare-multi30k.sh (with --checkpoint)")
    p.add_argument("--checkpoint", type=Path, help="a fairseq checkpoint (with --data); default: the pure-torch decoder")
    p.add_argument("--sentences", type=int, default=32, help="sentences in the batch (default 32)")
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--epsilon", type=float, default=MODES["soft"], help="the soft search's epsilon (default 0.01)")
    p.add_argument("--json", type=Path, help="write the figures as JSON")
    p.add_argument("--markdown", type=Path, help="write the tables as markdown")
    args = p.parse_args(argv)
    if (args.data is None) != (args.checkpoint is None):
        p.error("--data and --checkpoint go together")
    if args.sentences < 1:
        p.error(f"--sentences must be >= 1, got {args.sentences}")
    if not (math.isfinite(args.epsilon) and args.epsilon > 0):
        p.error(f"--epsilon must be a finite number > 0, got {args.epsilon}")
    try:
        args.device = torch.device(args.device)
    except RuntimeError as e:
        p.error(f"--device: {e}")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA GPU; pass --device cpu")
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(0)
    if args.checkpoint:
        setup = fairseq_setup(args.data, args.checkpoint, args.sentences, args.beam, args.device)
    else:
        setup = (*tiny_setup(args.sentences, args.beam, args.device), None)
    make_model, batch, src_len, specials, label, model = setup
    epsilons = {"hard": 0.0, "soft": args.epsilon}
    results = {"model": label, "device": str(args.device), "beam": args.beam, "epsilons": epsilons, "modes": {}}
    for mode, eps in epsilons.items():
        cfg = SearchConfig(beam=args.beam, epsilon=eps, max_len_a=1.2, max_len_b=10)
        if model is not None:
            from fairseq_plugins.search_options import length_capped

            cfg = length_capped(cfg, model)
        results["modes"][mode] = count_syncs(make_model, batch, src_len, cfg, specials, args.device)
    text = markdown(results)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
