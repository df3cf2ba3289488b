"""scripts/compare.py: sacreBLEU's paired bootstrap and approximate randomisation, as its CLI runs them."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import BIN, ROOT

spec = importlib.util.spec_from_file_location("compare", ROOT / "scripts" / "compare.py")
compare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare)

WORDS = "a man woman child dog cat runs sits jumps on in under the park street beach red blue green ball".split()


def noisy(refs: list[str], rate: float, seed: int) -> list[str]:
    """Each word replaced with probability RATE: a system of some quality, deterministic."""
    rng = random.Random(seed)
    return [" ".join(w if rng.random() > rate else rng.choice(WORDS) for w in s.split()) for s in refs]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """References; a baseline; a system a little better than it; a copy of the baseline (another
    file); a system that copies the references."""
    root = tmp_path_factory.mktemp("compare")
    rng = random.Random(11)
    refs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 12))) + "." for _ in range(40)]
    texts = {"ref": refs, "base": noisy(refs, 0.4, 1), "close": noisy(refs, 0.38, 2), "same": noisy(refs, 0.4, 1), "copy": refs}
    paths = {}
    for name, lines in texts.items():
        paths[name] = root / f"{name}.txt"
        paths[name].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return paths


def run_compare(files, *systems: str, argv=()) -> dict:
    args = compare.parse_args(["--ref", str(files["ref"]), "--baseline", str(files["base"]),
                               *[a for s in systems for a in ("--system", str(files[s]))], *argv])  # fmt: skip
    return compare.compare(args)


def cli_p_values(files, test: str, n: int, seed: str | None) -> list[float]:
    """The p-values (BLEU, chrF) that `sacrebleu REF -i BASE SYS --paired-TEST` prints."""
    env = dict(os.environ, NO_COLOR="1")
    env.pop("SACREBLEU_SEED", None)
    if seed is not None:
        env["SACREBLEU_SEED"] = seed
    cmd = [str(BIN / "sacrebleu"), str(files["ref"]), "-i", str(files["base"]), str(files["close"]), f"--paired-{test}",
           f"--paired-{test}-n", str(n), "-m", "bleu", "chrf", "-f", "text", "-q", "--no-color"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, check=True).stdout
    found = [float(p) for p in re.findall(r"\(p = ([0-9.]+)\)", out)]
    assert len(found) == 2, out
    return found


def test_identical_systems_give_p_one(files):
    result = run_compare(files, "same")
    system = result["systems"][0]
    assert system["identical_to_baseline"] and system["difference"] == {"bleu": 0.0, "chrf": 0.0}
    assert system["p_value"] == {test: {"bleu": 1.0, "chrf": 1.0} for test in ("paired_bs", "paired_ar")}
    assert "identical_to_baseline" in result["notes"]
    # why compare.py sets it: sacreBLEU's own tests give 1/(n+1) for a system against itself
    refs, base = compare.read_lines(files["ref"]), compare.read_lines(files["base"])
    _, raw = compare.paired_test("bs", 1000, refs, base, [base], "12345")
    assert raw[1]["bleu"].p_value == pytest.approx(1 / 1001)


def test_copying_the_references_beats_the_baseline(files):
    system = run_compare(files, "copy")["systems"][0]
    assert system["scores"]["bleu"] == pytest.approx(100.0) and not system["identical_to_baseline"]
    for m in ("bleu", "chrf"):
        assert system["difference"][m] > 20
        assert system["p_value"]["paired_bs"][m] < 0.05 and system["p_value"]["paired_ar"][m] < 0.05


@pytest.mark.parametrize("seed", [None, "7"])
def test_p_values_are_the_sacrebleu_cli_s(files, seed):
    """The same files, seed and samples as `sacrebleu ... --paired-bs` / `--paired-ar`: the same p-values
    (the CLI prints 4 decimals; with 500 resamples p is a multiple of 1/501, so 4 decimals tell them apart)."""
    argv = ["--paired-bs-n", "500", "--paired-ar-n", "2000"] + (["--seed", seed] if seed else [])
    system = run_compare(files, "close", argv=argv)["systems"][0]
    ours_bs = [system["p_value"]["paired_bs"][m] for m in ("bleu", "chrf")]
    ours_ar = [system["p_value"]["paired_ar"][m] for m in ("bleu", "chrf")]
    assert all(0.01 < p < 0.9 for p in ours_bs + ours_ar), (ours_bs, ours_ar)  # informative, not 1/(n+1) or 1
    assert [round(p, 4) for p in ours_bs] == cli_p_values(files, "bs", 500, seed)
    assert [round(p, 4) for p in ours_ar] == cli_p_values(files, "ar", 2000, seed)


def test_the_seed_and_sample_counts_are_used(files):
    def p_bs(*argv):
        return run_compare(files, "close", argv=["--paired-ar-n", "100", *argv])["systems"][0]["p_value"]["paired_bs"]

    assert p_bs("--seed", "7") == p_bs("--seed", "7")
    assert p_bs("--seed", "7") != p_bs("--seed", "8")
    assert p_bs("--seed", "7", "--paired-bs-n", "200") != p_bs("--seed", "7", "--paired-bs-n", "300")


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, ROOT / "scripts/compare.py", *map(str, args)], capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def test_cli_json_and_report(files, tmp_path):
    out = tmp_path / "cmp/significance.json"
    proc = run_cli("--ref", files["ref"], "--baseline", files["base"], "--system", files["close"], "--system",
                   files["copy"], "--json", out, "--paired-ar-n", 1000)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["n_sentences"] == 40 and result["seed"] == 12345
    assert (result["tests"]["paired_bs"]["n"], result["tests"]["paired_ar"]["n"]) == (1000, 1000)
    assert result["tests"]["paired_bs"]["signatures"]["bleu"].startswith("nrefs:1|bs:1000|seed:12345|case:mixed|eff:no|tok:13a")
    assert [s["file"] for s in result["systems"]] == [str(files["close"]), str(files["copy"])]
    for system in result["systems"]:
        assert set(system) >= {"scores", "difference", "bootstrap", "p_value"}
        assert set(system["p_value"]) == {"paired_bs", "paired_ar"}
        for m in ("bleu", "chrf"):
            assert system["difference"][m] == pytest.approx(system["scores"][m] - result["baseline"]["scores"][m])
            line = next(x for x in proc.stdout.splitlines() if x.strip().startswith("BLEU" if m == "bleu" else "chrF")
                        and f"{system['difference'][m]:+6.2f}" in x)  # fmt: skip
            b = system["bootstrap"][m]
            assert f"95% CI {b['mean']:.2f} ± {b['ci95']:.2f}" in line
            assert f"p = {system['p_value']['paired_bs'][m]:.4f} (bootstrap)" in line


def test_cli_bad_input(files, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("one line\n")

    def fails(*args, match, code=1):
        proc = run_cli(*args)
        assert proc.returncode == code and "Traceback" not in proc.stderr, proc.stderr
        assert match in proc.stderr, proc.stderr

    base = ("--ref", files["ref"], "--baseline", files["base"])
    fails(*base, "--system", tmp_path / "nope.txt", match=f"file not found: {tmp_path / 'nope.txt'}")
    fails(*base, "--system", short, match=f"{short} has 1 lines but the references ({files['ref']}) have 40")
    fails(*base, "--system", files["close"], "--seed", "0", match="argument --seed: must be a positive integer", code=2)
    fails(*base, "--system", files["close"], "--paired-bs-n", "0", match="argument --paired-bs-n", code=2)
    fails(*base, match="the following arguments are required: --system", code=2)
