"""`make gpu-check` runs only when a GPU is lent, for minutes it cannot get back: its dry run (the same
plumbing, a tiny model on any machine) must keep working here."""

from __future__ import annotations

import gzip
import json
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT

# What the GPU machine's image lacks and gpu_wheels.py leaves out of the carried set (see ROOTS there).
NOT_ON_THE_DEVICE = ("mlflow", "boto3", "botocore", "s3transfer")


def device_like_python(where: Path) -> str:
    """A Python with this one's packages but without those the device lacks (and without this package
    installed: the check runs it from the checkout), so a module-level import of one of them fails here
    rather than in the device minutes."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    python = str(where / "bin" / "python")
    asked = [python, "-c", "import site; print(site.getsitepackages()[0])"]
    packages = Path(subprocess.check_output(asked, text=True).strip())
    for entry in Path(site.getsitepackages()[0]).iterdir():
        name = entry.name.lower().replace("-", "_")
        if not name.startswith((*NOT_ON_THE_DEVICE, "kantai", "__editable__")):
            (packages / entry.name).symlink_to(entry)
    for missing in NOT_ON_THE_DEVICE:
        found = subprocess.run([python, "-c", f"import {missing}"], capture_output=True)
        assert found.returncode != 0, f"{missing} is still importable"
    return python


@pytest.mark.slow
def test_gpu_check_dry_run_keeps_each_record_and_the_profile(tmp_path: Path):
    out, results = tmp_path / "out", tmp_path / "results"
    out.mkdir()
    python = device_like_python(tmp_path / "venv")
    done = subprocess.run(
        [python, "bench/gpu_check.py", "--dry-run", "--out", str(results), "--scratch", str(tmp_path / "s")],
        cwd=ROOT, env={**os.environ, "OUT": str(out), "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split() for line in done.stdout.splitlines() if line.split()[:1] in (["b128"], ["profile"])]
    assert [row[0] for row in rows] == ["b128", "profile"] * 2, "each row as it ends, then the table"
    assert "profile: 1 steps profiled" in done.stdout and "% of that in matmuls" in done.stdout
    records = sorted(out.glob("kantaibert-*.json"))
    assert len(records) == 2 and {r.name for r in records} == {r.name for r in results.glob("*.json")}
    profiled = json.loads(records[1].read_text())["results"][0]["profile"]
    assert profiled["steps"] == 1 and profiled["top_ops"]
    trace = json.loads(gzip.decompress((out / "profile-trace-rank0.json.gz").read_bytes()))
    assert any(event.get("name") == "ProfilerStep#5" for event in trace["traceEvents"])


def test_gpu_check_keeps_a_scratch_folder_it_did_not_make_and_bad_steps_fail_at_once(tmp_path: Path):
    mine = tmp_path / "results-of-mine"
    mine.mkdir()
    (mine / "important.json").write_text("{}")
    for args, message in (
        (["--scratch", str(mine)], f"--scratch {mine} holds files this script did not make"),
        (["--steps", "1"], "argument --steps: must be at least 2, got 1"),
    ):
        done = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry-run", *args], cwd=ROOT,
                              capture_output=True, text=True)  # fmt: skip
        assert done.returncode == 2 and message in done.stderr, done.stderr
    assert (mine / "important.json").read_text() == "{}"


@pytest.mark.slow
def test_gpu_check_skips_what_would_end_past_its_budget_and_logs_to_out(tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    done = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--dry-run", "--budget-s", "1", "--out", str(tmp_path / "results"),
         "--scratch", str(tmp_path / "s")],
        cwd=ROOT, env={**os.environ, "OUT": str(out), "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    log = (out / "gpu-check.log").read_text()
    # The first configuration always runs; the next would end past 1 s.
    assert log.splitlines()[0].split()[0] == "b128" and " s, at " in log.splitlines()[0]
    assert "gpu-check: profile skipped at " in log and "past the 1 s budget" in log
    assert len(list(out.glob("kantaibert-*.json"))) == 1
    assert "it/s]" not in done.stderr and "examples/s]" not in done.stderr, "no progress bars in the tail"


def test_gpu_check_names_what_the_device_image_brings_below_the_packages_floor(tmp_path: Path):
    """The device's own transformers and accelerate are not checked by pip (the package is not installed
    there): one older than the declared floor is a warning line before the figures."""
    import importlib.util
    from importlib.metadata import version

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    assert gpu_check.below_floor() == [], "this machine has what the package declares"
    installed = version("transformers")
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        '[project]\ndependencies = ["transformers>=99.0", "accelerate>=0.1", "not-installed-here>=1"]\n'
    )
    assert gpu_check.below_floor(pyproject) == [
        f"gpu-check: warning: transformers {installed} here, the package needs >=99.0"
    ]
