"""prepare's memory does not grow with the corpus: 50 MB and 500 MB peak within 20% of each other."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT, kantian_text


def _write_corpus(path: Path, size: int) -> None:
    block = kantian_text(3000).replace("\n", "\r\n").encode("cp1252")
    with path.open("wb") as out:
        for index in range(size // len(block) + 1):
            out.write(f"Block {index}.\r\n\r\n".encode() + block)


def _peak_rss_kib(run_dir: Path, corpus: Path) -> int:
    """Peak resident memory of one `kantai-batch prepare` process (its own rusage, not the test's)."""
    command = [sys.executable, "-m", "kantai_batch", "prepare", "--run-dir", str(run_dir), "--corpus", str(corpus)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    assert process.returncode == 0, stderr.decode(errors="replace")[-2000:]
    return usage.ru_maxrss


@pytest.mark.slow
def test_peak_memory_is_flat_from_50_to_500_mb(tmp_path: Path):
    small = tmp_path / "small.txt"
    _write_corpus(small, 50_000_000)
    large = tmp_path / "large"
    large.mkdir()
    for part in range(10):
        _write_corpus(large / f"part-{part:02d}.txt", 50_000_000)
    assert sum(p.stat().st_size for p in large.iterdir()) > 500_000_000
    small_peak = _peak_rss_kib(tmp_path / "run-small", small)
    large_peak = _peak_rss_kib(tmp_path / "run-large", large)
    assert large_peak <= 1.2 * small_peak, f"peak RSS {small_peak:,} KiB at 50 MB, {large_peak:,} KiB at 500 MB"
    assert (tmp_path / "run-large" / "corpus" / "train.txt").stat().st_size > 400_000_000
