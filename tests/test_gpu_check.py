"""scripts/gpu_check.sh in its CPU mode (--device cpu --quick), on synthetic Multi30k files: every part
runs and is reported, a part over its limit is "not run" and the others still run."""

import gzip
import json
import os
import random
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
TITLES = {
    "pytest": "1. pytest -m cuda",
    "topk": "2. soft top-k against torch.topk",
    "setup": "setup: tiny model",
    "train": "3. training step, MLE against soft_beam",
    "generate": "4. generation against stock fairseq",
    "syncs": "5. host-device syncs per decoding step",
}
pytestmark = pytest.mark.slow


def write_multi30k(raw: Path, seed=0) -> Path:
    """train (500 pairs), val and test_2016_flickr (60 each) as the dataset's .gz files: sentences of
    4 to 9 words from a 300-word lexicon; German is each word reversed, in reverse order."""
    rng = random.Random(seed)
    lexicon = ["".join(rng.choice("abcdefghiklmnoprstuw") for _ in range(rng.randint(3, 8))) for _ in range(300)]
    raw.mkdir(parents=True)
    for split, n in (("train", 500), ("val", 60), ("test_2016_flickr", 60)):
        en = [" ".join(rng.choice(lexicon) for _ in range(rng.randint(4, 9))) for _ in range(n)]
        de = [" ".join(w[::-1] for w in reversed(s.split())) for s in en]
        for lang, lines in (("en", en), ("de", de)):
            (raw / f"{split}.{lang}.gz").write_bytes(gzip.compress(("\n".join(lines) + "\n").encode(), mtime=0))
    return raw


def gpu_check(tmp_path: Path, raw: Path, **limits) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_LIMIT_S_")}
    env.update({f"GPU_CHECK_LIMIT_S_{part.upper()}": str(s) for part, s in limits.items()}, OMP_NUM_THREADS="1")
    cmd = ["bash", str(SCRIPT), "--device", "cpu", "--quick", "--out", str(out), "--raw-dir", str(raw)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, out


def report(out: Path) -> tuple[str, dict]:
    (md,) = out.glob("cpu-*.md")
    summary = json.loads(md.with_suffix(".json").read_text())
    assert summary["device_name"] == md.stem and summary["quick"] is True
    return md.read_text(), summary


def status_row(md: str, part: str) -> str:
    rows = [line for line in md.splitlines() if line.startswith(f"| {TITLES[part]}")]
    assert len(rows) == 1, f"{part} is not in the report's table"
    return rows[0].split(" | ")[1]


def test_cpu_quick_runs_every_part_and_reports_it(tmp_path):
    _, out = gpu_check(tmp_path, write_multi30k(tmp_path / "raw"))
    md, summary = report(out)
    assert re.fullmatch(r"\d+ skipped \(no CUDA\)", status_row(md, "pytest"))
    for part in ("topk", "setup", "train", "generate", "syncs"):
        assert status_row(md, part) == "ok" == summary["parts"][part]["status"], md
        assert f"## {TITLES[part]}" in md
    raw = {part: json.loads((out / summary["parts"][part]["json"]).read_text()) for part in ("topk", "train", "generate", "syncs")}
    assert any(row["method"] == "ours-fb" for row in raw["topk"]["rows"])
    assert raw["generate"]["generate"]["identical"] is True  # our generator (eps 0) is fairseq's beam search
    hard = raw["syncs"]["modes"]["hard"]
    assert hard["steps"] > 1 and hard["search_py"]["total"] <= hard["steps"] + 1  # one host read a step, one to sort
    assert summary["targets"]["generate"]["reached"] in (True, False)  # measured, whatever the CPU's speed
    assert set(summary["targets"]) == {"topk", "train", "generate"}


def test_a_part_over_its_limit_is_not_run_and_the_others_still_are(tmp_path):
    """topk gets 1 s; the setup fails (no Multi30k files), so the parts that need its model are not run."""
    empty = tmp_path / "empty"
    empty.mkdir()
    proc, out = gpu_check(tmp_path, empty, topk=1)
    md, summary = report(out)
    assert status_row(md, "topk") == "not run (timeout after 1 s)" == summary["parts"]["topk"]["status"]
    assert re.fullmatch(r"\d+ skipped \(no CUDA\)", status_row(md, "pytest"))  # before it
    assert re.fullmatch(r"failed \(rc \d+\)", status_row(md, "setup"))  # after it: ran, and failed
    assert "train.en.gz" in md.split(f"## {TITLES['setup']}")[1]  # its last lines say why
    for part in ("train", "generate", "syncs"):
        assert status_row(md, part) == "not run (no model: the setup part did not finish)"
    assert not list(out.glob("*-topk.json"))
    assert summary["targets"]["topk"]["reached"] is None
