"""Fixes for fairseq-fixed 0.12.3.1 under current torch: the one place that patches fairseq.

Patches 1-3 repair faults under current torch. Patches 4-6 make a kill at any moment lose at most
the updates since the last completed checkpoint save, and name a checkpoint that does not load.
Patches 7-8 refuse, with an error naming the option, settings fairseq would fail on deep inside or
silently work around; the checks themselves are in ``checks``.

``apply()`` (called when the plugin is imported) installs each patch of ``PATCHES``. A patch is
written for the fairseq versions it names: on any other version it is not installed and a warning
names the version, because fairseq code it replaces or wraps may have changed. A patch installs
once per process and logs that at INFO (logger ``fairseq_plugins.compat``); a second ``apply()``
finds the marks it left on fairseq's objects and does nothing, even if the plugin was imported
again under another module name.

Each patch changes fairseq for every task in the process, not only ``translation_soft_beam``:
the code it fixes is called by fairseq's CLIs or trainer directly, with no task in between (each
patch's docstring says where). Apart from the fault it fixes, fairseq behaves as stock.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import pickle
import shutil
import types
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from . import checks

logger = logging.getLogger("fairseq_plugins.compat")

FAIRSEQ_0_12 = ("0.12.3.1",)  # fairseq-fixed 0.12.3.1: the version these patches were written and tested against
_MARK = "_soft_beam_patch"  # attribute on every installed replacement: the patch's name
_warned: set[tuple[str, str]] = set()


def fairseq_version() -> str:
    """What the imported fairseq reports (fairseq-fixed sets ``fairseq.__version__``)."""
    import fairseq

    version = getattr(fairseq, "__version__", None)
    if version:
        return str(version)
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    for dist in ("fairseq-fixed", "fairseq"):
        try:
            return dist_version(dist)
        except PackageNotFoundError:
            continue
    return "unknown"


@dataclass(frozen=True)
class Patch:
    """Replaces attributes of fairseq objects: ``replace(original)`` for each of ``targets()``."""

    name: str
    written_for: tuple[str, ...]
    targets: Callable[[], list[tuple[object, str]]]  # (owner, attribute name); imports lazily
    replace: Callable[[object], object]
    summary: str

    def installed(self) -> bool:
        return all(getattr(getattr(owner, attr), _MARK, None) == self.name for owner, attr in self.targets())

    def apply(self, version: str) -> bool:
        """Installs the patch unless installed already or ``version`` is not one it was written for."""
        if version not in self.written_for:
            if (self.name, version) not in _warned:
                _warned.add((self.name, version))
                logger.warning(
                    "not applying %s: written for fairseq %s, but fairseq %s is installed; without it: %s",
                    self.name, " / ".join(self.written_for), version, self.summary,
                )  # fmt: skip
            return False
        changed = False
        for owner, attr in self.targets():
            current = getattr(owner, attr)
            if getattr(current, _MARK, None) != self.name:
                replacement = self.replace(current)
                setattr(replacement, _MARK, self.name)
                setattr(owner, attr, replacement)
                changed = True
        if changed:
            logger.info("applied %s (fairseq %s): fixes %s", self.name, version, self.summary)
        return changed


PATCHES: list[Patch] = []  # in the order they are declared below


def patch(name: str, targets, summary: str, written_for: tuple[str, ...] = FAIRSEQ_0_12):
    """Declares the decorated ``replace(original)`` a patch of ``targets()`` (see ``Patch``)."""

    def declare(replace):
        PATCHES.append(Patch(name, written_for, targets, replace, summary))
        return replace

    return declare


def apply() -> list[str]:
    """Installs every patch that fits the installed fairseq; returns the names installed now."""
    version = fairseq_version()
    return [p.name for p in PATCHES if p.apply(version)]


# --------------------------------------------------------------------------- 1. checkpoints


class _TorchLoadingFullCheckpoints(types.ModuleType):
    """``torch``, except that ``load`` unpickles full objects unless told otherwise."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def load(f, *args, **kwargs):
        kwargs.setdefault("weights_only", False)
        return torch.load(f, *args, **kwargs)


def _checkpoint_modules():
    # checkpoint_utils loads checkpoints; distributed.utils unpickles the state it broadcasts
    # from rank 0 to the other ranks (resume and --finetune-from-model under DDP).
    from fairseq import checkpoint_utils
    from fairseq.distributed import utils as distributed_utils

    return [(checkpoint_utils, "torch"), (distributed_utils, "torch")]


@patch("allow_fairseq_checkpoints", _checkpoint_modules, "fairseq checkpoints failing to load under torch >= 2.6 (weights_only=True)")
def _torch_loading_full_checkpoints(original):
    """torch 2.6 made ``torch.load(weights_only=True)`` the default, and fairseq checkpoints pickle
    ``argparse.Namespace`` and omegaconf configs, so every ``fairseq-generate`` or resume fails.
    ``fairseq.checkpoint_utils`` and ``fairseq.distributed.utils`` (only they) get a view of torch
    whose ``load`` defaults to ``weights_only=False``, which is how fairseq loaded checkpoints
    before torch 2.6. As ever with pickled checkpoints, load only files you trust; ``torch.load``
    stays unchanged for everyone else.

    Process-wide because fairseq-generate, fairseq-train's resume and ``--finetune-from-model`` load
    checkpoints through ``checkpoint_utils`` before or outside any task, whatever ``--task`` is.
    """
    view = _TorchLoadingFullCheckpoints("torch")
    view.__wrapped__ = original  # what a test puts back to see the patch install
    return view


# --------------------------------------------------------------------------- 2. the last partial batch


def _batch_by_size_target():
    from fairseq.data import data_utils

    return [(data_utils, "batch_by_size")]


@patch("keep_last_partial_batch", _batch_by_size_target, "data_utils.batch_by_size dropping the sentences after the last full batch")
def _batch_by_size_keeping_the_tail(original):
    """fairseq 0.12's ``data_utils.batch_by_size`` drops the last batch when its size is not a multiple
    of ``--required-batch-size-multiple`` (default 8): 100 sentences in batches of at most 16 come
    back as 96, so fairseq-generate silently translates fewer sentences and BLEU is computed on a
    subset. The dropped tail comes back as a last batch; the other batches are fairseq's own.

    Process-wide because ``FairseqDataset.batch_by_size`` calls it for every task, and users decode
    stock ``--task translation`` checkpoints with ``--user-dir`` too (the CLI test counts all 45
    sentences); a task-only fix would leave that BLEU on a subset.
    """

    @functools.wraps(original)
    def batch_by_size(indices, num_tokens_fn, num_tokens_vec=None, max_tokens=None, max_sentences=None,
                      required_batch_size_multiple=1, fixed_shapes=None):  # fmt: skip
        indices = np.asarray(list(indices) if not isinstance(indices, np.ndarray) else indices, dtype=np.int64)
        batches = original(indices, num_tokens_fn, num_tokens_vec, max_tokens, max_sentences,
                           required_batch_size_multiple, fixed_shapes)  # fmt: skip
        kept = sum(len(b) for b in batches)
        if fixed_shapes is None and kept < len(indices):
            # Batches are consecutive slices of `indices`: the dropped tail is what follows them.
            batches = list(batches) + [indices[kept:]]
        return batches

    return batch_by_size


# --------------------------------------------------------------------------- 3. the NaN report


def _nan_detector_target():
    from fairseq import nan_detector

    return [(nan_detector.NanDetector, "__init__")]


@patch(
    "report_nans_without_backward_hooks", _nan_detector_target, "NanDetector's re-run dying with StopIteration instead of naming the NaN"
)
def _nan_detector_without_backward_hooks(original):
    """When gradients are NaN/inf, fairseq's trainer re-runs the step under its ``NanDetector`` to say
    where they came from, then raises ``FloatingPointError``. The detector's legacy module backward
    hooks make current torch look for a tensor at the top of each module's output; fairseq's
    encoders return a dict of lists, so the re-run died with a bare ``StopIteration`` that hid the
    real error. The detector keeps its forward hooks (they name the first module with a NaN/inf
    output) and loses its backward hooks.

    Process-wide because ``fairseq.trainer.Trainer`` builds the detector itself, for any task or
    criterion, with no hook for a plugin to pass options.
    """

    @functools.wraps(original)
    def __init__(self, model, forward=True, backward=True):
        original(self, model, forward=forward, backward=False)

    return __init__


# --------------------------------------------------------------------------- 4. atomic checkpoint copies


def _checkpoint_copy_target():
    from fairseq import checkpoint_utils

    return [(checkpoint_utils, "PathManager")]


@patch("atomic_checkpoint_copies", _checkpoint_copy_target, "a kill during save_checkpoint's copy leaving checkpoint_last.pt truncated")
def _path_manager_copying_atomically(original):
    """fairseq's ``save_checkpoint`` writes the first checkpoint name atomically (a ``.tmp`` file,
    then a rename), but then *copies* it to the others (``checkpoint_last.pt``, ``checkpoint_best.pt``)
    with a plain ``shutil.copyfile`` into the destination. A kill during that copy left a truncated
    ``checkpoint_last.pt``, and every later resume crashed on it. Here a local copy goes to
    ``<dst>.tmp`` in the same folder, then ``os.replace`` puts it in place: a kill leaves the
    previous destination whole. Remote (ioPath) paths keep fairseq's copy.

    ``checkpoint_utils`` (only it) gets a subclass of ``PathManager`` whose ``copy`` does this; every
    other user of ``PathManager`` is unchanged. Process-wide because ``fairseq_cli.train`` calls
    ``checkpoint_utils.save_checkpoint`` itself, for any task.
    """

    class PathManager(original):
        @staticmethod
        def copy(src_path: str, dst_path: str, overwrite: bool = False) -> bool:
            if original.path_requires_pathmanager(src_path) or original.path_requires_pathmanager(dst_path):
                return original.copy(src_path, dst_path, overwrite=overwrite)
            # The same name fairseq's own atomic save uses: a later copy overwrites what a kill left.
            tmp = f"{dst_path}.tmp"
            try:
                shutil.copyfile(src_path, tmp)
                os.replace(tmp, dst_path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.remove(tmp)
                raise
            return True

    PathManager.__wrapped__ = original
    return PathManager


# --------------------------------------------------------------------------- 5. unreadable checkpoints named


def _load_to_cpu_target():
    from fairseq import checkpoint_utils

    return [(checkpoint_utils, "load_checkpoint_to_cpu")]


def _raised_in_torch_load(exc: BaseException) -> bool:
    # The same types also come from fairseq's code around the load (e.g. a distributed barrier);
    # only torch's reader speaks about the file.
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith(os.path.join("torch", "serialization.py")):
            return True
        tb = tb.tb_next
    return False


@patch("name_unreadable_checkpoints", _load_to_cpu_target, "empty or truncated checkpoints failing without their path")
def _load_naming_the_checkpoint(original):
    """An empty checkpoint failed with ``EOFError: Ran out of input`` and a truncated one with
    ``PytorchStreamReader failed reading zip archive``; neither named the file. Before torch reads
    it, the file is checked (``checks.check_checkpoint_file``: empty, or a zip without its end
    record); a read error that ``torch.load`` raises after that (``EOFError``, ``UnpicklingError``,
    ``RuntimeError``: an old-format file cut short, a corrupt one) is re-raised as
    ``checks.CheckpointError`` (a ``RuntimeError``) naming the path, chained to torch's. Other
    errors (a pickled class that does not import, fairseq's upgrade of old states) pass unchanged.

    Process-wide because every route to a checkpoint goes through this function, outside any task:
    fairseq-generate's ``--path`` (``load_model_ensemble``), ``--finetune-from-model`` and resume
    (``Trainer.load_checkpoint``).
    """

    @functools.wraps(original)
    def load_checkpoint_to_cpu(path, arg_overrides=None, load_on_all_ranks=False):
        checks.check_checkpoint_file(path)
        try:
            return original(path, arg_overrides, load_on_all_ranks)
        except (EOFError, pickle.UnpicklingError, RuntimeError) as exc:
            if not _raised_in_torch_load(exc):
                raise
            raise checks.CheckpointError(path, f"does not load: {type(exc).__name__}: {exc}") from exc

    return load_checkpoint_to_cpu


# --------------------------------------------------------------------------- 6. resume falls back


def _trainer_load_target():
    from fairseq.trainer import Trainer

    return [(Trainer, "load_checkpoint")]


def _is_resume_target(trainer, filename) -> bool:
    """Whether ``filename`` is the default resume point, ``<save_dir>/checkpoint_last<suffix>.pt``."""
    ckpt = trainer.cfg.checkpoint
    default = os.path.join(ckpt.save_dir, f"checkpoint_last{trainer.checkpoint_suffix}.pt")
    return ckpt.restore_file == "checkpoint_last.pt" and os.path.abspath(filename) == os.path.abspath(default)


@patch("resume_from_a_loadable_checkpoint", _trainer_load_target, "a truncated checkpoint_last.pt ending resumption for good")
def _load_falling_back(original):
    """A ``checkpoint_last.pt`` that does not load (empty or truncated, e.g. written by a fairseq
    without patch 4 and killed) ended every resume with an error, although the numbered checkpoint
    it was copied from lay beside it. When the default resume point does not load, the newest
    (by mtime) ``checkpoint*.pt`` in the save dir that loads is resumed from instead, with a warning
    naming both files; when none loads, the error names them. An explicit ``--restore-file`` gets no
    fallback: the user chose that file.

    Process-wide because ``checkpoint_utils.load_checkpoint`` calls the trainer for any task.
    Only rank 0 reads the file (unless fairseq loads on all ranks); the others take what it broadcasts.
    """

    @functools.wraps(original)
    def load_checkpoint(self, filename, *args, **kwargs):
        try:
            return original(self, filename, *args, **kwargs)
        except checks.CheckpointError as exc:
            if exc.path != str(filename) or not _is_resume_target(self, filename):
                raise
            failure = exc
        skipped = []
        for candidate in checks.resume_candidates(self.cfg.checkpoint.save_dir, self.checkpoint_suffix):
            try:
                state = original(self, candidate, *args, **kwargs)
            except checks.CheckpointError as exc:
                skipped.append(str(exc))
                continue
            logger.warning("%s; resumed from %s instead, the newest checkpoint beside it that loads", failure, candidate)
            return state
        tried = "; ".join(skipped) if skipped else "there is no other checkpoint*.pt there"
        raise checks.CheckpointError(filename, f"does not load ({failure}), and nothing to resume from beside it: {tried}") from failure

    return load_checkpoint


# --------------------------------------------------------------------------- 7. half precision without a device


def _trainer_init_target():
    from fairseq.trainer import Trainer

    return [(Trainer, "__init__")]


@patch("refuse_half_precision_without_device", _trainer_init_target, "--fp16 / --bf16 without their device failing 13 frames deep")
def _trainer_checking_half_precision(original):
    """``--fp16`` without CUDA failed in fairseq's FP16Optimizer with ``AssertionError: Torch not
    compiled with CUDA enabled``, 13 frames deep; ``--bf16`` (which implies ``--tpu`` in fairseq
    0.12) without torch_xla with ``AttributeError: 'NoneType' object has no attribute 'xla_device'``.
    The trainer now refuses them first, with a ``ValueError`` naming the option
    (``checks.check_half_precision``). ``--memory-efficient-fp16`` alone, which runs on a CPU, stays.

    Process-wide because ``fairseq_cli.train`` builds the ``Trainer`` itself, for any task, and the
    trainer is the first place that sees the whole config and the device together.
    """

    @functools.wraps(original)
    def __init__(self, cfg, *args, **kwargs):
        common = getattr(cfg, "common", cfg)  # a FairseqConfig, or the deprecated flat Namespace
        cuda = torch.cuda.is_available() and not getattr(common, "cpu", False) and not getattr(common, "tpu", False)
        checks.check_half_precision(common, cuda=cuda, xla=importlib.util.find_spec("torch_xla") is not None)
        original(self, cfg, *args, **kwargs)

    return __init__


# --------------------------------------------------------------------------- 8. --nbest above --beam


def _build_generator_target():
    from fairseq.tasks import FairseqTask

    return [(FairseqTask, "build_generator")]


@patch("refuse_nbest_above_beam", _build_generator_target, "--nbest above --beam silently printing only --beam hypotheses")
def _build_generator_checking_nbest(original):
    """fairseq's beam search keeps ``--beam`` finished hypotheses per sentence, and fairseq-generate
    prints the first ``--nbest`` of them: with ``--nbest`` above ``--beam`` it printed fewer than asked,
    without a word. The stock generator refuses that now (``checks.check_nbest_within_beam``).

    Process-wide because fairseq-generate and fairseq-interactive call the task's
    ``build_generator``, and users decode stock ``--task translation`` checkpoints with
    ``--user-dir`` too; ``FairseqTask.build_generator`` serves every task that does not override it.
    """

    @functools.wraps(original)
    def build_generator(self, models, args, *rest, **kwargs):
        checks.check_nbest_within_beam(args)
        return original(self, models, args, *rest, **kwargs)

    return build_generator
