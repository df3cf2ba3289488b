"""Host reads (host-device synchronisations on a GPU) per decoding step of the search, counted on
the CPU by scripts/bench_syncs.py's dispatch-mode counter."""

import importlib.util
from pathlib import Path

import pytest
import torch
from step_models import BOS, EOS, PAD, UNK, RecurrentBigram

from soft_beam.search import SearchConfig, beam_search

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_syncs", ROOT / "scripts" / "bench_syncs.py")
bench_syncs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_syncs)

pytestmark = pytest.mark.usefixtures("one_thread")
SEARCH = "soft_beam/search.py"


def test_counter_sees_each_kind_of_host_read_and_nothing_else():
    x = torch.arange(6.0).view(2, 3)  # (2, 3)
    mask = x > 2
    with bench_syncs.HostReadCounter() as counter:
        y = (x * 2 + 1).softmax(-1).topk(2).values  # no host read
        x.tolist()
        int(x[0, 1])
        bool(mask.any())
        mask.nonzero()
        x[mask]
        x.unique()
        torch.nn.functional.one_hot(torch.tensor([0, 2]), 3)  # a read on the CPU only
    kinds = [kind for _, kind, _ in counter.events]
    assert kinds == ["tolist", "_local_scalar_dense", "_local_scalar_dense", "nonzero", "index (bool mask)", "_unique2"]
    assert all(where.startswith("tests/test_syncs.py:") for _, _, where in counter.events)
    assert y.shape == (2, 2)
    assert torch.Tensor.tolist is not None and x.tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]  # restored on exit


@pytest.mark.parametrize("epsilon", [0.0, 0.05])
def test_search_reads_the_host_once_per_decoding_step(epsilon):
    """At most 1 host read per step in search.py (which hypotheses finished), plus 1 after the loop
    (sorting the hypotheses); the soft top-k solver's own reads are not the search's. The old
    search read once per finishing candidate, twice more per step, and once per dropped step."""
    params = RecurrentBigram(sentences=6, vocab=12, dim=5, seed=3, eos_rate=0.6)
    cfg = SearchConfig(beam=3, epsilon=epsilon, max_len_b=12)
    counter = bench_syncs.HostReadCounter()
    with counter:
        hyps = beam_search(bench_syncs.Marked(params.start(cfg.beam), [counter]), 6, 5, cfg,
                           bos=BOS, eos=EOS, pad=PAD, unk=UNK, device=torch.device("cpu"))  # fmt: skip
    steps = counter.step + 1
    per_step = counter.per_step(SEARCH, steps)
    # the case that used to cost most: sentences finishing at different steps, several hypotheses a step
    ends = sorted({len(h.tokens) for sentence in hyps for h in sentence})
    assert len(ends) >= 4 and sum(len(s) for s in hyps) == 6 * cfg.beam
    assert sum(per_step) <= steps + 1 and max(per_step[:-1]) <= 1, counter.events
    if epsilon:
        assert sum(counter.per_step("soft_beam/ot.py", steps)) > 0  # the solver's reads are counted, elsewhere
