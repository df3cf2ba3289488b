"""Test helpers: a tiny synthetic translation corpus and the fairseq console scripts."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_DIR = ROOT / "fairseq_plugins"
BIN = Path(sys.executable).parent

# A tiny fairseq transformer built from the stock `transformer` arch by overrides.
TINY_ARCH = [
    "--arch", "transformer", "--share-all-embeddings",
    "--encoder-layers", "1", "--decoder-layers", "1",
    "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
    "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64",
    "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
    "--dropout", "0.0",
]  # fmt: skip


def run(cmd: list, cwd=None, env=None, timeout=600) -> str:
    """Runs a command; on failure raises with its whole output, so a test failure says why."""
    full_env = dict(os.environ, PYTHONWARNINGS="ignore", **(env or {}))
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{cmd[0]} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return proc.stdout + proc.stderr


def cli(name: str) -> str:
    return str(BIN / name)


def write_synthetic_corpus(folder: Path, n_train=400, n_valid=40, n_test=45, seed=0) -> Path:
    """Source: 3-7 letters; target: the letters reversed and upper-cased (learnable in seconds)."""
    rng = random.Random(seed)
    letters = "abcdefghij"
    folder.mkdir(parents=True, exist_ok=True)
    for split, size in (("train", n_train), ("valid", n_valid), ("test", n_test)):
        src, tgt = [], []
        for _ in range(size):
            words = [rng.choice(letters) for _ in range(rng.randint(3, 7))]
            src.append(" ".join(words))
            tgt.append(" ".join(w.upper() for w in reversed(words)))
        (folder / f"{split}.src").write_text("\n".join(src) + "\n")
        (folder / f"{split}.tgt").write_text("\n".join(tgt) + "\n")
    return folder


def preprocess(raw: Path, dest: Path) -> Path:
    run([
        cli("fairseq-preprocess"), "--source-lang", "src", "--target-lang", "tgt",
        "--trainpref", raw / "train", "--validpref", raw / "valid", "--testpref", raw / "test",
        "--destdir", dest, "--joined-dictionary", "--workers", "1",
    ])  # fmt: skip
    return dest


def train_mle(data_bin: Path, save_dir: Path, max_epoch=25, extra=()) -> Path:
    """Stock fairseq-train, no plugin: the kind of checkpoint users bring."""
    run([
        cli("fairseq-train"), data_bin, "--task", "translation", *TINY_ARCH,
        "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
        "--optimizer", "adam", "--lr", "0.005", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "20",
        "--max-tokens", "400", "--max-epoch", max_epoch, "--seed", "1", "--cpu",
        "--save-dir", save_dir, "--no-epoch-checkpoints", "--no-progress-bar", "--log-format", "simple",
        *extra,
    ])  # fmt: skip
    return save_dir / "checkpoint_best.pt"


def load_task_model(data_bin: Path, checkpoint: Path, *args: str, split: str = "test"):
    """In-process: fairseq args for the plugin's task and criterion, the model, one split loaded."""
    from fairseq import checkpoint_utils, options, tasks

    import fairseq_plugins  # noqa: F401

    parser = options.get_training_parser()
    cfg = options.parse_args_and_arch(
        parser,
        [str(data_bin), "--user-dir", str(PLUGIN_DIR), "--task", "translation_soft_beam",
         "--criterion", "soft_beam", "--arch", "transformer", "--cpu", *args],
    )  # fmt: skip
    task = tasks.setup_task(cfg)
    models, _ = checkpoint_utils.load_model_ensemble([str(checkpoint)], task=task)
    task.load_dataset(split)
    return cfg, task, models[0].eval()


def batches(task, split="test", max_sentences=16):
    itr = task.get_batch_iterator(task.dataset(split), max_sentences=max_sentences, seed=1)
    return list(itr.next_epoch_itr(shuffle=False))
