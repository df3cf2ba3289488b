"""scripts/bench_solver_versions.py: two soft_beam versions timed side by side."""

import subprocess
import sys

from helpers import ROOT

SCRIPT = ROOT / "scripts" / "bench_solver_versions.py"


def test_prints_one_row_per_cell_with_a_ratio_per_batch():
    out = subprocess.run([sys.executable, SCRIPT, "--old", ROOT / "soft_beam", "--batches", "2", "--reps", "1"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    rows = [line for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [tuple(r.split("|")[1:4]) for r in rows] == [
        (f" {k} ", f" {2 * k * k} ", f" {eps} ") for k in (4, 5, 10) for eps in (0.1, 0.01, 0.001)
    ]
    assert all(len(r.split("|")[6].split()) == 2 for r in rows)  # one new/old ratio per batch


def test_refuses_a_folder_that_is_not_a_package(tmp_path):
    proc = subprocess.run([sys.executable, SCRIPT, "--old", tmp_path], capture_output=True, text=True)
    assert proc.returncode == 2 and "is not a soft_beam package folder" in proc.stderr
