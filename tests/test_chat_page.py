"""`chat --serve`: the web page in a real headless Chromium, and its JSON endpoint's errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from helpers import ROOT, invoke

pytestmark = pytest.mark.slow

# The flags the machine's probe found necessary: no sandbox as root, and no background
# connections, which a closed network refuses many at a time.
_CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def page_url(support_run: Path) -> Iterator[str]:
    server = subprocess.Popen(
        [
            sys.executable, "-m", "kantai_batch", "chat", "--serve", "--port", "0",
            "--model", str(support_run / "model"), "--temperature", "0", "--max-new-tokens", "12",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        # This checkout's code, not the copy the environment has installed.
        env={**os.environ, "KANTAI_LOG_LEVEL": "error", "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        line = server.stdout.readline()
        match = re.search(r"on (http://127\.0\.0\.1:\d+/)$", line.strip())
        assert match, f"the server announces its address, got {line!r}"
        yield match.group(1)
    finally:
        server.terminate()
        server.wait(timeout=30)


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url + "api/generate", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_page_generates_in_a_headless_browser(page_url: str, support_run: Path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    browser_path = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser_path is None:
        pytest.skip("no Chromium on this machine (Debian: apt-get install chromium)")
    prompt = "my refund is missing what should i do"
    expected = json.loads(
        invoke(
            "generate", "--model", str(support_run / "model"), "--temperature", "0", "--max-new-tokens", "5",
            "--json", prompt,
        ).stdout
    )  # fmt: skip
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=browser_path, args=_CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(page_url)
            # The sampling settings show the command's defaults once the page has asked for them.
            sync_api.expect(page.locator("#temperature")).to_have_value("0")
            sync_api.expect(page.locator("#max_new_tokens")).to_have_value("12")
            page.fill("#prompt", prompt)
            page.fill("#max_new_tokens", "5")
            page.click("#generate")
            sync_api.expect(page.locator("#meta")).to_contain_text("new tokens", timeout=60_000)
            answer = page.locator("#answer").inner_text()
            meta = page.locator("#meta").inner_text()
        finally:
            browser.close()
    assert answer and expected["text"].endswith(answer), "the page answers as generate does"
    assert int(meta.split()[0]) == expected["new_tokens"] <= 5


def test_endpoint_answers_and_rejects_bad_settings(page_url: str):
    status, body = _post(page_url, {"prompt": "my card was charged twice", "max_new_tokens": 4})
    assert status == 200 and body["new_tokens"] <= 4 and body["text"].startswith("my card was charged twice <reply>")
    status, body = _post(page_url, {"prompt": "hello", "temperature": "warm"})
    assert status == 400 and "temperature must be a number" in body["error"]
    status, body = _post(page_url, {"prompt": "  "})
    assert status == 400 and "prompt is empty" in body["error"]
    status, body = _post(page_url, {"prompt": "hello", "top_p": 3})
    assert status == 400 and "top-p" in body["error"]
    for prompt in (None, 123, ["hello"]):
        status, body = _post(page_url, {"prompt": prompt})
        assert status == 400 and body["error"] == f"prompt must be a string, got {json.dumps(prompt)}"


@pytest.mark.parametrize(
    ("announced", "says"), [(b"-5", "Content-Length -5 is negative"), (b"abc", "Content-Length 'abc' is not a number")]
)
def test_a_content_length_that_is_no_length_is_refused_at_once(page_url: str, announced: bytes, says: str):
    host, port = urllib.parse.urlsplit(page_url).netloc.split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: " + announced + b"\r\n\r\n{}")
        # The server closes after its answer (HTTP/1.0); one waiting for the client to close would time out.
        reply = b"".join(iter(lambda: conn.recv(4096), b"")).decode()
    assert reply.startswith("HTTP/1.0 400") and says in reply


def test_the_page_and_its_defaults_answer_under_a_query(page_url: str):
    for path in ("?utm_source=mail", "index.html?v=2"):
        with urllib.request.urlopen(page_url + path, timeout=30) as response:
            assert response.status == 200 and b"<html" in response.read().lower()
    with urllib.request.urlopen(page_url + "api/defaults?x=1", timeout=30) as response:
        assert "temperature" in json.loads(response.read())


def test_bad_bodies_get_a_status_and_one_line(page_url: str):
    host, port = urllib.parse.urlsplit(page_url).netloc.split(":")

    def raw(body: bytes) -> str:
        with socket.create_connection((host, int(port)), timeout=60) as conn:
            conn.sendall(b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            return b"".join(iter(lambda: conn.recv(4096), b"")).decode()

    # Half a character: JSON can escape it, the tokenizer cannot take it.
    reply = raw(b'{"prompt": "my order \\ud800"}')
    assert reply.startswith("HTTP/1.0 400") and "the prompt holds half a character (a lone surrogate" in reply
    # Nested past the JSON parser's recursion: a 400, not a dropped connection.
    reply = raw(b"[" * 60_000)
    assert reply.startswith("HTTP/1.0 400") and "nests too deep" in reply


def test_a_body_shorter_than_announced_times_out_with_a_status(monkeypatch: pytest.MonkeyPatch):
    import threading

    from kantai_batch import chat
    from kantai_batch.job import Sampling

    monkeypatch.setattr(chat, "_READ_TIMEOUT_S", 1)
    with chat.bind("127.0.0.1", 0) as server:
        server.RequestHandlerClass = chat._handler(generator=None, defaults=Sampling())
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            with socket.create_connection(server.server_address[:2], timeout=30) as conn:
                conn.sendall(b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
                reply = b"".join(iter(lambda: conn.recv(4096), b"")).decode()
        finally:
            server.shutdown()
    assert reply.startswith("HTTP/1.0 408") and "no request body in 1 s" in reply


_SERVE_STUB = """
import sys
from types import SimpleNamespace
from kantai_batch.chat import bind, serve_page
from kantai_batch.job import Sampling
with bind("127.0.0.1", 0) as server:
    serve_page(server, SimpleNamespace(model_dir="stub", answers=False), Sampling(), announce=sys.stdout)
"""


@pytest.mark.parametrize("pid1_handler", [False, True], ids=["plain", "as-pid-1"])
def test_sigterm_stops_the_page_cleanly_with_exit_0(pid1_handler: bool):
    import signal

    # As the image's PID 1, cli installs a SIGTERM handler exiting 143; serve_page must take over from it.
    prelude = "import signal, sys; signal.signal(signal.SIGTERM, lambda s, f: sys.exit(143))\n" if pid1_handler else ""
    server = subprocess.Popen(
        [sys.executable, "-c", prelude + _SERVE_STUB],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},  # this checkout's code, not an installed copy
    )
    try:
        assert "serving stub on http://127.0.0.1:" in server.stdout.readline()
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0, server.stderr.read()
    finally:
        if server.poll() is None:
            server.kill()


def test_a_line_of_another_encoding_ends_its_turn_not_the_session():
    import io

    from kantai_batch.chat import repl
    from kantai_batch.errors import InputDataError
    from kantai_batch.generate import Generation
    from kantai_batch.job import Sampling

    class Echo:
        model_dir = "stub"

        def __call__(self, prompt: str, sampling: Sampling) -> Generation:
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError:
                raise InputDataError("the prompt holds half a character") from None
            return Generation(prompt=prompt, texts=[prompt], continuations=[f"re: {prompt}"], new_tokens=[1])

    # sys.stdin under a UTF-8 locale (other than C or POSIX) decodes strictly.
    stdin = io.TextIOWrapper(io.BytesIO(b"hello\ncaf\xe9 order\nbye\n"), encoding="utf-8", errors="strict")
    stdout = io.StringIO()
    repl(Echo(), Sampling(), stdin=stdin, stdout=stdout)
    assert stdout.getvalue().splitlines() == ["re: hello", "error: the prompt holds half a character", "re: bye"]


def test_a_client_gone_before_its_answer_costs_no_traceback(capsys: pytest.CaptureFixture):
    """A page closed (or reloaded) while its answer was generated: writing the answer met a reset
    connection, and socketserver printed "Exception occurred during processing of request" and a
    traceback, for what is an everyday event on a chat page."""
    import struct
    import threading
    import time

    from kantai_batch import chat
    from kantai_batch.job import Sampling

    def slow(prompt: str, sampling: Sampling) -> SimpleNamespace:
        time.sleep(0.5)  # the client leaves meanwhile
        return SimpleNamespace(prompt=prompt, texts=[prompt + " ok"], continuations=[" ok"], new_tokens=[1])

    with chat.bind("127.0.0.1", 0) as server:
        server.RequestHandlerClass = chat._handler(generator=slow, defaults=Sampling())
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            body = b'{"prompt": "hello"}'
            request = b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            with socket.create_connection(server.server_address[:2], timeout=30) as conn:
                conn.sendall(request)
                # Closed with a reset, as a browser tab that goes away may: the server's write fails.
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            time.sleep(1.5)
            with socket.create_connection(server.server_address[:2], timeout=30) as conn:
                conn.sendall(request)
                reply = b"".join(iter(lambda: conn.recv(4096), b"")).decode()
        finally:
            server.shutdown()
    assert reply.startswith("HTTP/1.0 200") and '"answer": " ok"' in reply, "the page still serves"
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr and "Exception occurred" not in stderr, stderr
