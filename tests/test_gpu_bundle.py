"""scripts/gpu_bundle.sh --check-only and scripts/gpu_device_run.sh --dry-run on fake bundles: the
requirement closure names what neither the bundle nor the device provides, a missing carried piece is named,
and the device run's part limits fit its budget. No network, no build: seconds."""

import io
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUNDLE_SCRIPT = ROOT / "scripts" / "gpu_bundle.sh"
RUN_SCRIPT = ROOT / "scripts" / "gpu_device_run.sh"
RAW_FILES = ["train.en.gz", "train.de.gz", "val.en.gz", "val.de.gz", "test_2016_flickr.en.gz", "test_2016_flickr.de.gz"]
# name, version, Requires-Dist: what the real bundle holds, as far as the closure check reads it
WHEELS = {
    "hydra_core": ("hydra-core", "1.3.2", ["omegaconf (<2.4,>=2.2)", "antlr4-python3-runtime (==4.9.*)", "packaging"]),
    "omegaconf": ("omegaconf", "2.3.0", ["antlr4-python3-runtime (==4.9.*)", "PyYAML (>=5.1.0)", 'dataclasses ; python_version == "3.6"']),
    "antlr4_python3_runtime": ("antlr4-python3-runtime", "4.9.3", ['typing; python_version < "3.5"']),
    "bitarray": ("bitarray", "3.12.3", []),
    "cffi": ("cffi", "2.1.1", ['pycparser; implementation_name != "PyPy"']),
    "pycparser": ("pycparser", "3.12", []),
}
FAIRSEQ_REQUIRES = ["cffi", "cython", "hydra-core==1.3.2", "omegaconf==2.3.0", "numpy>=1.21.3", "regex", "torchaudio>=0.8.0",
                    "bitarray", 'pytest; extra == "dev"']  # fmt: skip


def write_wheel(folder: Path, stem: str, name: str, version: str, requires: list[str]) -> None:
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(folder / f"{stem}-{version}-py3-none-any.whl", "w") as z:
        z.writestr(f"{stem}-{version}.dist-info/METADATA", meta)


def fake_bundle(dest: Path, wheels=WHEELS) -> Path:
    """A bundle as gpu_bundle.sh leaves it, with empty data files and an sdist holding only PKG-INFO."""
    for sub in ("whl", "sdist", "multi30k"):
        (dest / sub).mkdir(parents=True, exist_ok=True)
    for stem, (name, version, requires) in wheels.items():
        write_wheel(dest / "whl", stem, name, version, requires)
    info = (
        "Metadata-Version: 2.1\nName: fairseq-fixed\nVersion: 0.12.3.1\n" + "".join(f"Requires-Dist: {r}\n" for r in FAIRSEQ_REQUIRES)
    ).encode()
    with tarfile.open(dest / "sdist" / "fairseq_fixed-0.12.3.1.tar.gz", "w:gz") as t:
        member = tarfile.TarInfo("fairseq_fixed-0.12.3.1/PKG-INFO")
        member.size = len(info)
        t.addfile(member, io.BytesIO(info))
    for f in RAW_FILES:
        (dest / "multi30k" / f).write_bytes(b"")
    return dest


def check_only(dest: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run(
        ["bash", str(BUNDLE_SCRIPT), "--check-only", "--dest", str(dest)], capture_output=True, text=True, env=env, timeout=60
    )


def dry_run(bundle: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_LIMIT_S_")}
    cmd = ["bash", str(RUN_SCRIPT), "--dry-run", "--bundle", str(bundle), "--out", str(out), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)


def test_bundle_check_accepts_the_closure_and_lists_what_the_device_provides(tmp_path):
    proc = check_only(fake_bundle(tmp_path / "bundle"))
    assert proc.returncode == 0, proc.stderr
    needs = (tmp_path / "bundle" / "device_needs.txt").read_text().split()
    # from fairseq's and setup.cfg's requirements; the bundled ones are not expected on the device
    assert {"torch", "torchaudio", "pyyaml", "cython", "sacrebleu", "sentencepiece"} <= set(needs)
    assert not {"hydra-core", "omegaconf", "cffi", "pycparser", "pytest"} & set(needs)


def test_bundle_check_names_a_requirement_neither_bundled_nor_on_the_device(tmp_path):
    wheels = dict(WHEELS, cffi=("cffi", "2.1.1", ["pycparser", "not-on-the-device>=1"]))
    proc = check_only(fake_bundle(tmp_path / "bundle", wheels))
    assert proc.returncode != 0
    assert "not-on-the-device (required by cffi" in proc.stderr


def test_bundle_check_names_a_missing_wheel_that_fairseq_needs(tmp_path):
    wheels = {k: v for k, v in WHEELS.items() if k != "bitarray"}
    proc = check_only(fake_bundle(tmp_path / "bundle", wheels))
    assert proc.returncode != 0
    assert re.search(r"bitarray \(required by .*fairseq-fixed", proc.stderr), proc.stderr


def test_bundle_check_refuses_a_bundled_version_outside_a_specifier(tmp_path):
    wheels = dict(WHEELS, omegaconf=("omegaconf", "2.4.0", WHEELS["omegaconf"][2]))
    proc = check_only(fake_bundle(tmp_path / "bundle", wheels))
    assert proc.returncode != 0
    assert "omegaconf 2.4.0 (bundled) does not meet" in proc.stderr


def test_dry_run_prints_the_device_commands_and_runs_nothing(tmp_path):
    bundle = fake_bundle(tmp_path / "bundle")
    proc = dry_run(bundle, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    install = next(line for line in lines if "--target" in line and ".whl" in line)
    assert all(str(w) in install for w in (bundle / "whl").glob("*.whl"))
    assert any("--no-build-isolation" in line and "fairseq_fixed-0.12.3.1" in line for line in lines)
    check = next(line for line in lines if "gpu_check.sh" in line)
    assert f"--device cuda --raw-dir {bundle}/multi30k --out {tmp_path}/out" in check
    assert not (tmp_path / "out").exists()


def test_dry_run_part_limits_fit_the_budget(tmp_path):
    proc = dry_run(fake_bundle(tmp_path / "bundle"), tmp_path / "out", "--budget-s", "400", "--build-limit-s", "100")
    assert proc.returncode == 0, proc.stderr
    limits = {m[0]: int(m[1]) for m in re.findall(r"export GPU_CHECK_LIMIT_S_(\w+)=(\d+)", proc.stderr)}
    assert set(limits) == {"PYTEST", "TOPK", "SETUP", "TRAIN", "GENERATE", "SYNCS"}
    # 400 s less the build's limit, the install (15 s) and the report (20 s)
    assert sum(limits.values()) <= 400 - 100 - 15 - 20
    assert limits["SETUP"] > limits["SYNCS"]  # scaled, each in proportion to gpu_check.sh's default


@pytest.mark.parametrize("piece", ["sdist/fairseq_fixed-0.12.3.1.tar.gz", "multi30k/val.de.gz", "whl"])
def test_dry_run_names_a_piece_that_was_not_carried(tmp_path, piece):
    bundle = fake_bundle(tmp_path / "bundle")
    if piece == "whl":
        for w in (bundle / "whl").glob("*.whl"):
            w.unlink()
    else:
        (bundle / piece).unlink()
    proc = dry_run(bundle, tmp_path / "out")
    assert proc.returncode == 2
    assert "not carried:" in proc.stderr and f"{bundle}/{piece}" in proc.stderr
