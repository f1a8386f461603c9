"""Build the wheels a bare GPU machine lacks for `make gpu-check` (CPython 3.12, manylinux x86_64).

The GPU image has torch, transformers, accelerate and tokenizers (and what they depend on); this
collects every other package the check imports, with the dependencies the image lacks, as binary
wheels for the target, pinned to the versions installed here (so the check runs what the tests here
ran). DeepSpeed publishes only a source archive: it is built here into a pure-Python wheel (its CUDA
ops compile just in time where they run). MLflow and boto3 are left out: the check trains without
tracking on a local run dir, and their dependencies alone would not fit the limit.

    python bench/gpu_wheels.py --out .whl [--limit-mib 60]

The set is installable without an index: pip install --no-index --no-deps --target DIR .whl/*.whl

A device call carries at most 64 MiB. When the set is larger (pyarrow alone is 48 MiB) it is split
into parts that each fit, .whl/1/, .whl/2/, ...: carry and install one part per call on the same warm
machine (the --target folder stays between calls), then run the check.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import os
import re
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

# What the check imports beyond the image (the package's runtime dependencies without mlflow and
# boto3, which only S3 run dirs import, and the test runner for the gpu-marked tests).
ROOTS = (
    "datasets",
    "pydantic",
    "click",
    "charset-normalizer",
    "deepspeed",
    "fsspec",  # datasets caps its version; the image's may be newer
    "pytest",
    "pytest-timeout",
)
IMAGE = ("torch", "transformers", "accelerate", "tokenizers")
# Also in the device image (its package list), and large: carried, it would split the set in two calls.
ALSO_IN_IMAGE = ("pandas",)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
TARGET = {
    **default_environment(),
    **dict(python_version="3.12", python_full_version="3.12.0", implementation_name="cpython"),
    **dict(platform_python_implementation="CPython", sys_platform="linux", platform_system="Linux"),
    **dict(platform_machine="x86_64", os_name="posix"),
}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wanted(requirement: Requirement) -> bool:
    return requirement.marker is None or requirement.marker.evaluate({**TARGET, "extra": ""})


def image_packages() -> set[str]:
    """The image's packages: the closure of IMAGE's requirements, as installed here."""
    seen: set[str] = {normalize(name) for name in ALSO_IN_IMAGE}
    roots = {normalize(name) for name in ROOTS}
    queue = list(IMAGE)
    while queue:
        name = normalize(queue.pop())
        # The image is known to lack the roots (a newer typer here requires pydantic; the image's not).
        if name in seen or name in roots:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue  # e.g. CUDA libraries a CPU torch does not list: the image has them anyway
        queue += [req.name for req in map(Requirement, requires) if wanted(req)]
    return seen


def fetch(name: str, out: Path) -> Path:
    """The target wheel of ``name`` at the version installed here (latest when not installed)."""
    try:
        pin = f"{name}=={metadata.version(name)}"
    except metadata.PackageNotFoundError:
        pin = name
    before = set(out.glob("*.whl"))
    if normalize(name) == "deepspeed":
        env = {**os.environ, "DS_BUILD_OPS": "0"}
        command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), pin]
    else:
        env = dict(os.environ)
        target = ["--python-version", "3.12", "--implementation", "cp", *(f"--platform={p}" for p in PLATFORMS)]
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", *target]
        command += ["-d", str(out), pin]
    subprocess.run([*command, "--quiet", "--disable-pip-version-check"], check=True, env=env)
    new = set(out.glob("*.whl")) - before
    matches = new or {p for p in out.glob("*.whl") if normalize(p.name.split("-")[0]) == normalize(name)}
    if not matches:
        raise SystemExit(f"gpu-wheels: no wheel for {pin} in {out}")
    return sorted(matches)[0]


def requirements_of(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        meta = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        headers = Parser().parsestr(archive.read(meta).decode("utf-8"))
    return [req.name for req in map(Requirement, headers.get_all("Requires-Dist") or []) if wanted(req)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(".whl"))
    parser.add_argument("--limit-mib", type=float, default=60.0, help="Largest part to carry in one call.")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    image = image_packages()
    done: dict[str, Path] = {}
    queue = list(ROOTS)
    while queue:
        name = normalize(queue.pop(0))
        if name in done or name in image:
            continue
        done[name] = fetch(name, args.out)
        queue += requirements_of(done[name])
    for path in set(args.out.rglob("*.whl")) - set(done.values()):
        path.unlink()
    sizes = sorted(((p.stat().st_size, p) for p in done.values()), reverse=True)
    total = sum(size for size, _ in sizes)
    limit = args.limit_mib * 2**20
    parts = split(sizes, limit)
    if len(parts) > 1:
        for number, part in enumerate(parts, start=1):
            (args.out / str(number)).mkdir(exist_ok=True)
            for _, path in part:
                path.rename(args.out / str(number) / path.name)
    for number, part in enumerate(parts, start=1):
        where = args.out / str(number) if len(parts) > 1 else args.out
        for size, path in part:
            print(f"{size / 2**20:7.2f} MiB  {where / path.name}")
    print(f"{total / 2**20:7.2f} MiB in {len(sizes)} wheels, {len(parts)} part(s) of at most {args.limit_mib:g} MiB "
          f"in {args.out} (the image provides {', '.join(IMAGE)} and their dependencies)")  # fmt: skip


def split(sizes: list[tuple[int, Path]], limit: float) -> list[list[tuple[int, Path]]]:
    """First-fit decreasing: as few parts as fit under ``limit`` each."""
    parts: list[list[tuple[int, Path]]] = []
    for size, path in sizes:
        if size > limit:
            raise SystemExit(f"gpu-wheels: {path.name} alone is {size / 2**20:.1f} MiB, over the limit")
        part = next((p for p in parts if sum(s for s, _ in p) + size <= limit), None)
        if part is None:
            parts.append(part := [])
        part.append((size, path))
    return parts


if __name__ == "__main__":
    main()
