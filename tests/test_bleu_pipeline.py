"""scripts/bench_bleu.py: how it measures a process's peak memory, how it pools hypotheses over seeds,
and an end-to-end smoke test on a few hundred Multi30k pairs with a tiny model: data prep, base MLE, the
four continuation arms (mle, mrt, soft_hamming, soft_risk), evaluation on two test sets with a beam
sweep, the paired significance tests, results markdown/JSON/PNG, resuming, and --base; the two phases (valid: the
base chosen on validation, no test decoded; final: the test read once), named configurations, the validation table."""

import argparse
import gzip
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, run, train_mle

RAW_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "multi30k"
ARMS = ("mle_base", "mle", "mrt", "soft_hamming", "soft_risk")
TEST_SETS = {"test_2016_flickr": 1000, "test_2017_mscoco": 50}
# the sweep at --beam alone: each more beam is one more fairseq-generate per set and checkpoint (~5 s on a
# 2-core CPU, most of it importing fairseq); test_set_summary_with_a_beam_sweep covers several beams
SWEEP = [2]
# each baseline, and the arms tested against it
VERSUS = {"mle": ("mrt", "soft_hamming", "soft_risk"), "mrt": ("soft_hamming", "soft_risk")}


def peak_rss_mib(commands: list, tmp_path: Path) -> list:
    """Each command's max_rss_mib as bench_bleu.py measures it: run_logged called in a fresh process
    that parsed bench_bleu's arguments first, as its main() does (this pytest process, grown by torch
    and fairseq, would lift every child's figure to its own size)."""
    driver = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import bench_bleu; from pathlib import Path; "
        "bench_bleu.parse_args(['--raw-dir', sys.argv[2], '--work', sys.argv[2]]); "
        "print(json.dumps([bench_bleu.run_logged(c, Path(sys.argv[2]) / 'log')['max_rss_mib'] for c in json.loads(sys.argv[3])]))"
    )
    out = run([sys.executable, "-c", driver, ROOT / "scripts", tmp_path, json.dumps(commands)])
    return json.loads(out.strip().splitlines()[-1])


def test_run_logged_reports_the_child_process_peak_rss_in_mib(tmp_path):
    bare, filled = peak_rss_mib([[sys.executable, "-c", "pass"], [sys.executable, "-c", "b = b'x' * (200 * 2**20)"]], tmp_path)
    assert 0 < bare < 40  # a bare interpreter: bench_bleu's own process is not in it (with torch it is about 270)
    # MiB, not KiB or bytes: 200 MiB over the interpreter's own ~10 (not filled - bare: bare is the larger of the
    # interpreter's and the driver's size at the spawn, ~16 MiB, which a child's peak starts from)
    assert 200 < filled < 200 + 40


def test_pool_concatenates_the_seeds_and_repeats_the_references(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_bleu

    ref, seeds = tmp_path / "ref.de", [tmp_path / "s1.txt", tmp_path / "s2.txt"]
    ref.write_text("r1\nr2\n")
    seeds[0].write_text("a1\na2\n")
    seeds[1].write_text("b1\nb2\n")
    hyp, pooled_ref = bench_bleu.pool(seeds, ref, tmp_path / "pooled" / "x.hyp.txt")
    assert hyp.read_text() == "a1\na2\nb1\nb2\n" and pooled_ref.read_text() == "r1\nr2\nr1\nr2\n"
    before = hyp.stat().st_mtime_ns
    bench_bleu.pool(seeds, ref, hyp)  # unchanged content keeps the file, so a comparison on it stays cached
    assert hyp.stat().st_mtime_ns == before


def test_set_summary_with_a_beam_sweep_over_seeds(tmp_path):
    """Per test set, each score and each beam of the sweep as mean and std over the seeds, and as the per-set table
    shows them (the smoke test runs one seed and one beam)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_bleu
    import bleu_report

    def entry(bleu, b1):
        sweep = [{"beam": 1, "bleu": b1, "chrf": 50.0, "length_ratio": 0.9}, {"beam": 5, "bleu": bleu, "chrf": 51.0, "length_ratio": 1.0}]
        return {"n_sentences": 7, "hypotheses_file": "h", "bleu": bleu, "chrf": 51.0, "bleu_lowercase": bleu + 1, "length_ratio": 1.0,
                "beam_sweep": sweep}  # fmt: skip

    t = bench_bleu.set_summary([entry(30.0, 28.0), entry(32.0, 29.0)], {"mle": None})
    assert (t["bleu_mean"], t["bleu_std"], t["bleu_lowercase_mean"]) == (31.0, 2**0.5, 32.0)
    assert [(p["beam"], p["bleu_mean"], p["bleu"]) for p in t["beam_sweep"]] == [(1, 28.5, [28.0, 29.0]), (5, 31.0, [30.0, 32.0])]
    assert t["vs_mle"] is None and t["vs_mrt"] is None
    summary = {"settings": {"beam": 5, "sweep_beams": [1, 5]}, "test_sets": {"s": 7},
               "arms": {"mle": {"label": "L", "n_seeds": 2, "sets": {"s": t}}}}  # fmt: skip
    md = bleu_report.md_test_sets(summary)
    assert "| arm | seeds | BLEU mean ± std | chrF mean ± std | lowercased BLEU | length ratio | BLEU beam 1 | BLEU beam 5 |" in md
    assert "| L | 2 | 31.00 ± 1.41 | 51.00 ± 0.00 | 32.00 | 1.000 | 28.50 | 31.00 |" in md


def test_significance_table_puts_each_p_value_in_its_column():
    """The smoke test's untrained arms translate alike (every p is 1): here each p differs."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import bleu_report

    def entry(seed, base):
        p = {"paired_bs": {"bleu": base, "chrf": base + 0.1}, "paired_ar": {"bleu": base + 0.2, "chrf": base + 0.3}}
        return {"seed": seed, "p_value": p, "difference": {"bleu": -1.25, "chrf": 0.5}, "bootstrap": {"bleu": {"mean": 30.1, "ci95": 0.8}}}

    sig = {"per_seed": [entry(1, 0.01), entry(2, 0.02)], "pooled": entry(None, 0.0004)}
    summary = {"settings": {"paired_bs_n": 1000, "paired_ar_n": 10000}, "test_sets": {"s": 7},
               "arms": {"mle": {"label": "M", "sets": {"s": {"vs_mle": None, "vs_mrt": None}}},
                        "soft_risk": {"label": "R", "sets": {"s": {"vs_mle": None, "vs_mrt": sig}}}}}  # fmt: skip
    md = bleu_report.md_significance(summary)
    assert "| s | R | MRT | -1.25 | 30.10 ± 0.80 | <0.001 | 0.100 | 0.200 | 0.300 | s1 0.010, s2 0.020 |" in md
    assert not any(line.startswith("| s | M |") for line in md)


def bench_module():
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_bleu

    return bench_bleu


@pytest.mark.parametrize(
    "spec, message",
    [
        ("eps0.1", "expected NAME=ARM[:fairseq options]"),
        ("=soft_risk", "the name '' must start with a letter or digit"),
        ("a/b=soft_risk", "the name 'a/b' must start"),
        ("mle_base=mle", "and not be mle_base"),
        ("x=soft_foo", "unknown arm 'soft_foo' (one of mle, mrt, soft_hamming, soft_risk, soft_bleu)"),
        ("x=soft_risk:--lr '1e-4", "cannot split its fairseq options"),
        ("x=soft_risk:", "nothing after ':'"),
        ("x=soft_risk:lr 1e-4", "must start with an option such as --lr (got 'lr')"),
    ],
)
def test_config_parsing_errors_name_the_option_and_the_problem(spec, message):
    bench_bleu = bench_module()
    with pytest.raises(ValueError) as e:
        bench_bleu.parse_config(spec)
    assert str(e.value).startswith(f"--config {spec!r}: ") and message in str(e.value)


def test_configs_from_arms_and_config_options(tmp_path, monkeypatch, capsys):
    bench_bleu = bench_module()
    config = bench_bleu.parse_config("eps0.1=soft_hamming:--soft-beam-epsilon 0.1 --eval-bleu-args '{\"beam\": 2}'")
    assert config == bench_bleu.Config("eps0.1", "soft_hamming", ("--soft-beam-epsilon", "0.1", "--eval-bleu-args", '{"beam": 2}'))
    configs, mrt = bench_bleu.build_configs(["mle"], ["m2=mrt", "b=soft_bleu"], "mle", None)
    assert list(configs) == ["mle", "m2", "b"] and mrt is None  # "mrt" is not run: the soft ones have no MRT baseline
    assert bench_bleu.build_configs(["mle"], ["m2=mrt"], "mle", "m2")[1] == "m2"
    for arms, specs, mle, mrt, message in (
        (["mle", "mrt"], ["mrt=soft_risk"], "mle", None, "the name 'mrt' is given twice"),
        (["mrt"], [], "mle", None, "--mle-config 'mle': no configuration of arm mle"),
        (["mle"], ["x=soft_risk"], "x", None, "--mle-config 'x': no configuration of arm mle"),
        (["mle"], ["x=soft_risk"], "mle", "x", "--mrt-config 'x': no configuration of arm mrt"),
    ):
        with pytest.raises(ValueError, match=message):
            bench_bleu.build_configs(arms, specs, mle, mrt)
    # on the command line: exit 2 and the message, before anything runs
    monkeypatch.setattr(bench_bleu, "cuda_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        bench_bleu.parse_args(["--raw-dir", str(tmp_path), "--config", "x=soft_foo"])
    assert e.value.code == 2 and "--config 'x=soft_foo': unknown arm 'soft_foo'" in capsys.readouterr().err
    args = bench_bleu.parse_args(["--raw-dir", str(tmp_path), "--work", str(tmp_path), "--validate-every", "7",
                                  "--config", "e=soft_hamming:--soft-beam-epsilon 0.5", "--arms", "mle"])  # fmt: skip
    cmd, env = bench_bleu.arm_command(args, args.configs["e"], tmp_path, tmp_path / "base.pt", tmp_path / "s", 2)
    # the configuration's options last (they win over the defaults); every run keeps its best checkpoint by valid BLEU
    assert cmd[-2:] == ["--soft-beam-epsilon", "0.5"] and env["BEAM_LOSS"] == "hamming" and env["SEED"] == "2"
    i = cmd.index("--best-checkpoint-metric")
    assert cmd[i : i + 5] == ["--best-checkpoint-metric", "bleu", "--maximize-best-checkpoint-metric", "--save-interval-updates", "7"]
    assert bench_bleu.arm_command(args, bench_bleu.Config("b", "soft_bleu"), tmp_path, tmp_path, tmp_path, 1)[1]["BEAM_LOSS"] == "bleu"


# what odd_base's model config records (the arch's defaults elsewhere), and the arch's shape keys
ODD_KEYS = ("arch", "encoder_layers", "decoder_layers", "encoder_embed_dim", "decoder_embed_dim", "encoder_ffn_embed_dim",
            "decoder_ffn_embed_dim", "encoder_attention_heads", "decoder_attention_heads", "encoder_normalize_before",
            "decoder_learned_pos", "max_target_positions", "dropout", "share_all_embeddings")  # fmt: skip


@pytest.fixture(scope="module")
def odd_base(tiny_data_bin, tmp_path_factory):
    """A stock fairseq-train checkpoint (one update) of an architecture no default shares: encoder and decoder
    of different depth, width and heads, pre-norm encoder (an extra layer norm), learned decoder positions of a
    64-position table, dropout 0.25."""
    extra = ["--encoder-layers", "2", "--decoder-ffn-embed-dim", "48", "--decoder-attention-heads", "4",
             "--encoder-normalize-before", "--decoder-learned-pos", "--max-target-positions", "64",
             "--dropout", "0.25", "--max-update", "1"]  # fmt: skip
    return train_mle(tiny_data_bin, tmp_path_factory.mktemp("odd_base"), max_epoch=1, extra=extra)


@pytest.fixture(scope="module")
def odd_model_cfg(odd_base):
    """odd_base's model config as bench_bleu.py reads it (a child process importing torch: seconds)."""
    return bench_module().read_model_cfg(odd_base)


@pytest.mark.slow  # odd_base: fairseq-train
def test_base_checkpoint_gives_the_model_flags_that_rebuild_it(odd_base, odd_model_cfg, tiny_data_bin):
    """--base's model flags, read from the checkpoint, build a model that loads its state dict strictly, with
    every architecture key (dropouts included) as the checkpoint recorded it."""
    import torch
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    bench_bleu, model_cfg = bench_module(), odd_model_cfg
    flags = shlex.split(bench_bleu.base_arch_args(model_cfg, odd_base, None))
    parsed = options.parse_args_and_arch(options.get_training_parser(), [str(tiny_data_bin), "--task", "translation", "--cpu", *flags])
    # dropout changes no parameter: only this finds it wrong
    for key in ODD_KEYS:
        assert getattr(parsed, key) == model_cfg[key], key
    cfg = convert_namespace_to_omegaconf(parsed)
    model = tasks.setup_task(cfg.task).build_model(cfg.model)
    state = torch.load(odd_base, map_location="cpu", weights_only=False)["model"]
    model.load_state_dict(state, strict=True)


@pytest.mark.slow  # odd_base: fairseq-train
@pytest.mark.parametrize(
    "arch_args, named",
    [
        ("--encoder-layers 1", "--encoder-layers 1 disagrees"),  # the arch default, not the checkpoint's 2
        ("--arch transformer --decoder-ffn-embed-dim=64", "--decoder-ffn-embed-dim 64 disagrees"),
        ("-a transformer_iwslt_de_en", "--arch transformer_iwslt_de_en disagrees"),
        ("--decoder-normalize-before", "--decoder-normalize-before given disagrees"),
        ("--dropout 0.3", "--dropout 0.3 disagrees"),
    ],
)
def test_arch_args_that_disagree_with_the_base_are_refused_by_flag(odd_base, odd_model_cfg, arch_args, named):
    bench_bleu, model_cfg = bench_module(), odd_model_cfg
    with pytest.raises(ValueError, match=f"^--arch-args: {named} with the base checkpoint {odd_base}"):
        bench_bleu.base_arch_args(model_cfg, odd_base, arch_args)
    # flags that agree (in another spelling) pass; a flag that is no architecture key is kept, after the checkpoint's
    agreeing = "-a transformer --encoder-layers 2 --dropout=0.250 --encoder-normalize-before --checkpoint-activations"
    derived = bench_bleu.base_arch_args(model_cfg, odd_base, None)
    assert bench_bleu.base_arch_args(model_cfg, odd_base, agreeing) == derived + " --checkpoint-activations"


@pytest.mark.slow  # odd_base: fairseq-train
def test_base_sets_the_continuations_model_flags_on_the_command_line(odd_base, odd_model_cfg, tmp_path, monkeypatch, capsys):
    """--base FOLDER reads its checkpoint_best.pt; the flags reach every continuation's ARCH_ARGS; a disagreeing
    --arch-args stops the run before anything runs (exit 2), naming the flag."""
    bench_bleu = bench_module()
    monkeypatch.setattr(bench_bleu, "cuda_available", lambda: False)
    # --tiny chooses the model only when there is no --base
    argv = ["--raw-dir", str(tmp_path), "--work", str(tmp_path), "--base", str(odd_base.parent), "--tiny"]
    args = bench_bleu.parse_args(argv)
    derived = bench_bleu.base_arch_args(odd_model_cfg, odd_base, None)
    assert args.arch_args == derived and args.arch_args_from == str(odd_base)
    for arm in ("soft_bleu", "mle"):  # finetune_soft_beam.sh's and train_mle.sh's environment
        _, env = bench_bleu.arm_command(args, bench_bleu.Config(arm, arm), tmp_path, odd_base, tmp_path / arm, 1)
        assert env["ARCH_ARGS"] == derived, arm
    with pytest.raises(SystemExit) as e:
        bench_bleu.parse_args([*argv, "--arch-args", "--arch transformer --encoder-embed-dim 64"])
    assert e.value.code == 2 and "--arch-args: --encoder-embed-dim 64 disagrees with the base checkpoint" in capsys.readouterr().err


def test_valid_phase_never_decodes_a_test_set(tmp_path, monkeypatch):
    bench_bleu = bench_module()
    ran = []
    monkeypatch.setattr(bench_bleu, "run_logged", lambda cmd, log, env=None: ran.append(cmd))
    args = argparse.Namespace(
        phase="valid", beam=5, sweep_beams=[5], test_set_names=["t"], gpu=False, eval_max_len_a=1.2, eval_max_len_b=10
    )
    ckpt = tmp_path / "c.pt"
    ckpt.write_bytes(b"")
    with pytest.raises(bench_bleu.BenchError, match="the test sets are decoded only in --phase final"):
        bench_bleu.evaluate(args, tmp_path, ckpt, tmp_path / "test.eval.json")
    assert ran == []
    with pytest.raises(FileNotFoundError):  # the valid split runs evaluate.py (its JSON is missing here)
        bench_bleu.evaluate(args, tmp_path, ckpt, tmp_path / "valid.eval.json", split="valid")
    assert len(ran) == 1 and "--split" in ran[0] and "--test-set" not in ran[0]


def test_final_phase_reads_the_test_once(tmp_path):
    bench_bleu = bench_module()
    marker = tmp_path / "test_read.json"
    plan = {"configs": {"mle_base": {"arm": "mle", "options": [], "seeds": [1], "checkpoints": ["b.pt"]},
                        "mle": {"arm": "mle", "options": [], "seeds": [1], "checkpoints": ["m.pt"]}}, "test_sets": ["t"]}  # fmt: skip
    assert bench_bleu.claim_test_read(marker, plan, False, "cmd") == 0
    # a killed final phase (the read never finished) resumes the same read
    assert bench_bleu.claim_test_read(marker, plan, False, "cmd") == 0
    assert len(json.loads(marker.read_text())["reads"]) == 1
    bench_bleu.finish_test_read(marker, 0)
    with pytest.raises(bench_bleu.BenchError, match="already read for mle_base, mle .*Pass --reread-test"):
        bench_bleu.claim_test_read(marker, plan, False, "cmd")
    other = {"configs": {"new": plan["configs"]["mle"]}, "test_sets": ["t"]}  # a configuration never read: allowed
    assert bench_bleu.claim_test_read(marker, other, False, "cmd") == 1
    bench_bleu.finish_test_read(marker, 1)
    assert bench_bleu.claim_test_read(marker, plan, True, "cmd") == 2
    reads = bench_bleu.finish_test_read(marker, 2)
    assert [r["reread"] for r in reads["reads"]] == [[], [], ["mle_base", "mle"]] and reads["this_read"] == 2
    import bleu_report

    md = "\n".join(bleu_report.md_test_reads({"test_reads": reads}))
    assert "**The test sets were read 3 times in this work folder**" in md
    assert "read 3 (this report)" in md and "re-read with --reread-test: mle_base, mle" in md


def test_validation_table_lists_every_configuration_of_the_work_folder(tmp_path):
    """Best validation BLEU per seed (the later update on a tie, as fairseq's checkpoint_best), over seeds, for
    every run.json under WORK/seedS/NAME, this invocation's or an earlier one's."""
    bench_bleu = bench_module()
    import bleu_report

    def write(seed, name, points, options=()):
        folder = tmp_path / f"seed{seed}" / name
        folder.mkdir(parents=True)
        valid = [{"num_updates": u, "bleu": b} for u, b in points]
        identity = {"config": name, "arm": "soft_hamming", "options": list(options), "base": {}}
        (folder / "run.json").write_text(json.dumps({"num_updates": 40, "valid": valid, "sec_per_update": 2.0, "identity": identity}))

    write(1, "eps", [(10, 30.0), (20, 31.0), (30, 31.0), (40, 29.0)], ["--soft-beam-epsilon", "0.1"])
    write(2, "eps", [(10, 33.0), (20, 32.0), (30, None), (40, 30.0)], ["--soft-beam-epsilon", "0.1"])
    write(1, "old", [(10, 20.0), (20, 25.0)])
    args = argparse.Namespace(work=tmp_path, configs={"eps": None})
    table = bench_bleu.collect_validation(args)
    assert list(table) == ["eps", "old"]  # best first
    eps = table["eps"]
    assert (eps["best_bleu"], eps["best_update"], eps["best_bleu_mean"], eps["last_bleu"]) == ([31.0, 33.0], [30, 10], 32.0, [29.0, 30.0])
    assert eps["in_this_run"] and not table["old"]["in_this_run"] and eps["seeds"] == [1, 2]
    summary = {"settings": {"continue_updates": 40, "beam": 5, "validate_every": 10}, "validation": table}
    md = bleu_report.md_validation(summary)
    assert "| eps | soft_hamming | `--soft-beam-epsilon 0.1` | 2 | 32.00 ± 1.41 | 30, 10 | 29.50 | 2.000 | yes |" in md
    assert "| old | soft_hamming | (arm defaults) | 1 | 25.00 ± 0.00 | 20 | 25.00 | 2.000 | — |" in md


def test_a_work_folder_is_never_reused_for_another_configuration(tmp_path):
    bench_bleu = bench_module()
    identity = {"config": "e", "arm": "soft_hamming", "options": ["--lr", "1e-4"], "base": {"checkpoint": "b.pt"}}
    bench_bleu.check_identity(tmp_path / "e", identity)
    bench_bleu.check_identity(tmp_path / "e", identity)  # the same configuration: resumed or reused
    with pytest.raises(bench_bleu.BenchError, match="holds a run of another configuration or base"):
        bench_bleu.check_identity(tmp_path / "e", identity | {"options": ["--lr", "5e-5"]})
    with pytest.raises(bench_bleu.BenchError, match="another --config name"):
        bench_bleu.check_identity(tmp_path / "e", identity | {"base": {"checkpoint": "other.pt"}})


def test_train_stats_counts_a_validation_repeated_after_a_resume_once():
    bench_bleu = bench_module()
    log = "\n".join(
        f'x | valid | {{"valid_bleu": "{b}", "valid_num_updates": "{u}", "valid_loss": "3"}}'
        for u, b in ((10, 1), (20, 2), (20, 3), (30, 4))
    )
    assert [(p["num_updates"], p["bleu"]) for p in bench_bleu.train_stats(log)["valid"]] == [(10, 1.0), (20, 3.0), (30, 4.0)]


def raw_dir_with_two_test_sets(tmp_path: Path) -> Path:
    """The shared Multi30k files, linked, and a second test set under a real name (the recipe knows sets by
    name), test_2017_mscoco, made of the first 50 val pairs: the shared folder has only test_2016_flickr."""
    raw = tmp_path / "raw"
    raw.mkdir()
    for f in RAW_DIR.glob("*.gz"):
        (raw / f.name).symlink_to(f)
    for lang in ("en", "de"):
        with gzip.open(RAW_DIR / f"val.{lang}.gz", "rt", encoding="utf-8") as f:
            lines = [next(f) for _ in range(TEST_SETS["test_2017_mscoco"])]
        with gzip.open(raw / f"test_2017_mscoco.{lang}.gz", "wt", encoding="utf-8") as f:
            f.writelines(lines)
    return raw


def bench_command(tmp_path: Path) -> list:
    return [
        sys.executable, ROOT / "scripts" / "bench_bleu.py",
        "--tiny", "--subset", "300", "--vocab-size", "500", "--mle-updates", "6", "--continue-updates", "2",
        "--validate-every", "1", "--mle-validate-every", "3", "--seeds", "1", "--max-tokens", "300",
        "--log-interval", "1", "--workers", "1", "--cpu", "--work", tmp_path / "work",
        "--raw-dir", raw_dir_with_two_test_sets(tmp_path), "--base-select", "last,avg2",
        "--sweep-beams", ",".join(map(str, SWEEP)), "--paired-bs-n", "100", "--paired-ar-n", "100",
        # the soft-beam search of an untrained model runs to its length limit: keep it short
        "--max-valid-sentences", "16", "--beam", "2", "--continue-max-tokens", "120",
        "--eval-max-len-a", "0", "--eval-max-len-b", "4",
        "--soft-beam-size", "2", "--soft-beam-epsilon", "0.1", "--search-max-len-b", "3",
    ]  # fmt: skip


def check_arms(summary: dict, tmp_path: Path, md_lines: list, out_lines: list) -> None:
    (torch_only_mib,) = peak_rss_mib([[sys.executable, "-c", "import torch"]], tmp_path)
    assert set(summary["arms"]) == set(ARMS)
    for name, arm in summary["arms"].items():
        assert arm["n_seeds"] == 1 and len(arm["bleu"]) == 1 and len(arm["chrf"]) == 1, name
        assert 0 <= arm["bleu_mean"] <= 100 and 0 <= arm["chrf_mean"] <= 100, name
        assert arm["updates"] == (6 if name == "mle_base" else 2), name
        # the largest peak of the arm's fairseq-train processes (their run.json), under the machine's RAM and
        # above what importing torch alone takes, as the markdown table and the printed summary show it
        arm_runs = sorted((tmp_path / "work").glob(f"{'' if name == 'mle_base' else 'seed*/'}{name}/run.json"))
        assert arm_runs and arm["max_rss_mib"] == max(json.loads(r.read_text())["max_rss_mib"] for r in arm_runs), name
        assert torch_only_mib <= arm["max_rss_mib"] < summary["machine"]["ram_gib"] * 1024, name
        assert any(line.startswith(f"| {arm['label']} |") and line.endswith(f"| {arm['max_rss_mib']:.0f} |") for line in md_lines), name
        assert any(line.startswith(f"[bench] {name} ") and f"RSS {arm['max_rss_mib']:.0f} MiB" in line for line in out_lines), name
        assert arm["process_sec_per_update"] > 0, name
        assert arm["valid_curves"] and arm["valid_curves"][0]["points"], name
        assert all(p["bleu"] is not None for p in arm["valid_curves"][0]["points"]), name
        assert arm["commands"] and all(
            ("train_mle.sh" if name.startswith("mle") else "finetune_soft_beam.sh") in c for c in arm["commands"]
        ), name
    assert [p["num_updates"] for p in summary["arms"]["mle"]["valid_curves"][0]["points"]] == [1, 2]
    # mrt is the risk loss over the hard search; the soft arms search with their epsilon
    assert all("BEAM_LOSS=risk " in c and "BEAM_EPSILON=0 " in c for c in summary["arms"]["mrt"]["commands"])
    assert all("BEAM_EPSILON=0.1 " in c for a in ("soft_hamming", "soft_risk") for c in summary["arms"][a]["commands"])
    for arm in ("mrt", "soft_risk"):
        assert summary["arms"][arm]["last_train_inner"][0].get("beam_loss") is not None, arm


def check_sets(summary: dict, md: str) -> None:
    """Every arm scored on every test set, with every column of the per-set tables."""
    assert summary["test_sets"] == TEST_SETS and summary["test_sentences"] == 1000
    for name, arm in summary["arms"].items():
        assert list(arm["sets"]) == list(TEST_SETS), name
        for set_name, t in arm["sets"].items():
            assert t["n_sentences"] == TEST_SETS[set_name], (name, set_name)
            for key in ("bleu", "chrf", "bleu_lowercase"):
                assert 0 <= t[f"{key}_mean"] <= 100 and t[f"{key}_std"] == 0.0, (name, set_name, key)
            assert 0 < t["length_ratio_mean"] < 10, (name, set_name)
            assert [p["beam"] for p in t["beam_sweep"]] == SWEEP, (name, set_name)
            assert t["beam_sweep"][0]["bleu"] == t["bleu"], (name, set_name)  # the --beam decode, reused
            assert all(Path(f).is_file() for f in t["hypotheses_files"]), (name, set_name)
        assert arm["sets"]["test_2016_flickr"]["bleu"] == arm["bleu"], name
        assert f"| {arm['label']} | 1 | {t['bleu_mean']:.2f} ± 0.00 | {t['chrf_mean']:.2f} ± 0.00 | " in md, name
    for needle in ("### test_2016_flickr (1000 sentences)", "### test_2017_mscoco (50 sentences)", "| length ratio | BLEU beam 2 |"):
        assert needle in md, needle


def check_significance(summary: dict, work: Path, md_lines: list) -> None:
    """Every arm against MLE and the soft arms against MRT, per seed and pooled, from compare.py's JSONs."""
    files = set()
    for set_name in TEST_SETS:
        ref = work / "data" / "raw" / ("test.de" if set_name == "test_2016_flickr" else "test1.de")
        assert (work / "compare" / set_name / "pooled" / "ref.txt").read_text() == ref.read_text()  # one seed: once
        for name, arm in summary["arms"].items():
            for baseline in VERSUS:
                sig = arm["sets"][set_name][f"vs_{baseline}"]
                if name not in VERSUS[baseline]:
                    assert sig is None, (name, set_name, baseline)
                    continue
                assert [e["seed"] for e in sig["per_seed"]] == [1] and sig["pooled"]["seeds"] == [1]
                for entry, folder in ((sig["per_seed"][0], work / "seed1"), (sig["pooled"], work / "compare" / set_name / "pooled")):
                    p = entry["p_value"]
                    assert all(0 < p[t][m] <= 1 for t in ("paired_bs", "paired_ar") for m in ("bleu", "chrf")), (name, baseline)
                    assert isinstance(entry["difference"]["bleu"], float) and entry["bootstrap"]["bleu"]["ci95"] >= 0
                    result = json.loads(Path(entry["compare_json"]).read_text())
                    assert result["tests"]["paired_bs"]["n"] == 100 and result["tests"]["paired_ar"]["n"] == 100
                    assert result["baseline"]["file"].startswith(str(folder)) and baseline in result["baseline"]["file"]
                    assert any(name in s["file"] for s in result["systems"]) and result["n_sentences"] == TEST_SETS[set_name]
                    files.add(entry["compare_json"])
                pooled = sig["pooled"]["p_value"]
                cells = [f"{pooled[t][m]:.3f}" for t in ("paired_bs", "paired_ar") for m in ("bleu", "chrf")]
                row = f"| {set_name} | {arm['label']} | {baseline.upper()} | {sig['pooled']['difference']['bleu']:+.2f} | "
                tail = " | ".join(cells) + f" | s1 {cells[0]} |"
                assert any(line.startswith(row) and line.endswith(tail) for line in md_lines), (row, tail)
    assert sorted(files) == summary["significance_files"] and len(files) == 2 * 2 * 2  # sets x (seed 1, pooled) x baselines


def check_valid_phase(out: str, work: Path) -> str:
    """--phase valid: the base chosen on validation among its candidates, every configuration trained with its
    best checkpoint kept, validation figures only: evaluate.py never runs on a test split."""
    ran = [line for line in out.splitlines() if line.startswith("[bench] running:")]
    evals = [line for line in ran if "evaluate.py" in line]
    assert len(evals) == 2 and all("--split valid" in line and "--test-set" not in line for line in evals), evals
    assert "average_checkpoints.py" in out and not any("compare.py" in line for line in ran)
    assert (
        not list(work.rglob("test.eval.json"))
        and not [f for f in work.rglob("*.hyp.txt") if ".valid." not in f.name]
        and not (work / "test_read.json").exists()
    )
    v = json.loads((work / "validation.json").read_text())
    sel = v["base"]["selection"]
    assert v["phase"] == "valid" and list(sel["candidates"]) == ["last", "avg2"] and "test_sets" not in v
    best = max(sel["candidates"].values(), key=lambda c: c["valid_bleu"])
    assert v["base"]["checkpoint"] == best["checkpoint"] == sel["candidates"][sel["selected"]]["checkpoint"]
    assert list(v["validation"]) and set(v["validation"]) == set(ARMS[1:])
    md = (work / "validation.md").read_text()
    for name, c in v["validation"].items():
        assert (work / "seed1" / name / "checkpoint_best.pt").is_file() and c["best_update"][0] in (1, 2), name
        assert f"| {name} | {name} | (arm defaults) | 1 | {c['best_bleu_mean']:.2f} ± 0.00 | {c['best_update'][0]} |" in md, name
    assert "## The base, chosen on validation" in md and "Test BLEU" not in md and "test_2016_flickr" not in md
    return v["base"]["checkpoint"]


def check_rerun_with_base(cmd: list, work: Path, results: Path, base: str) -> None:
    """A second final phase is refused; with --reread-test, a re-run reuses every finished step, an evaluation
    whose JSON is gone is redone over its leftover hypotheses, --base skips the base's training and selection,
    and the report says the test was read again."""
    final = [*map(str, cmd), "--phase", "final", "--results", str(results)]
    again = subprocess.run(final, capture_output=True, text=True, timeout=300)
    assert again.returncode == 1 and "already read for mle_base, mle, mrt, soft_hamming, soft_risk" in again.stderr, again.stderr
    assert "--reread-test" in again.stderr and "evaluate.py" not in again.stdout

    (work / "seed1" / "mrt" / "test.eval.json").unlink()
    (work / "mle_base" / "run.json").unlink()
    out = run([*final, "--base", base, "--reread-test"], timeout=300)
    ran = [line for line in out.splitlines() if line.startswith("[bench] running:")]
    steps = [line for line in ran if "compare.py" not in line]
    assert len(steps) == 2 and "prepare-multi30k.sh" in steps[0] and "evaluate.py" in steps[1], steps
    # only the per-seed comparisons read the re-written mrt hypotheses; the pooled files did not change
    assert len(ran) - len(steps) == 4 and all("seed1.vs_" in line for line in ran if "compare.py" in line), ran
    assert "--overwrite" in steps[1] and str(work / "seed1" / "mrt" / "checkpoint_best.pt") in steps[1]
    assert out.count("reusing") == 4 + 4  # the arms' training; the evaluations of the base and three arms
    summary = json.loads(results.with_suffix(".json").read_text())
    assert summary["base"]["checkpoint"] == base and summary["base"]["reused"] is True and summary["base"]["selection"]["given"] == base
    assert summary["arms"]["mle_base"]["updates"] is None and summary["arms"]["mrt"]["sets"]["test_2017_mscoco"]["bleu_mean"] is not None
    md = results.read_text()
    assert "- base MLE: reused with --base" in md and "**The test sets were read 2 times in this work folder**" in md
    assert "read 2 (this report)" in md and "re-read with --reread-test: mle_base, mle, mrt, soft_hamming, soft_risk" in md

    missing = subprocess.run([*map(str, cmd), "--base", str(work / "nope.pt")], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and f"--base {work / 'nope.pt'}: no such checkpoint file or folder" in missing.stderr


@pytest.mark.slow
@pytest.mark.skipif(not RAW_DIR.is_dir(), reason=f"Multi30k raw files not found at {RAW_DIR}")
def test_bench_bleu_smoke(tmp_path):
    results = tmp_path / "out" / "results.md"
    cmd = bench_command(tmp_path)
    base = check_valid_phase(run(cmd, timeout=900), tmp_path / "work")
    out = run([*cmd, "--phase", "final", "--results", results], timeout=900)
    assert "wrote" in out

    summary = json.loads(results.with_suffix(".json").read_text())
    md = results.read_text()
    md_lines, out_lines = md.splitlines(), out.splitlines()
    assert {"command", "machine", "settings", "data", "bleu_signature", "chrf_signature", "arms", "targets"} <= set(summary)
    assert summary["bleu_signature"].startswith("nrefs:1") and "nc:" in summary["chrf_signature"]
    assert summary["data"]["train_pairs"] <= 300 and summary["base"]["reused"] is False and summary["base"]["checkpoint"] == base
    assert summary["targets"]["full_protocol"] is False and summary["compute_s"] > 0
    assert summary["arms"]["mrt"]["checkpoints"] == [str(tmp_path / "work" / "seed1" / "mrt" / "checkpoint_best.pt")]
    check_arms(summary, tmp_path, md_lines, out_lines)
    check_sets(summary, md)
    check_significance(summary, tmp_path / "work", md_lines)
    for needle in (
        "| arm |",
        "BLEU signature",
        "Reduced scale",
        "valid_bleu.png",
        "## Commands",
        "soft beam, hamming loss",
        "soft beam, risk loss",
        "MRT (risk loss, hard beam search)",
        "compute-matched",
        "## Significance",
        "The test sets were read once, by this final phase",
        "## Validation: every configuration (ablations)",
        "## The base, chosen on validation",
    ):
        assert needle in md, needle

    png = results.with_name("results_valid_bleu.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000

    check_rerun_with_base(cmd, tmp_path / "work", results, base)
