"""`megamath serve`'s HTTP layer as clients meet it, with a stand-in for generation: stop signals while a
connection is still sending its request or its answer is being generated, refusals of requests that carry a
large body, HEAD."""
from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from test_serve import raw_exchange

REPO = Path(__file__).resolve().parents[1]

SERVER_SCRIPT = """
import sys, time
from megamath.generation import server

def suggest(model, codec, config, tactic_state, *args, **kwargs):
    if tactic_state != "slow":
        return ["rfl"]
    print("generating", flush=True)
    time.sleep(50)
    return ["slow"]

def make_handler(*args, make_handler=server.make_handler):
    handler = make_handler(*args)
    setup, stop = handler.setup, handler.stop
    def announced_setup(self):
        setup(self)
        print("accepted", flush=True)
    def announced_stop():  # the first stop signal's work, done
        stop()
        print("stopping", flush=True)
    handler.setup, handler.stop = announced_setup, staticmethod(announced_stop)
    return handler

server.suggest, server.make_handler = suggest, make_handler
try:
    server.serve(None, None, server.ServeConfig(port=0, request_timeout_s=60.0), lambda host, port: print(port, flush=True))
except KeyboardInterrupt:  # as megamath.cli's main
    print("interrupted", flush=True)
    sys.exit(130)
print("stopped", flush=True)
"""


def start_server() -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-c", SERVER_SCRIPT], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    return proc, int(proc.stdout.readline())


def wait_for(proc: subprocess.Popen, line: str, timeout_s: float = 30.0) -> None:
    """Until the server prints `line` ("accepted": a connection is in hand; "generating"), however loaded the
    machine: a fixed sleep could signal it before, and test something else."""
    got = []
    reader = threading.Thread(target=lambda: got.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout_s)  # not select(): the buffered pipe may already hold the line
    assert got == [line + "\n"], f"the server did not print {line!r} in {timeout_s} s: {got}"


@pytest.mark.parametrize("sent, sig", [(b"", signal.SIGTERM),  # an idle connection (a browser's preconnect)
                                       (b"POST / HTTP/1.0\r\nContent-Length: 100\r\n\r\n{", signal.SIGINT)],
                         ids=["idle-sigterm", "part-of-a-body-sigint"])
def test_a_stop_signal_does_not_wait_for_a_request_still_being_sent(sent, sig):
    """The serve loop waited for the connection in hand to send its request: SIGTERM or Ctrl-C took the whole
    request timeout (60 s) to stop a server whose client was idle or slow."""
    proc, port = start_server()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
            conn.sendall(sent)
            wait_for(proc, "accepted")  # what was sent is read, and the rest waited for, before or after
            proc.send_signal(sig)
            out, err = proc.communicate(timeout=30)  # half the request timeout: not waited for
            reply = b""
            while chunk := conn.recv(1 << 16):
                reply += chunk
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0 and out.endswith("stopped\n"), (out, err)
    if sent:  # a request cut short is answered, and not with a timeout it did not have
        assert reply.startswith(b"HTTP/1.0 503") and b'{"error": "the server is stopping' in reply, reply
    else:
        assert reply == b""


def test_a_second_ctrl_c_does_not_wait_for_the_request_in_flight():
    """Ctrl-C lets the request in flight finish (up to the request timeout, 60 s); a second one was ignored."""
    proc, port = start_server()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
            conn.sendall(b'POST / HTTP/1.0\r\nContent-Length: 24\r\n\r\n{"tactic_state": "slow"}')
            wait_for(proc, "accepted")
            wait_for(proc, "generating")
            proc.send_signal(signal.SIGINT)
            wait_for(proc, "stopping")  # two before the handler runs would be one: a signal is a flag until then
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130 and out.endswith("interrupted\n"), (out, err)


@pytest.fixture
def stand_in_server(monkeypatch):
    from megamath.generation import server as server_module
    from megamath.generation.server import LLMStepServer, ServeConfig, make_handler

    monkeypatch.setattr(server_module, "suggest", lambda *args, **kwargs: ["rfl"])
    httpd = LLMStepServer(("127.0.0.1", 0), make_handler(None, None, ServeConfig(max_body_bytes=2000)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


def request(port: int, method: str, path: str = "/", body: bytes | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, body=body)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def test_a_refused_request_with_a_large_body_gets_its_answer(stand_in_server):
    """A wrong path or method was answered with the body unread: closing the socket reset the connection under
    a client still sending, which saw a broken pipe instead of the 404 or 405 (the 413 already read it)."""
    body = json.dumps({"tactic_state": "x" * (8 << 20)}).encode()
    for method, path, status, error in (("POST", "/other", 404, "unknown path /other"),
                                        ("PUT", "/", 405, "use POST / with a JSON body"),
                                        ("GET", "/", 405, "use POST / with a JSON body"),
                                        ("POST", "/", 413, f"body of {len(body)} bytes exceeds 2000")):
        assert request(stand_in_server, method, path, body)[::2] == (status, json.dumps({"error": error}).encode())
    assert request(stand_in_server, "POST", "/", b'{"tactic_state": "x"}')[::2] == (200, b'{"suggestions": ["rfl"]}')


def test_head_is_refused_like_get_without_a_body(stand_in_server):
    """HEAD got a bare 501 "Unsupported method" where every other method but POST gets a 405 naming POST."""
    status, headers, body = request(stand_in_server, "HEAD")
    assert (status, headers["Allow"], headers["Content-Type"], body) == (405, "POST", "application/json", b"")
    assert request(stand_in_server, "POST", "/", b'{"tactic_state": "x"}')[::2] == (200, b'{"suggestions": ["rfl"]}')


def test_each_answer_is_one_access_log_line_that_a_request_cannot_forge(stand_in_server, capsys):
    """No line told an operator who asked what and got what (LLMSTEP's server prints one per request)."""
    assert request(stand_in_server, "POST", "/", b'{"tactic_state": "x"}')[0] == 200
    for raw in (b"POST /a\x1b[2J\xffb HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}", b"GARBLED\r\n\r\n"):
        reply, _ = raw_exchange(stand_in_server, raw)  # a garbled request line gets HTTP/0.9's bare body
        assert b'{"error": ' in reply, reply
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3, lines
    assert re.fullmatch(r'127\.0\.0\.1 "POST /" 200: 1 suggestions \(\d+\.\d\d s\)', lines[0]), lines[0]
    escaped = "/a\\u001b[2J\\u00ffb"  # the terminal's escape sequence, and a byte that is not ASCII
    assert lines[1].startswith(f'127.0.0.1 "POST {escaped}" 404: unknown path {escaped} ('), lines[1]
    assert lines[2].startswith('127.0.0.1 "- -" 400: '), lines[2]


def test_a_closed_stdout_costs_no_error_line_and_no_answer(stand_in_server, monkeypatch, capsys):
    """`megamath serve | head -1` (the address read, the pipe closed): each access-log line raised BrokenPipeError
    after the answer was sent, and the server logged a failed request for every one."""
    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    for _ in range(2):
        status, _, body = request(stand_in_server, "POST", "/", b'{"tactic_state": "x"}')
        assert (status, body) == (200, b'{"suggestions": ["rfl"]}')
    assert capsys.readouterr().err == ""
