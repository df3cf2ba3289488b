"""scripts/bench_soft_topk.py: the beam-search grid with its JSON, the peers' rows without their
packages, and the peer verdict."""

import json
import subprocess
import sys
from types import SimpleNamespace

from helpers import ROOT

SCRIPTS = ROOT / "scripts"
SCRIPT = SCRIPTS / "bench_soft_topk.py"
sys.path.insert(0, str(SCRIPTS))
import bench_soft_topk as bench  # noqa: E402

ENV = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}


def _run(args, block=()):
    """Runs the script with ``block``'s modules made unimportable (sys.modules[name] = None)."""
    code = (
        "import runpy, sys\n"
        f"for name in {list(block)!r}: sys.modules[name] = None\n"
        f"sys.path.insert(0, {str(SCRIPTS)!r})\n"
        f"sys.argv = [{str(SCRIPT)!r}] + {list(args)!r}\n"
        f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=ENV)


def test_quick_beam_search_grid_writes_every_cell_with_a_topk_time(tmp_path):
    path = tmp_path / "bench.json"
    _run(["--quick", "--grid", "beam-search", "--dtypes", "float32,bfloat16", "--json", str(path)])
    doc = json.loads(path.read_text())
    cells = {(r, k, n, e, d) for r, k, n, e in bench.grid_cells("beam-search", True) for d in ("float32", "bfloat16")}
    assert len(cells) == 10
    by_cell = {}
    for row in doc["rows"]:
        by_cell.setdefault((row["rows"], row["k"], row["n"], row["eps"], row["dtype"]), {})[row["method"]] = row
    assert set(by_cell) == cells
    for methods in by_cell.values():
        assert set(methods) == {"topk", "ours-fwd", "ours-fb"}
        assert methods["topk"]["ms"] > 0 and len(methods["topk"]["times_ms"]) == methods["topk"]["reps"] >= 1
        ours = methods["ours-fb"]
        assert abs(ours["x_topk"] - ours["ms"] / methods["topk"]["ms"]) < 1e-9 * ours["x_topk"]
        assert ours["err"] <= 1e-4  # float32's tolerance: bf16 inputs are solved in float32
    assert doc["memory_table"] is None and doc["grid"] == "beam-search"


def test_peers_without_their_packages_are_rows_saying_not_installed(tmp_path):
    path = tmp_path / "bench.json"
    methods = "topk,ours-fb,pot-sinkhorn,pot-log,pot-batch,ott,ott-unrolled"
    out = _run(["--quick", "--grid", "peers", "--methods", methods, "--json", str(path)], block=("ot", "ott", "jax")).stdout
    rows = json.loads(path.read_text())["rows"]
    peers = {r["method"]: r for r in rows if r["method"] in bench.PEERS}
    assert set(peers) == set(bench.PEERS)
    assert all(r["skipped"] == "not installed (pip install -e .[peers])" for r in peers.values())
    assert out.count("not installed (pip install -e .[peers])") >= 2 * len(bench.PEERS)  # progress lines and table
    assert {r["method"] for r in rows if "ms" in r} == {"topk", "ours-fb"}


def _verdict(peer_err, peer_ms, ours_err=1e-4, ours_ms=10.0):
    c = SimpleNamespace(errs={"ours-fb": ours_err}, times={"ours-fb": [ours_ms]})
    return bench.Runner.peer_speedup(c, {"err": peer_err, "ms": peer_ms})


def test_a_peer_that_wins_at_equal_error_is_named_the_winner():
    assert _verdict(5e-5, 5.0) == "0.5x (PEER WINS)"
    assert _verdict(5e-5, 20.0) == "2x (ours ahead)"
    # stopped short of ours' error: slower still counts for ours, faster is no comparison
    assert _verdict(1e-3, 20.0).startswith(">= 2x (ours ahead")
    assert _verdict(1e-3, 5.0).startswith("n/a at equal error")
