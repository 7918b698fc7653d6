"""`megamath serve` on the network: IPv6 and host names for --host, a bad host as one line, and a client that
leaves while its suggestions are being generated (gave up, timed out, was killed): the server must stop
decoding for it, not keep the one model, and every client behind it, busy until the request timeout."""
from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest
import torch

from megamath.cli import main
from megamath.generation import server as server_module
from megamath.generation.server import LLMStepServer, ServeConfig, listen, make_handler


def ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


needs_ipv6 = pytest.mark.skipif(not ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")


def post(host: str, port: int, body: bytes, timeout: float = 30) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST", "/", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def serving(httpd: LLMStepServer, config: ServeConfig, model=None, codec=None) -> threading.Thread:
    httpd.RequestHandlerClass = make_handler(model, codec, config)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    return thread


def stop(httpd: LLMStepServer) -> None:
    httpd.shutdown()
    httpd.server_close()


@needs_ipv6
def test_serve_on_ipv6_loopback_answers_a_real_request(tmp_path, monkeypatch, capsys):
    """`--host ::1` failed with "Address family for hostname not supported": the server was IPv4 only."""
    from megamath.generation import session

    monkeypatch.setattr(session, "open_model", lambda *args, **kwargs: (None, None, None))
    monkeypatch.setattr(server_module, "suggest", lambda *args, **kwargs: ["rfl"])
    seen = {}

    def fake_serve(model, codec, config, ready, httpd):  # the real socket, bound by the command; no signals
        serving(httpd, config)
        try:
            ready(*httpd.server_address[:2])
            seen["family"], seen["port"] = httpd.socket.family, httpd.server_address[1]
            seen["reply"] = post("::1", seen["port"], b'{"tactic_state": "x"}')
        finally:
            stop(httpd)

    monkeypatch.setattr(server_module, "serve", fake_serve)
    assert main(["serve", "--model", str(tmp_path), "--tokenizer-model", str(tmp_path / "t.model"),
                 "--host", "::1", "--port", "0"]) == 0
    assert seen["family"] == socket.AF_INET6 and seen["reply"] == (200, {"suggestions": ["rfl"]})
    assert f"listening on http://[::1]:{seen['port']}/ " in capsys.readouterr().out


@needs_ipv6
@pytest.mark.parametrize("host", ["::1", "[::1]"])
def test_an_ipv6_address_binds_an_ipv6_socket(host):
    httpd = listen(ServeConfig(host=host, port=0))
    try:
        assert httpd.socket.family == socket.AF_INET6 and httpd.server_address[0] == "::1"
    finally:
        httpd.server_close()


@needs_ipv6
def test_the_ipv6_wildcard_takes_ipv4_clients_too_where_the_os_allows(monkeypatch):
    monkeypatch.setattr(server_module, "suggest", lambda *args, **kwargs: ["rfl"])
    httpd = listen(ServeConfig(host="::", port=0))
    if httpd.socket.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY):
        httpd.server_close()
        pytest.skip("this OS keeps IPv6 sockets IPv6-only")
    serving(httpd, ServeConfig())
    try:
        for client in ("::1", "127.0.0.1"):
            assert post(client, httpd.server_address[1], b'{"tactic_state": "x"}') == (200, {"suggestions": ["rfl"]})
    finally:
        stop(httpd)


def test_a_host_name_binds_and_serves(monkeypatch):
    """A name resolving to both families binds its IPv4 address, as before: `localhost` stays 127.0.0.1."""
    monkeypatch.setattr(server_module, "suggest", lambda *args, **kwargs: ["rfl"])
    httpd = listen(ServeConfig(host="localhost", port=0))
    serving(httpd, ServeConfig())
    try:
        assert httpd.server_address[0] == "127.0.0.1"
        assert post("localhost", httpd.server_address[1], b'{"tactic_state": "x"}') == (200, {"suggestions": ["rfl"]})
    finally:
        stop(httpd)


def test_binding_does_not_wait_on_a_reverse_dns_lookup(monkeypatch):
    """HTTPServer looked up the bound address's fully qualified name (getfqdn: seconds where DNS is slow or
    unreachable, and for --host 0.0.0.0 a lookup of the machine's own name), only to store it unused."""
    monkeypatch.setattr(socket, "getfqdn", lambda *args: pytest.fail("a DNS lookup while binding"))
    httpd = listen(ServeConfig(host="127.0.0.1", port=0))
    httpd.server_close()


@pytest.mark.parametrize("host", ["nosuch.invalid", "x" * 300, "::1::2", "[::1"])
def test_a_bad_host_is_one_line_before_the_model_loads(tmp_path, capsys, monkeypatch, host):
    from megamath.generation import session

    monkeypatch.setattr(session, "open_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["serve", "--model", str(tmp_path), "--tokenizer-model", str(tmp_path / "t.model"),
                 "--host", host, "--port", "6000"]) == 2
    out, err = capsys.readouterr()
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    assert out == "" and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"megamath serve: error: cannot listen on {shown}:6000: "), err


# ---- a client that leaves mid-generation --------------------------------------------------------------------

class Letters:
    """A tokenizer stand-in whose text never holds a newline and which has no EOS: every completion runs to
    max_new_tokens unless something stops it."""

    bos_id, eos_id, vocab_size = 1, None, 64

    def encode(self, text: str) -> list[int]:
        return [2 + ord(c) % 60 for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(97 + i % 26) for i in ids)


def tiny_model(step_seconds: float):
    """A tiny float32 Llama on the CPU whose every forward (prefill or decode step) takes step_seconds more;
    returns (model, [(time, tokens fed) of each forward]): a prefill feeds the prompt, a decode step 1 token."""
    from generation_fixtures import tiny_config
    from megamath.model import Llama

    torch.manual_seed(0)
    model = Llama(tiny_config(vocab_size=64, max_seq_length=2200)).eval()
    steps = []

    def hook(module, args, output):
        steps.append((time.monotonic(), args[0].shape[1]))
        time.sleep(step_seconds)

    model.register_forward_hook(hook)
    return model, steps


def test_a_decode_check_that_raises_stops_generate_between_steps():
    from megamath.generation.generate import SamplingParams, generate

    model, steps = tiny_model(0.0)
    calls = []

    def check():
        calls.append(len(steps))
        if len(calls) == 4:
            raise ConnectionAbortedError("gone")

    with pytest.raises(ConnectionAbortedError, match="gone"):
        generate(model, [[1, 2, 3]], SamplingParams(50), check=check)
    assert calls == [1, 2, 3, 4] and [fed for _, fed in steps] == [3, 1, 1, 1]  # the prefill, 3 steps, no more


def send_request(port: int, tactic_state: str) -> socket.socket:
    body = json.dumps({"tactic_state": tactic_state, "prefix": "rw"}).encode()
    conn = socket.create_connection(("127.0.0.1", port), timeout=30)
    conn.sendall(b"POST / HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    return conn


def test_clients_that_leave_before_their_answer_free_the_server_at_once(capsys):
    """The server decoded an abandoned request to its end (here ~20 s; up to the request timeout), and every
    request behind it waited, abandoned ones included. Now it notices between decode steps, or before
    decoding one whose client left while it waited its turn."""
    from megamath.generation.batching import PromptCodec

    model, steps = tiny_model(0.01)
    config = ServeConfig(num_samples=1, temperatures=(0.0,), max_new_tokens=2000, request_timeout_s=120)
    httpd = LLMStepServer(("127.0.0.1", 0), make_handler(model, PromptCodec(Letters(), 100), config))
    handler = httpd.RequestHandlerClass
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_address[1]
    try:
        with send_request(port, "x y : N"):
            for _ in range(1000):  # until decoding is under way
                if len(steps) >= 5:
                    break
                time.sleep(0.01)
            assert len(steps) >= 5, "generation did not start"
            send_request(port, "a much longer proof state, waiting its turn").close()  # sent, then gone
            time.sleep(0.2)
        left = time.monotonic()  # the first client closed its socket
        assert post("127.0.0.1", port, b'{"tactic_state": 3}') == (
            400, {"error": 'expected {"tactic_state": str, "prefix": str, "context": str}'})
        answered = time.monotonic()
        for _ in range(1000):  # the one that waited its turn is dropped once the first one is
            if handler.abandoned == 2:
                break
            time.sleep(0.01)
        decoded = len(steps)
        time.sleep(0.2)
    finally:
        stop(httpd)
    # Bounds with room for a loaded machine: never stopping takes 2,000 steps of at least 10 ms, 20 s.
    assert answered - left < 8, f"the next request waited {answered - left:.1f} s"
    assert len(steps) == decoded < 1000 and steps[-1][0] - left < 5  # decoding stopped soon after the client left
    first_prompt = 1 + len(server_module.llmstep_prompt("x y : N", "rw"))  # BOS and a token a character
    assert [fed for _, fed in steps if fed > 1] == [first_prompt]  # the one that waited was never decoded
    assert handler.abandoned == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 2, err
    for n, line in enumerate(err.splitlines()):
        assert line.startswith(f"request {n} from 127.0.0.1 abandoned: the client closed its connection; "
                               "generation stopped after "), err
