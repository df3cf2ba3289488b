"""scripts/average_checkpoints.py: the elementwise mean of the parameters, what is kept of the newest checkpoint,
--last N DIR by update number, refusals, and that evaluate.py loads an average of real fairseq checkpoints."""

import gzip
import json
import os
import random
import sys

import pytest
import torch
from helpers import BIN, ROOT, TINY_ARCH, cli, run

sys.path.insert(0, str(ROOT / "scripts"))
import average_checkpoints as avg  # noqa: E402


def fake_checkpoint(path, seed: int, updates: int, shapes=None) -> dict:
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or {"w": (3, 4), "b": (4,)}
    model = {k: torch.randn(*s, generator=g) for k, s in shapes.items()}
    model["version"] = torch.tensor([seed])  # an integer buffer: not averaged
    state = {"model": model, "cfg": {"seed": seed}, "optimizer_history": [{"num_updates": updates}],
             "extra_state": {"updates": updates}, "last_optimizer_state": {"m": torch.zeros(2)}}  # fmt: skip
    torch.save(state, path)
    return state


def test_average_is_the_elementwise_mean_and_keeps_the_newest_rest(tmp_path):
    states = [fake_checkpoint(tmp_path / f"checkpoint_1_{u}.pt", seed=u, updates=u) for u in (10, 20, 30)]
    out = tmp_path / "avg.pt"
    assert avg.main(["--inputs", *(str(tmp_path / f"checkpoint_1_{u}.pt") for u in (10, 20, 30)), "--output", str(out)]) == 0
    got = torch.load(out, weights_only=False)
    for k in ("w", "b"):
        expected = (states[0]["model"][k].double() + states[1]["model"][k].double() + states[2]["model"][k].double()) / 3
        assert got["model"][k].dtype == torch.float32
        assert torch.equal(got["model"][k], expected.float()), k
        assert not torch.equal(got["model"][k], states[2]["model"][k]), k
    assert torch.equal(got["model"]["version"], torch.tensor([30]))
    assert got["cfg"] == {"seed": 30} and got["extra_state"] == {"updates": 30} and "last_optimizer_state" not in got
    assert len(got["averaged_checkpoints"]) == 3 and not (tmp_path / "avg.pt.tmp").exists()


def test_last_n_takes_the_newest_by_update_number_not_by_name(tmp_path):
    # by name, checkpoint_9_900 sorts after checkpoint_10_1000; by update it is older
    for epoch, u in ((2, 100), (9, 900), (10, 1000), (11, 1100)):
        fake_checkpoint(tmp_path / f"checkpoint_{epoch}_{u}.pt", seed=u, updates=u)
    (tmp_path / "checkpoint_best.pt").write_bytes(b"not an interval checkpoint")
    assert [p.name for p in avg.newest_interval_checkpoints(tmp_path, 2)] == ["checkpoint_10_1000.pt", "checkpoint_11_1100.pt"]
    out = tmp_path / "avg.pt"
    assert avg.main(["--last", "3", str(tmp_path), "--output", str(out)]) == 0
    got = torch.load(out, weights_only=False)
    assert got["cfg"] == {"seed": 1100} and [p.rsplit("/", 1)[1] for p in got["averaged_checkpoints"]] == [
        "checkpoint_9_900.pt", "checkpoint_10_1000.pt", "checkpoint_11_1100.pt",
    ]  # fmt: skip
    with pytest.raises(avg.AverageError, match="has 4 interval checkpoint"):
        avg.newest_interval_checkpoints(tmp_path, 5)


def test_mismatched_checkpoints_are_refused_by_name(tmp_path, capsys):
    a, b, c = tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "c.pt"
    fake_checkpoint(a, 1, 1)
    fake_checkpoint(b, 2, 2, shapes={"w": (3, 5), "b": (4,)})
    fake_checkpoint(c, 3, 3, shapes={"w": (3, 4), "bias": (4,)})
    with pytest.raises(ValueError, match=r"b\.pt: parameter w has shape \(3, 5\)"):
        avg.average([a, b])
    with pytest.raises(ValueError, match=r"c\.pt: parameter names differ.*missing \['b'\], unexpected \['bias'\]"):
        avg.average([a, c])
    assert avg.main(["--inputs", str(a), str(b), "--output", str(tmp_path / "x.pt")]) == 1
    assert "b.pt: parameter w has shape" in capsys.readouterr().err and not (tmp_path / "x.pt").exists()


def test_an_average_of_fairseq_checkpoints_is_read_by_evaluate(tmp_path):
    """Real interval checkpoints of fairseq-train (two updates of a tiny model), averaged; evaluate.py decodes
    the valid split with it (the average differs from either input, so it is not a copy)."""
    rng = random.Random(3)
    raw = tmp_path / "raw"
    raw.mkdir()
    for split, n in (("train", 60), ("val", 8), ("test_2016_flickr", 8)):
        en = [" ".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 6))) for _ in range(n)]
        de = [" ".join(w.upper() for w in reversed(s.split())) for s in en]
        for lang, text in (("en", en), ("de", de)):
            (raw / f"{split}.{lang}.gz").write_bytes(gzip.compress(("\n".join(text) + "\n").encode(), mtime=0))
    data, save = tmp_path / "data", tmp_path / "ckpt"
    env = {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    run(["bash", ROOT / "data_prep/prepare-multi30k.sh", "--tgt", "de", "--raw-dir", raw, "--no-download",
         "--out", data, "--vocab-size", 40, "--workers", 1], env=env)  # fmt: skip
    run([cli("fairseq-train"), data / "data-bin", "--task", "translation", *TINY_ARCH, "--optimizer", "adam",
         "--lr", "0.01", "--max-tokens", "60", "--max-update", "2", "--save-interval-updates", "1",
         "--disable-validation", "--cpu", "--save-dir", save, "--no-progress-bar", "--seed", "1"])  # fmt: skip
    out = save / "checkpoint_avg2.pt"
    run([sys.executable, ROOT / "scripts/average_checkpoints.py", "--last", 2, save, "--output", out])
    inputs = [torch.load(save / f"checkpoint_1_{u}.pt", weights_only=False)["model"] for u in (1, 2)]
    got = torch.load(out, weights_only=False)["model"]
    name = "encoder.layers.0.fc1.weight"
    assert torch.allclose(got[name], (inputs[0][name] + inputs[1][name]) / 2) and not torch.equal(got[name], inputs[1][name])
    result_json = tmp_path / "valid.eval.json"
    run([sys.executable, ROOT / "scripts/evaluate.py", "--data", data, "--checkpoint", out, "--task", "translation",
         "--cpu", "--beam", 2, "--max-len-b", 3, "--split", "valid", "--output", result_json])  # fmt: skip
    result = json.loads(result_json.read_text())
    assert result["split"] == "valid" and result["n_sentences"] == 8 and result["checkpoint"] == str(out.resolve())
