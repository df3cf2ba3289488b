"""Never silently wrong, and a kill at any moment loses at most the work since the last checkpoint.

The fairseq runs here are forked from the test process, which has fairseq imported already: a run
costs its few updates (about a second), not the three seconds of a fresh interpreter's imports. A
test-only hook installed in the child (never in the product code) SIGKILLs it at a chosen point:
after some bytes of a checkpoint copy or write, or at the start of an update.

A killed run resumes from ``checkpoint_last.pt``, which is the last *completed* save: it loses the
updates since that save (at most --save-interval-updates of them, plus the save the kill cut
short). fairseq's updates are deterministic, so the resumed run ends with the uninterrupted run's
weights, bit for bit.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import re
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
from helpers import PLUGIN_DIR, TINY_ARCH

import fairseq_plugins  # noqa: F401  (applies the fixes)
from fairseq_plugins import checks

UPDATES, EVERY = 6, 2  # checkpoints at updates 2, 4 and 6


def _train_args(data_bin, save_dir, *extra):
    return [
        data_bin, "--user-dir", PLUGIN_DIR, "--task", "translation", *TINY_ARCH,
        "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
        "--optimizer", "adam", "--lr", "0.005", "--max-tokens", "400", "--seed", "1", "--cpu",
        "--max-update", UPDATES, "--save-interval-updates", EVERY, "--disable-validation",
        "--num-workers", "0", "--save-dir", save_dir, "--no-progress-bar", "--log-format", "simple", *extra,
    ]  # fmt: skip


def _child(cli: str, argv, log: Path, hook) -> None:
    out = open(log, "a", buffering=1)  # line-buffered: a SIGKILL loses no finished line
    os.dup2(out.fileno(), 1)
    os.dup2(out.fileno(), 2)
    sys.stdout = sys.stderr = out
    root = logging.getLogger()
    root.handlers = [logging.StreamHandler(out)]
    root.setLevel(logging.INFO)
    torch.set_num_threads(1)  # the parent's OpenMP pool does not survive fork; one thread never uses it
    # A CUDA context does not survive fork either, and fairseq asks for CUDA's RNG state whenever
    # torch sees a GPU: the child is a CPU-only machine, on every host.
    torch.cuda.is_available = lambda: False
    from fairseq import checkpoint_utils

    if hasattr(checkpoint_utils.save_checkpoint, "best"):
        del checkpoint_utils.save_checkpoint.best  # fairseq's process-global; a fresh process has none
    if hook is not None:
        hook()
    module = __import__(f"fairseq_cli.{cli}", fromlist=["cli_main"])
    sys.argv = [cli, *map(str, argv)]
    module.cli_main()


def run_forked(cli: str, argv, log: Path, hook=None, timeout=120) -> tuple[int, str]:
    """Runs ``fairseq_cli.<cli>`` in a forked child; returns (its wait status, its log)."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            _child(cli, argv, log, hook)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"fairseq-{cli} ran past {timeout} s\n{log.read_text()}")
        time.sleep(0.02)
    return done[1], log.read_text()


def killed(status: int) -> bool:
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


# --------------------------------------------------------------------------- kill hooks (run in the child)


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_in_copy(prefix: str, nth: int, nbytes: int):
    """SIGKILL after ``nbytes`` of the ``nth`` file copy into a file named ``prefix*``. On Linux
    shutil.copyfile (fairseq's copy, and the patched one) copies by os.sendfile, from offset 0."""

    def install():
        real, seen = os.sendfile, []

        def sendfile(out_fd, in_fd, offset, count):
            if offset == 0 and os.path.basename(os.readlink(f"/proc/self/fd/{out_fd}")).startswith(prefix):
                seen.append(out_fd)
                if len(seen) == nth:
                    real(out_fd, in_fd, offset, nbytes)
                    _die()
            return real(out_fd, in_fd, offset, count)

        os.sendfile = sendfile

    return install


def kill_in_save(name: str, nbytes: int):
    """SIGKILL after ``nbytes`` of the torch.save into a file whose name contains ``name``."""

    def install():
        real = torch.save

        def save(obj, f, *args, **kwargs):
            if name in os.path.basename(str(getattr(f, "name", f))):
                buffer = io.BytesIO()
                real(obj, buffer, *args, **kwargs)
                f.write(buffer.getvalue()[:nbytes])
                f.flush()
                _die()
            return real(obj, f, *args, **kwargs)

        torch.save = save

    return install


def kill_at_update(nth: int):
    """SIGKILL as the run's ``nth`` update begins."""

    def install():
        from fairseq.trainer import Trainer

        real, seen = Trainer.train_step, []

        def train_step(self, *args, **kwargs):
            seen.append(1)
            if len(seen) == nth:
                _die()
            return real(self, *args, **kwargs)

        Trainer.train_step = train_step

    return install


# --------------------------------------------------------------------------- helpers


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def _updates(path) -> int:
    return _state(path)["optimizer_history"][-1]["num_updates"]


def _same_weights(a, b) -> bool:
    wa, wb = _state(a)["model"], _state(b)["model"]
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _loaded(log: str) -> list[tuple[str, int]]:
    """(file, updates) of each checkpoint fairseq's trainer loaded, as it logs them."""
    return [(Path(f).name, int(u)) for f, u in re.findall(r"Loaded checkpoint (\S+) \(epoch \d+ @ (\d+) updates\)", log)]


def _last_line(log: str) -> str:
    return log.rstrip().splitlines()[-1]


@pytest.fixture(scope="module", autouse=True)
def imported_once():
    """What every child would import anew (2 s of it torch._dynamo, imported by torch's optimizers)."""
    import fairseq_cli.train  # noqa: F401
    import torch._dynamo  # noqa: F401


@pytest.fixture(scope="module")
def uninterrupted(tiny_data_bin, tmp_path_factory):
    """The save dir of a run never killed: checkpoints at updates 2, 4, 6."""
    root = tmp_path_factory.mktemp("uninterrupted")
    status, log = run_forked("train", _train_args(tiny_data_bin, root / "ckpt"), root / "log")
    assert status == 0, log
    return root / "ckpt"


# --------------------------------------------------------------------------- a kill at any moment


def test_a_run_killed_three_times_ends_with_the_uninterrupted_weights(tiny_data_bin, uninterrupted, tmp_path):
    """Each resume starts from the last completed save: it loses at most the updates since then."""
    save = tmp_path / "ckpt"
    args = _train_args(tiny_data_bin, save)

    # 1. in the copy of checkpoint_1_4.pt to checkpoint_last.pt, 1000 bytes in
    status, log = run_forked("train", args, tmp_path / "1.log", kill_in_copy("checkpoint_last.pt", nth=2, nbytes=1000))
    assert killed(status), log
    assert _updates(save / "checkpoint_1_4.pt") == 4
    assert _updates(save / "checkpoint_last.pt") == 2  # the previous one, whole: the copy is atomic

    # 2. in the write of checkpoint_1_6.pt, 1000 bytes in
    status, log = run_forked("train", args, tmp_path / "2.log", kill_in_save("checkpoint_1_6.pt", nbytes=1000))
    assert killed(status), log
    assert _loaded(log) == [("checkpoint_last.pt", 2)]
    assert _updates(save / "checkpoint_last.pt") == 4

    # 3. as update 5 begins (the first of the resumed run)
    status, log = run_forked("train", args, tmp_path / "3.log", kill_at_update(1))
    assert killed(status), log
    assert _loaded(log) == [("checkpoint_last.pt", 4)]

    status, log = run_forked("train", args, tmp_path / "4.log")
    assert status == 0, log
    assert _loaded(log) == [("checkpoint_last.pt", 4)]
    assert _updates(save / "checkpoint_last.pt") == UPDATES
    assert _same_weights(save / "checkpoint_last.pt", uninterrupted / "checkpoint_last.pt")


def test_a_truncated_checkpoint_last_resumes_from_the_newest_checkpoint_that_loads(tiny_data_bin, uninterrupted, tmp_path):
    """What a kill during stock fairseq's copy leaves, and worse: the newest numbered checkpoint is empty."""
    save = tmp_path / "ckpt"
    shutil.copytree(uninterrupted, save)  # copy2: the mtimes, which order the fallbacks, come along
    with open(save / "checkpoint_last.pt", "r+b") as f:
        f.truncate(1000)
    (save / "checkpoint_1_6.pt").write_bytes(b"")

    status, log = run_forked("train", _train_args(tiny_data_bin, save), tmp_path / "log")
    assert status == 0, log
    warning = next(line for line in log.splitlines() if "resumed from" in line)
    assert f"checkpoint {save / 'checkpoint_last.pt'} is truncated (1000 bytes" in warning
    assert f"resumed from {save / 'checkpoint_1_4.pt'} instead" in warning
    assert _loaded(log) == [("checkpoint_1_4.pt", 4)]
    assert _same_weights(save / "checkpoint_last.pt", uninterrupted / "checkpoint_last.pt")


def test_a_truncated_checkpoint_last_with_nothing_beside_it_is_named(tiny_data_bin, uninterrupted, tmp_path):
    save = tmp_path / "ckpt"
    save.mkdir()
    (save / "checkpoint_last.pt").write_bytes((uninterrupted / "checkpoint_last.pt").read_bytes()[:1000])
    status, log = run_forked("train", _train_args(tiny_data_bin, save), tmp_path / "log")
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 1, log
    last = _last_line(log)
    assert last.startswith(f"fairseq_plugins.checks.CheckpointError: checkpoint {save / 'checkpoint_last.pt'} does not load"), last
    assert "is truncated (1000 bytes" in last and "nothing to resume from beside it" in last


def test_a_checkpoint_copy_that_fails_half_way_leaves_the_destination_whole(tmp_path, monkeypatch):
    from fairseq import checkpoint_utils, file_io

    src, dst = tmp_path / "checkpoint_1_4.pt", tmp_path / "checkpoint_last.pt"
    src.write_bytes(b"new" * 1000)
    dst.write_bytes(b"old")
    assert checkpoint_utils.PathManager.copy(str(src), str(dst), overwrite=True)
    assert dst.read_bytes() == src.read_bytes() and sorted(os.listdir(tmp_path)) == [src.name, dst.name]

    def copy_half(s, d):
        Path(d).write_bytes(Path(s).read_bytes()[:10])
        raise OSError(28, "No space left on device")

    dst.write_bytes(b"old")
    monkeypatch.setattr(shutil, "copyfile", copy_half)
    with pytest.raises(OSError, match="No space left"):
        checkpoint_utils.PathManager.copy(str(src), str(dst), overwrite=True)
    assert dst.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == [src.name, dst.name]
    # fairseq's own copy for everyone but checkpoint_utils
    assert checkpoint_utils.PathManager.__wrapped__ is file_io.PathManager
    assert file_io.PathManager.copy is not checkpoint_utils.PathManager.copy


# --------------------------------------------------------------------------- clear errors at the door


def _write_broken(path: Path, kind: str) -> Path:
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "missing":
        pass
    else:
        torch.save({"model": {"w": torch.zeros(64, 64)}}, path, _use_new_zipfile_serialization=kind == "truncated")
        path.write_bytes(path.read_bytes()[:1000])
    return path


@pytest.mark.parametrize("kind", ["empty", "truncated", "truncated_legacy_format"])
def test_an_unreadable_checkpoint_is_named_by_path(tmp_path, kind):
    from fairseq import checkpoint_utils

    path = _write_broken(tmp_path / "ckpt.pt", kind)
    for load in (checkpoint_utils.load_checkpoint_to_cpu, lambda p: checkpoint_utils.load_model_ensemble([p])):  # --path
        with pytest.raises(checks.CheckpointError, match=f"^checkpoint {re.escape(str(path))} ") as error:
            load(str(path))
        assert isinstance(error.value, RuntimeError) and error.value.path == str(path)


def test_a_missing_checkpoint_keeps_fairseqs_error_which_names_it(tmp_path):
    from fairseq import checkpoint_utils

    path = str(tmp_path / "nowhere.pt")
    with pytest.raises(OSError, match=f"Model file not found: {re.escape(path)}"):
        checkpoint_utils.load_model_ensemble([path])


def test_an_empty_finetune_from_model_is_named(tiny_data_bin, tmp_path):
    empty = _write_broken(tmp_path / "pretrained.pt", "empty")
    args = _train_args(tiny_data_bin, tmp_path / "ckpt", "--finetune-from-model", empty)
    status, log = run_forked("train", args, tmp_path / "log")
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 1, log
    assert _last_line(log) == (
        f"fairseq_plugins.checks.CheckpointError: checkpoint {empty} is empty (0 bytes): its write was cut off, or it was never written"
    )


@pytest.mark.parametrize("option", ["--fp16", "--bf16"])
def test_half_precision_without_its_device_is_refused_naming_the_option(tiny_data_bin, tmp_path, option):
    status, log = run_forked("train", _train_args(tiny_data_bin, tmp_path / "ckpt", option), tmp_path / "log")
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 1, log
    assert _last_line(log).startswith(f"ValueError: {option} needs a "), log[-3000:]


def test_the_half_precision_check_names_the_option_given_and_lets_what_runs_pass():
    flags = argparse.Namespace
    with pytest.raises(ValueError, match="^--memory-efficient-bf16 needs a TPU: in fairseq 0.12 it implies --tpu"):
        checks.check_half_precision(flags(bf16=True, memory_efficient_bf16=True, tpu=True), cuda=True, xla=False)
    with pytest.raises(ValueError, match="^--fp16 needs a CUDA GPU .* but torch sees no CUDA device"):
        checks.check_half_precision(flags(fp16=True), cuda=False, xla=False)
    checks.check_half_precision(flags(fp16=True), cuda=True, xla=False)
    checks.check_half_precision(flags(fp16=True, memory_efficient_fp16=True, cpu=True), cuda=False, xla=False)  # runs on a CPU
    checks.check_half_precision(flags(bf16=True, tpu=True), cuda=False, xla=True)


def test_nbest_above_beam_is_refused_by_the_stock_task(tiny_data_bin_unbuilt):
    """A stock task's generator is refused before it is built; nbest <= beam is generated by the
    plugin's CLI tests (test_fairseq_compat, test_plugin_cli)."""
    from fairseq.data import Dictionary
    from fairseq.tasks.translation import TranslationConfig, TranslationTask

    dictionary = Dictionary.load(str(tiny_data_bin_unbuilt / "dict.src.txt"))
    task = TranslationTask(TranslationConfig(), dictionary, dictionary)
    with pytest.raises(ValueError, match=r"^--nbest 3 is above --beam 2: the beam search finds only 2 hypotheses"):
        task.build_generator([], argparse.Namespace(beam=2, nbest=3))
    for fine in (argparse.Namespace(beam=3, nbest=3), argparse.Namespace(beam=2)):  # the latter: --eval-bleu-args
        checks.check_nbest_within_beam(fine)
