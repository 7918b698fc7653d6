"""`megamath serve`: a real HTTP client over 127.0.0.1 against the server process (LLMSTEP's protocol):
a well-formed request, malformed JSON, an oversized body, a wrong path; SIGTERM stops it cleanly."""
from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from generation_fixtures import build_checkpoint, build_tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    ckpt, tok = build_checkpoint(root / "ckpt"), build_tokenizer(root / "tok.model")
    proc = subprocess.Popen(
        [sys.executable, "-m", "megamath.cli", "serve", "--model", str(ckpt), "--tokenizer-model", str(tok),
         "--port", "0", "--num-samples", "6", "--temperatures", "0.5", "1.0", "--prompts", "proofstep", "context",
         "--max-new-tokens", "10",
         "--max-body-bytes", "2000"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = proc.stdout.readline()
    if "listening on http://127.0.0.1:" not in line:
        proc.kill()
        pytest.fail(f"server did not start: {line!r} {proc.stderr.read()}")
    port = int(line.split("127.0.0.1:")[1].split("/")[0])
    yield proc, port
    if proc.poll() is None:
        proc.kill()


def post(port: int, body: bytes, path: str = "/") -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_well_formed_request_gets_ranked_unique_suggestions(server):
    _, port = server
    request = {"tactic_state": "x y : ℕ\n⊢ x + y = y + x", "prefix": "rw", "context": "theorem t ..."}
    status, body = post(port, json.dumps(request).encode())
    assert status == 200 and set(body) == {"suggestions"}
    suggestions = body["suggestions"]
    assert 1 <= len(suggestions) <= 24 and len(set(suggestions)) == len(suggestions)  # 6 per prompt and temperature
    assert all(isinstance(s, str) and s.startswith("rw") and "\n" not in s for s in suggestions)


def test_malformed_json_and_bad_fields_get_an_error(server):
    _, port = server
    status, body = post(port, b'{"tactic_state": "x",')
    assert status == 400 and body["error"].startswith("malformed JSON")
    status, body = post(port, b'["tactic_state"]')
    assert status == 400 and "JSON object" in body["error"]
    status, body = post(port, json.dumps({"prefix": "rw"}).encode())
    assert status == 400 and "tactic_state" in body["error"]
    status, body = post(port, json.dumps({"tactic_state": 3}).encode())
    assert status == 400


def test_oversized_body_and_wrong_path(server):
    _, port = server
    status, body = post(port, json.dumps({"tactic_state": "x" * 5000}).encode())
    assert status == 413 and "exceeds 2000" in body["error"]
    # A body past the socket's buffers: closed with it unread, the connection was reset under the client
    # while it was still sending, and the client saw an error instead of the 413.
    status, body = post(port, json.dumps({"tactic_state": "x" * (8 << 20)}).encode())
    assert status == 413 and "exceeds 2000" in body["error"]
    status, body = post(port, b"{}", path="/other")
    assert status == 404
    status, body = post(port, json.dumps({"tactic_state": "⊢ True", "prefix": ""}).encode())
    assert status == 200  # the server is still serving after the refusals


def test_text_that_is_not_unicode_gets_an_error_and_the_server_keeps_serving(server):
    """JSON's \\ud800 escape gives a lone surrogate, which no tokenizer can encode: a 400, not a dropped
    connection."""
    _, port = server
    for body in (b'{"tactic_state": "x \\ud800 y"}', b'{"tactic_state": "x", "prefix": "\\udfff"}'):
        status, reply = post(port, body)
        assert status == 400 and "not valid Unicode" in reply["error"]
    status, _ = post(port, json.dumps({"tactic_state": "⊢ True", "prefix": "ex"}).encode())
    assert status == 200


def test_sigterm_stops_the_server_cleanly(server):
    proc, port = server
    proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the server ignored SIGTERM")
    assert proc.returncode == 0, err
    assert "megamath serve: stopped" in out
    with pytest.raises(OSError):
        post(port, b"{}")


def test_a_failed_generation_gets_a_500_and_the_server_keeps_serving(monkeypatch, capsys):
    """Out of GPU memory on one long request used to drop the connection with no reply."""
    import threading
    from http.server import HTTPServer

    from megamath.generation import server as server_module
    from megamath.generation.server import ServeConfig, make_handler

    def suggest(model, codec, config, tactic_state, prefix, request_number, deadline, check=None, context=""):
        if tactic_state == "huge":
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [prefix + " rfl"]

    monkeypatch.setattr(server_module, "suggest", suggest)
    httpd = HTTPServer(("127.0.0.1", 0), make_handler(None, None, ServeConfig()))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        port = httpd.server_address[1]
        assert post(port, b'{"tactic_state": "huge"}') == (
            500, {"error": "generation failed: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"})
        assert post(port, b'{"tactic_state": "small", "prefix": "exact"}') == (200, {"suggestions": ["exact rfl"]})
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert "request failed: RuntimeError: CUDA out of memory" in capsys.readouterr().err


def test_deeply_nested_json_gets_a_400_and_the_server_keeps_serving(monkeypatch):
    """200 KB of "[[[[...]]]]" made json.loads raise RecursionError: the connection was dropped unanswered."""
    import threading
    from http.server import HTTPServer

    from megamath.generation import server as server_module
    from megamath.generation.server import ServeConfig, make_handler

    monkeypatch.setattr(server_module, "suggest", lambda *args, **kwargs: ["rfl"])
    httpd = HTTPServer(("127.0.0.1", 0), make_handler(None, None, ServeConfig()))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        port = httpd.server_address[1]
        for body in (b"[" * 100_000 + b"]" * 100_000, b'{"tactic_state": "x", "context": ' + b"[" * 100_000 + b"}"):
            assert post(port, body) == (400, {"error": "malformed JSON: nested too deeply"})
        assert post(port, b'{"tactic_state": "x"}') == (200, {"suggestions": ["rfl"]})
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_burst_of_clients_waits_its_turn_and_each_gets_its_answer(monkeypatch):
    """64 clients at once: past HTTPServer's listen queue of 5, the connections were reset."""
    import threading
    import time

    from megamath.generation import server as server_module
    from megamath.generation.server import LLMStepServer, ServeConfig, make_handler

    monkeypatch.setattr(server_module, "suggest", lambda model, codec, config, state, prefix, n, deadline, check=None,
                        context="": time.sleep(0.01) or [f"{prefix} {state}"])
    httpd = LLMStepServer(("127.0.0.1", 0), make_handler(None, None, ServeConfig()))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    replies = [None] * 64

    def client(i):
        try:
            body = json.dumps({"tactic_state": f"h{i} : α ⊢ α", "prefix": "λ"}).encode()
            replies[i] = post(httpd.server_address[1], body)
        except OSError as err:
            replies[i] = repr(err)

    clients = [threading.Thread(target=client, args=(i,)) for i in range(64)]
    try:
        for c in clients:
            c.start()
        for c in clients:
            c.join()
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert replies == [(200, {"suggestions": [f"λ h{i} : α ⊢ α"]}) for i in range(64)]


def raw_exchange(port: int, data: bytes, wait: float = 30.0) -> tuple[bytes, float]:
    """Send `data` as is, then read the reply until the server closes: (reply, seconds it took)."""
    import socket
    import time

    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as conn:
        conn.sendall(data)
        reply = b""
        while chunk := conn.recv(1 << 16):
            reply += chunk
    return reply, time.monotonic() - start


def test_requests_the_http_layer_or_json_refused_get_a_json_4xx_and_the_server_keeps_serving(monkeypatch):
    """Each of these was a dropped connection with a traceback in the log (an int() of "²" or of 5000 digits,
    json.loads' digit limit), an HTML page (a garbled request line), or a 501 HTML page (PUT)."""
    import threading

    from megamath.generation import server as server_module
    from megamath.generation.server import LLMStepServer, ServeConfig, make_handler

    monkeypatch.setattr(server_module, "suggest", lambda *args, **kwargs: ["rfl"])
    httpd = LLMStepServer(("127.0.0.1", 0), make_handler(None, None, ServeConfig()))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_address[1]
    big = b'{"tactic_state": "x", "context": ' + b"1" * 5000 + b"}"
    try:
        for request, status, error in (
                (b"POST / HTTP/1.0\r\nContent-Length: " + str(len(big)).encode() + b"\r\n\r\n" + big,
                 b"400", b'"malformed JSON: Exceeds the limit (4300 digits)'),
                (b"POST / HTTP/1.0\r\nContent-Length: \xb2\r\n\r\n{}", b"400", b'"invalid Content-Length'),
                (b"POST / HTTP/1.0\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n{}", b"400",
                 b'"invalid Content-Length'),
                (b"PUT / HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}", b"405", b'{"error": "use POST / with a JSON body"}'),
                (b"BREW / HTTP/1.0\r\n\r\n", b"501", b'{"error": "Unsupported method'),
                (b"GARBAGE\r\n\r\n", None, b'{"error": "Bad request syntax')):  # HTTP/0.9: a body alone
            reply, _ = raw_exchange(port, request)
            if status is None:
                assert reply.startswith(error), reply
                continue
            head, _, body = reply.partition(b"\r\n\r\n")
            assert head.split(b" ")[1] == status and b"Content-Type: application/json" in head, reply
            assert body.startswith(error) or error in body, reply
        assert post(port, b'{"tactic_state": "x"}') == (200, {"suggestions": ["rfl"]})
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_client_trickling_its_body_is_cut_off_at_the_timeout_not_per_read(monkeypatch):
    """The timeout bounded each socket read: a client sending a byte a second under a 1 s timeout held the
    one-at-a-time server (and every client behind it) for as long as it liked, then got its answer."""
    import threading
    import time

    from megamath.generation import server as server_module
    from megamath.generation.server import LLMStepServer, ServeConfig, make_handler

    monkeypatch.setattr(server_module, "suggest", lambda *args, **kwargs: ["rfl"])
    httpd = LLMStepServer(("127.0.0.1", 0), make_handler(None, None, ServeConfig(request_timeout_s=1.5)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_address[1]
    result = {}

    def trickle():
        import socket

        start = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
            conn.sendall(b"POST / HTTP/1.0\r\nContent-Length: 20\r\n\r\n")
            reply = b""
            for byte in b'{"tactic_state": "x"}'[:19]:
                try:
                    conn.sendall(bytes([byte]))
                    conn.settimeout(0.5)
                    reply += conn.recv(1 << 16)  # the answer's first bytes, once it comes
                except socket.timeout:
                    continue
                except OSError:
                    break
                if reply:  # the headers and the body may come in separate segments: read to the close
                    conn.settimeout(5)
                    while chunk := conn.recv(1 << 16):
                        reply += chunk
                    break
        result["trickler"] = (reply, time.monotonic() - start)

    slow = threading.Thread(target=trickle)
    try:
        slow.start()
        time.sleep(0.3)
        start = time.monotonic()
        assert post(port, b'{"tactic_state": "x"}') == (200, {"suggestions": ["rfl"]})
        waited = time.monotonic() - start
        slow.join()
    finally:
        httpd.shutdown()
        httpd.server_close()
    reply, seconds = result["trickler"]
    assert reply.startswith(b"HTTP/1.0 408") and b"the body did not arrive within 1.5 s" in reply, reply
    assert seconds < 6 and waited < 6  # cut at 1.5 s, not after the 19 reads of 0.5 s each (~10 s)


def test_a_client_gone_mid_request_is_one_log_line_not_a_traceback(monkeypatch, capsys):
    import socket
    import struct
    import threading
    import time

    from megamath.generation import server as server_module
    from megamath.generation.server import LLMStepServer, ServeConfig, make_handler

    monkeypatch.setattr(server_module, "suggest", lambda *args, **kwargs: ["rfl"])
    httpd = LLMStepServer(("127.0.0.1", 0), make_handler(None, None, ServeConfig()))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_address[1]
    try:
        conn = socket.create_connection(("127.0.0.1", port))
        conn.sendall(b"POST / HTTP/1.0\r\nContent-Length: 100\r\n\r\n{")
        time.sleep(0.2)  # the server is reading the body
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()  # a reset, as a client killed mid-send
        assert post(port, b'{"tactic_state": "x"}') == (200, {"suggestions": ["rfl"]})
    finally:
        httpd.shutdown()
        httpd.server_close()
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("request from 127.0.0.1 failed: ConnectionResetError"), err
    assert err.count("\n") == 1


def test_suggestions_are_prefixed_deduplicated_and_ranked_by_mean_logprob(monkeypatch):
    from megamath.generation import server as server_module
    from megamath.generation.generate import Completion
    from megamath.generation.server import ServeConfig, suggest

    seen = []

    def fake_complete(model, codec, prompts, params, count, seed, batch_size, keys, **kwargs):
        seen.append((prompts[0], params.temperature, count, params.stop))
        return [[Completion([1, 2], -4.0, " [foo]"), Completion([1], -1.0, "_comm"),  # means -2.0, -1.0
                 Completion([1, 2, 3, 4, 5], -4.0, " [foo]"), Completion([1], -0.1, "  ")][:count]]  # -0.8, blank

    monkeypatch.setattr(server_module, "complete", fake_complete)
    config = ServeConfig(num_samples=5, temperatures=(0.5, 1.0))
    # " [foo]" twice: one suggestion, with its better mean (-0.8 beats "_comm"'s -1.0); a blank completion
    # suggests the prefix alone (the model ended the tactic there), as LLMSTEP does.
    assert suggest(None, None, config, "⊢ a = a", "rw") == ["rw", "rw [foo]", "rw_comm"]
    # LLMSTEP's --num-samples: that many at each temperature (the split over them gave 3 and 2).
    prompt = "[GOAL]⊢ a = a[PROOFSTEP]rw"
    assert seen == [(prompt, 0.5, 5, ("\n",)), (prompt, 1.0, 5, ("\n",))]


def test_sorry_and_admit_are_never_suggested(monkeypatch):
    """A copilot's `sorry` closes the goal in the editor and proves nothing (LLMSTEP drops it too)."""
    from megamath.generation import server as server_module
    from megamath.generation.generate import Completion
    from megamath.generation.server import ServeConfig, suggest

    def fake_complete(model, codec, prompts, params, count, *args, **kwargs):
        return [[Completion([1], -0.1, "sorry"), Completion([1], -0.2, "admit "), Completion([1], -0.3, " "),
                 Completion([1], -0.4, "sorry_lemma"), Completion([1, 2], -1.0, "simp")]]

    monkeypatch.setattr(server_module, "complete", fake_complete)
    assert suggest(None, None, ServeConfig(num_samples=5), "⊢ True", "") == ["sorry_lemma", "simp"]
    assert suggest(None, None, ServeConfig(num_samples=5), "⊢ True", "so") == ["sosorry", "soadmit", "so",
                                                                                "sosorry_lemma", "sosimp"]
    fake = [Completion([1], -0.1, "rry"), Completion([1], -0.2, "rry_lemma"), Completion([1], -0.3, "lve")]
    monkeypatch.setattr(server_module, "complete", lambda *args, **kwargs: [fake])
    assert suggest(None, None, ServeConfig(num_samples=5), "⊢ True", "so") == ["sorry_lemma", "solve"]


def test_the_context_prompt_continues_the_file_and_merges_with_the_proofstep_prompt(monkeypatch):
    """A model only pretrained on Lean (LLEMMA) does not know the [GOAL]..[PROOFSTEP] format; LLMSTEP's server
    for it also continues the file the client sends as context."""
    from megamath.generation import server as server_module
    from megamath.generation.generate import Completion
    from megamath.generation.server import ServeConfig, suggest

    seen = []

    def fake_complete(model, codec, prompts, params, count, seed, batch_size, keys, **kwargs):
        seen.append((prompts[0], keys[0]))
        text = " simp" if prompts[0].startswith("[GOAL]") else " ring"
        return [[Completion([1], -1.0 if text == " simp" else -0.5, text)]]

    monkeypatch.setattr(server_module, "complete", fake_complete)
    config = ServeConfig(num_samples=1, prompts=("proofstep", "context"))
    context = "theorem t (a b : ℕ) : a + b = b + a := by\n  "
    assert suggest(None, None, config, "⊢ a + b = b + a", "", 3, context=context) == ["ring", "simp"]
    assert seen == [("[GOAL]⊢ a + b = b + a[PROOFSTEP]", 6), (context, 7)]  # seeds: request 3, prompts 0 and 1
    seen.clear()  # a request without context: the context prompt has nothing to continue
    assert suggest(None, None, config, "⊢ True", "tri", 4) == ["tri simp"]
    assert seen == [("[GOAL]⊢ True[PROOFSTEP]tri", 8)]
    seen.clear()  # the default: the proofstep prompt alone, keyed by the request as before
    assert suggest(None, None, ServeConfig(num_samples=1), "⊢ True", "", 4, context=context) == ["simp"]
    assert seen == [("[GOAL]⊢ True[PROOFSTEP]", 4)]


def test_completions_keep_the_space_that_follows_the_prompt(tmp_path):
    """SentencePiece drops the leading space of a text's first piece; a completion continues a prompt, so
    "intro" + "▁h" must read "intro h" (a suggestion "introh" is no tactic)."""
    from megamath.data.tokenizer import SentencePieceTokenizer
    from megamath.generation.batching import PromptCodec

    tokenizer = SentencePieceTokenizer(build_tokenizer(tmp_path / "tok.model"))
    codec = PromptCodec(tokenizer, 100)
    for prompt, continuation in (("[GOAL]⊢ a = a[PROOFSTEP]rw", " [Nat.add_comm]"), ("[PROOFSTEP]intro", " h"),
                                 ("Q: How many?\nA:", " The answer is 5."), ("x =", "  5"), ("A:", "\nQ:"),
                                 ("x", "é ü")):
        prompt_ids, full_ids = tokenizer.encode(prompt), tokenizer.encode(prompt + continuation)
        assert full_ids[:len(prompt_ids)] == prompt_ids
        assert codec.decode(full_ids[len(prompt_ids):]) == continuation
    assert codec.decode([]) == ""


def test_a_greedy_temperature_decodes_once(monkeypatch):
    """--temperatures 0 0.5 --num-samples 10 decoded copies of the one greedy completion."""
    from megamath.generation import server as server_module
    from megamath.generation.generate import Completion
    from megamath.generation.server import ServeConfig, suggest

    counts = []

    def fake_complete(model, codec, prompts, params, count, *args, **kwargs):
        counts.append((params.temperature, count))
        return [[Completion([1], -1.0, f" t{params.temperature} s{j}") for j in range(count)]]

    monkeypatch.setattr(server_module, "complete", fake_complete)
    config = ServeConfig(num_samples=10, temperatures=(0.0, 0.5))
    assert suggest(None, None, config, "⊢ True", "exact")[0] == "exact t0.0 s0"
    assert counts == [(0.0, 1), (0.5, 10)]
