"""prepare's memory does not grow with the corpus: 10 MB and 100 MB peak within 20% of each other.

prepare itself peaks near 50 MB (it imports no torch): a corpus held whole would double that at 100 MB."""

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


# The child's own peak: VmHWM of the memory it maps after exec. Not its rusage: Linux keeps the
# high-water mark a forked child inherits from its parent (this test process, with torch loaded, about
# 250 MB) across exec, and that hid any difference between the two corpora.
_REPORT_PEAK = """
import atexit, os, runpy, sys
def report():
    with open("/proc/self/status") as status, open(os.environ["PEAK_FILE"], "w") as out:
        out.write(next(line for line in status if line.startswith("VmHWM:")).split()[1])
atexit.register(report)
sys.argv = ["kantai-batch", *sys.argv[1:]]
runpy.run_module("kantai_batch", run_name="__main__")
"""


def _peak_rss_kib(run_dir: Path, corpus: Path) -> int:
    """Peak resident memory of one `kantai-batch prepare` process."""
    peak_file = run_dir.with_name(run_dir.name + ".peak")
    command = [sys.executable, "-c", _REPORT_PEAK, "prepare", "--run-dir", str(run_dir), "--corpus", str(corpus)]
    env = {**os.environ, "PEAK_FILE": str(peak_file),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}  # fmt: skip
    done = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    return int(peak_file.read_text())


@pytest.mark.slow
def test_peak_memory_is_flat_from_10_to_100_mb(tmp_path: Path):
    small = tmp_path / "small.txt"
    _write_corpus(small, 10_000_000)
    large = tmp_path / "large"
    large.mkdir()
    # One file nine times the small one (a file read whole) and one more (a corpus held across files).
    _write_corpus(large / "part-1.txt", 90_000_000)
    _write_corpus(large / "part-2.txt", 10_000_000)
    assert sum(p.stat().st_size for p in large.iterdir()) > 100_000_000
    small_peak = _peak_rss_kib(tmp_path / "run-small", small)
    large_peak = _peak_rss_kib(tmp_path / "run-large", large)
    assert large_peak <= 1.2 * small_peak, f"peak RSS {small_peak:,} KiB at 10 MB, {large_peak:,} KiB at 100 MB"
    assert (tmp_path / "run-large" / "corpus" / "train.txt").stat().st_size > 80_000_000
