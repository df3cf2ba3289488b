"""scripts/bench_spans.py: the span it records is the one the operator normalises by."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_spans  # noqa: E402


def test_row_spans_ignore_blocked_candidates_and_single_score_rows():
    inf = float("inf")
    scores = torch.tensor(
        [
            [-1.0, -3.5, -inf, -2.0],  # span over the finite scores: 2.5
            [-inf, -0.2, -inf, -inf],  # one finite score: no range, no soft top-k row to speak of
            [-4.0, -4.0, -4.0, -4.1],  # a near-tie: 0.1
        ]
    )
    spans = bench_spans.row_spans(scores)
    assert torch.allclose(spans, torch.tensor([2.5, 0.1]))


def test_recording_wrapper_passes_the_operator_through():
    spans = []
    inner, recording = bench_spans.record_spans(spans)
    x = torch.tensor([[0.0, -1.0, -2.0, -3.0]])
    assert torch.equal(recording(x, 2, 0.1), inner(x, 2, 0.1))
    assert torch.allclose(torch.cat(spans), torch.tensor([3.0]))
