"""chat: a trained causal LM behind a terminal session or a small web page.

Each prompt is answered on its own: the models are trained on single exchanges (a tweet, or a
customer tweet and its reply), so feeding them a growing transcript would only push them off the
text they know.

The web page is a single HTML file and a JSON endpoint served by the standard library: no web
framework to install in the training image, and nothing to keep in step with one. It binds to
loopback by default; it is a demo and review tool, not a production inference server.
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any, TextIO
from urllib.parse import urlsplit

from kantai_batch.errors import JobConfigError, KantaiError, first_line
from kantai_batch.generate import Generator
from kantai_batch.job import Sampling

log = logging.getLogger(__name__)

_PROMPT = "you> "
_MAX_BODY_BYTES = 64 << 10
_READ_TIMEOUT_S = 30
# The settings the page shows and sends; it answers with one reply, so it has no count.
_PAGE_SETTINGS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed")


def repl(generator: Generator, sampling: Sampling, *, stdin: TextIO, stdout: TextIO) -> None:
    """Read a prompt per line and print the answer, until end of input (Ctrl-D)."""
    interactive = stdin.isatty()
    if hasattr(stdin, "reconfigure"):
        # Under a UTF-8 locale Python reads stdin strictly: one byte of another encoding (a Latin-1 line
        # piped in) raised out of readline and ended the session. Escaped, it is that prompt's error.
        stdin.reconfigure(errors="surrogateescape")
    if interactive:
        stdout.write(f"chatting with {generator.model_dir}; Ctrl-D leaves.\n")
    while True:
        if interactive:
            stdout.write(_PROMPT)
            stdout.flush()
        line = stdin.readline()
        if not line:
            if interactive:
                stdout.write("\n")
            return
        prompt = line.strip()
        if not prompt:
            continue
        try:
            generation = generator(prompt, sampling)
        except KantaiError as exc:
            # A prompt too long for the model ends that turn, not the session.
            stdout.write(f"error: {exc}\n")
        else:
            answer = generation.continuations[0]
            # Piped, each answer is one line: a line break the model sampled (a byte-level vocabulary has
            # them) would read as the next prompt's answer.
            stdout.write((answer if interactive else " ".join(answer.splitlines())) + "\n")
        stdout.flush()


class _PageServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        # A page closed or reloaded while its answer was generated: socketserver printed a traceback
        # for what is an everyday event on a chat page.
        if isinstance(sys.exc_info()[1], ConnectionError):
            log.debug("chat: %s left before its answer was sent", client_address[0])
            return
        super().handle_error(request, client_address)


def bind(host: str, port: int) -> ThreadingHTTPServer:
    """The page's socket, bound before the model loads, so a port in use fails at once and by name.

    Closing it is the caller's (``with bind(...) as server``)."""
    try:
        return _PageServer((host, port), BaseHTTPRequestHandler)
    except socket.gaierror as exc:  # a --host no resolver knows: the command's to fix, unlike a port in use
        raise JobConfigError(f"chat --host {host}: {exc.strerror or first_line(exc)}") from None
    except OSError as exc:
        raise KantaiError(f"chat cannot serve on {host}:{port}: {exc.strerror or first_line(exc)}") from None


def serve_page(server: ThreadingHTTPServer, generator: Generator, sampling: Sampling, *, announce: TextIO) -> None:
    """Serve the chat page on ``server`` until interrupted (Ctrl-C or SIGTERM ends it cleanly)."""
    server.RequestHandlerClass = _handler(generator, sampling)
    host, port = server.server_address[:2]
    url = f"http://{host}:{port}/"
    # SIGTERM (a service manager's stop, a pod's deletion) ends it as Ctrl-C does, exit 0: the default
    # ended the process by the signal (143), and as PID 1 the image's handler exited 143. Installed
    # before the address is announced, since whoever reads it may stop the page at once.
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main else None
    try:
        announce.write(f"serving {generator.model_dir} on {url}\n")
        announce.flush()
        log.info("chat: serving on %s (Ctrl-C stops)", url)
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _handler(generator: Generator, defaults: Sampling) -> type[BaseHTTPRequestHandler]:
    page = resources.files("kantai_batch").joinpath("chat.html").read_text(encoding="utf-8")
    # One generation at a time: the model is shared, and a CPU has no spare cores for a second one.
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        # A client that announces more body than it sends would hold its thread forever.
        timeout = _READ_TIMEOUT_S

        def do_GET(self) -> None:
            path = urlsplit(self.path).path  # a query (?utm_source=..., a cache buster) names the same page
            if path == "/api/defaults":
                self._send_json(HTTPStatus.OK, {**_sampling_json(defaults), "answers": generator.answers})
            elif path in ("/", "/index.html"):
                self._send(HTTPStatus.OK, page.encode("utf-8"), "text/html; charset=utf-8")
            else:
                self._send_json(HTTPStatus.NOT_FOUND, {"error": f"no page {self.path}"})

        def do_POST(self) -> None:
            if self.path != "/api/generate":
                self._send_json(HTTPStatus.NOT_FOUND, {"error": f"no endpoint {self.path}"})
                return
            try:
                request = self._read_json()
                sampling = _sampling_from(request, defaults)
                prompt = request.get("prompt", "")
                if not isinstance(prompt, str):
                    raise ValueError(f"prompt must be a string, got {json.dumps(prompt)}")
                with lock:
                    generation = generator(prompt, sampling)
            except (KantaiError, ValueError, TypeError) as exc:
                self._send_json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
                return
            except TimeoutError:
                self._send_json(HTTPStatus.REQUEST_TIMEOUT, {"error": f"no request body in {_READ_TIMEOUT_S} s"})
                return
            except Exception as exc:  # noqa: BLE001 - the page gets a status and a line, the log the traceback
                log.exception("chat: generation failed")
                self._send_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"generation failed: {first_line(exc)}"})
                return
            self._send_json(
                HTTPStatus.OK,
                {
                    "prompt": generation.prompt,
                    "text": generation.texts[0],
                    "answer": generation.continuations[0],
                    "new_tokens": generation.new_tokens[0],
                },
            )

        def _read_json(self) -> dict[str, Any]:
            announced = self.headers.get("Content-Length") or "0"
            try:
                length = int(announced)
            except ValueError:
                raise ValueError(f"Content-Length {announced!r} is not a number of bytes") from None
            if length < 0:  # read(-1) would wait for the client to close the connection
                raise ValueError(f"Content-Length {length} is negative")
            if length > _MAX_BODY_BYTES:
                raise ValueError(f"request body over {_MAX_BODY_BYTES} bytes")
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except RecursionError:
                raise ValueError("the request nests too deep to be a prompt's JSON object") from None
            if not isinstance(body, dict):
                raise ValueError("the request must be a JSON object")
            return body

        def _send_json(self, status: HTTPStatus, body: dict[str, Any]) -> None:
            self._send(status, json.dumps(body, ensure_ascii=False).encode("utf-8"), "application/json")

        def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            log.debug("chat: %s %s", self.address_string(), format % args)

    return Handler


def _sampling_json(sampling: Sampling) -> dict[str, Any]:
    return sampling.model_dump(include=set(_PAGE_SETTINGS))


def _sampling_from(request: dict[str, Any], defaults: Sampling) -> Sampling:
    """The page's settings over the command's defaults; an empty field keeps the default."""
    return defaults.with_overrides(**{name: request.get(name) for name in _PAGE_SETTINGS})
