"""An HTTP server speaking LLMSTEP's protocol, so Lean 4's `llmstep` tactic can use a megamath model.

    POST /   {"tactic_state": str, "prefix": str, "context": str}
          -> {"suggestions": [str, ...]}          200
          -> {"error": str}                        400 malformed JSON, fields or Content-Length, 404 other
                                                   paths, 405 other methods, 408 body not sent in time,
                                                   411 no Content-Length, 413 body too large, 503 timeout
                                                   or stopping, 500 generation failed (e.g. out of GPU
                                                   memory; logged)

The prompts (`prompts`, LLMSTEP's two): `proofstep`, `[GOAL]{tactic_state}[PROOFSTEP]{prefix}`, the format
of a model tuned on proof steps; `context`, `{context}{prefix}`, the Lean file text the client sends as
context, continued, which a model only pretrained on Lean code such as LLEMMA can do (a request without
context skips it). Per prompt and
temperature `num_samples` completions are drawn (one at temperature 0: every greedy sample is the same),
each cut at the first newline; a suggestion is the prefix followed by the completion, stripped. Empty
suggestions, `sorry` and `admit` are dropped (LLMSTEP's filter), duplicates merged, and suggestions ranked by mean
log-probability per generated token (long tactics are not penalised for their length). The samples of the
server's n-th request draw from seeds keyed by n: the same proof state asked again gets fresh samples, and
a restarted server answers its requests in the same order with the same suggestions.

One request is served at a time (one model; up to 128 more connections wait their turn). Reading a request
and generating its answer are each bounded by `request_timeout_s` in all, not per socket read: a client
trickling a byte at a time would otherwise hold the server, and every client behind it, for as long as it
liked. A client that closes its connection while its suggestions are generated (it gave up, timed out or
was killed) is noticed between decode steps: decoding stops, one line is logged and the next client is
served (a client that half-closes, shutting its sending side while it waits for the answer, reads the
same and is not answered). Every error, the HTTP layer's own included, is a JSON body.

The server binds to 127.0.0.1 unless told otherwise, before the model loads (a port in use fails at once):
an IPv6 address (`::1`, `::` with IPv4 clients too where the OS allows, bracketed or not) binds an IPv6
socket, a host name its IPv4 address when it has one. SIGTERM finishes the request in flight and stops it
(a connection still sending its request is cut short, not waited for).
"""
from __future__ import annotations

import itertools
import json
import select
import signal
import socket
import socketserver
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer

import torch

from megamath.generation.batching import PromptCodec, complete
from megamath.generation.generate import SamplingParams

DISCARD_BYTES = 64 << 20
"""The most of a refused (413) body read and dropped so that its client gets the answer; past it the
connection is closed as it stands."""


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 6000
    num_samples: int = 10
    """Samples per temperature (LLMSTEP's meaning); a greedy temperature (0) decodes one."""
    temperatures: tuple[float, ...] = (0.5,)
    max_new_tokens: int = 64
    top_p: float = 1.0
    max_body_bytes: int = 1 << 20
    request_timeout_s: float = 60.0
    seed: int = 0
    batch_size: int = 16
    prompts: tuple[str, ...] = ("proofstep",)
    """Names in PROMPTS; their suggestions are merged and ranked together."""


MAX_REQUEST_TIMEOUT_S = 1e6
"""The longest --request-timeout: sockets refuse infinite (or absurd) timeouts with OverflowError."""


class ClientGone(Exception):
    """The client closed its connection before its answer was ready."""


def format_address(host: str, port: int) -> str:
    """host:port, an IPv6 address in brackets ([::1]:6000), as a URL writes it."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def bind_address(host: str, port: int) -> tuple[int, tuple]:
    """(address family, socket address) to bind `host` to: an IPv6 address (bracketed or not) gives an IPv6
    socket; a name that resolves to both families its IPv4 address, as before (`localhost` stays
    127.0.0.1); "" every IPv4 interface, as before."""
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, address = min(infos, key=lambda info: info[0] != socket.AF_INET)  # the first IPv4 one
    return family, address


def client_closed(conn: socket.socket) -> bool:
    """Whether the peer has closed (or reset) the connection, without waiting: the socket reads as ready and a
    peek there reads the end of the stream (bytes waiting, a pipelined request, are a client still there)."""
    try:
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(conn, select.POLLIN)
            ready = bool(poller.poll(0))
        else:
            ready = bool(select.select([conn], [], [], 0)[0])
        return ready and conn.recv(1, socket.MSG_PEEK) == b""
    except TimeoutError:
        return False
    except (OSError, ValueError):  # reset by the peer, or closed
        return True


class LLMStepServer(HTTPServer):
    """An HTTPServer whose listen queue holds a burst of clients: one request is served at a time and the
    others wait their turn there (HTTPServer's queue of 5 reset every connection past it). The address is
    resolved for its family (IPv4 or IPv6: `bind_address`)."""

    request_queue_size = 128

    def __init__(self, server_address, handler_class, bind_and_activate: bool = True):
        self.address_family, address = bind_address(*server_address[:2])
        super().__init__(address, handler_class, bind_and_activate)

    def server_bind(self) -> None:
        """Dual stack on an IPv6 socket where the OS allows (`::` takes IPv4 clients too), as Python's own
        `http.server --bind ::`; and no reverse DNS lookup of the address, which HTTPServer's does only to
        store a name no one reads (seconds, or a hang, where DNS is slow or unreachable)."""
        if self.address_family == socket.AF_INET6:
            try:
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            except (OSError, AttributeError):  # an OS without dual stack: IPv6 clients only
                pass
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request, client_address) -> None:
        """One line per failed connection (a client gone mid-request, above all), not a traceback."""
        err = sys.exc_info()[1]
        print(f"request from {client_address[0]} failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)


GIVING_UP = frozenset({"sorry", "admit"})
"""Tactics never suggested: they close the goal in the editor and prove nothing (LLMSTEP drops them too)."""


def llmstep_prompt(tactic_state: str, prefix: str) -> str:
    return f"[GOAL]{tactic_state}[PROOFSTEP]{prefix}"


PROMPTS = {"proofstep": lambda state, prefix, context: llmstep_prompt(state, prefix),
           "context": lambda state, prefix, context: context + prefix if context else None}
"""name -> prompt(tactic_state, prefix, context), None where the request gives it nothing to work on."""


def suggest(model, codec: PromptCodec, config: ServeConfig, tactic_state: str, prefix: str,
            request_number: int = 0, deadline: float | None = None, check=None, context: str = "") -> list[str]:
    """Ranked, deduplicated tactic suggestions for one proof state: `config.num_samples` per prompt and
    temperature, as LLMSTEP's servers draw them, without empty ones and those that close no goal (`sorry`,
    `admit`). `check()`, called before each batch of samples and between decode steps, raises to stop (the
    client is gone)."""
    scored: dict[str, float] = {}
    temps = config.temperatures
    for (p_index, name), (t_index, temperature) in itertools.product(enumerate(config.prompts), enumerate(temps)):
        prompt = PROMPTS[name](tactic_state, prefix, context)
        if prompt is None:
            continue
        count = 1 if temperature == 0 else config.num_samples  # greedy: every sample would be the same one
        params = SamplingParams(config.max_new_tokens, temperature, config.top_p, ("\n",))
        if check is not None:
            check()
        key = (request_number * len(config.prompts) + p_index) * len(temps) + t_index
        samples = complete(model, codec, [prompt], params, count, config.seed, config.batch_size,
                           keys=[key], deadline=deadline, check=check)[0]
        for c in samples:
            text = (prefix + c.text).strip()
            if text and text not in GIVING_UP:  # a blank completion suggests the prefix as typed: it may be whole
                score = c.logprob / max(1, len(c.token_ids))
                scored[text] = max(score, scored.get(text, float("-inf")))
    return sorted(scored, key=lambda s: -scored[s])


def make_handler(model, codec: PromptCodec, config: ServeConfig):
    counter = iter(range(1 << 62))

    class Handler(BaseHTTPRequestHandler):
        timeout = config.request_timeout_s  # each socket read; the read deadline below bounds them all
        server_version = "megamath-llmstep"
        reading = None
        """The handler whose request is still arriving (one at a time is served), for `stop`."""
        stopping = False
        abandoned = 0
        """Requests whose client left before its answer was ready (their generation stopped)."""
        _read_shut = False

        @classmethod
        def stop(cls) -> None:
            """The server is stopping: a request still arriving (an idle connection, a slow client) is cut
            short now, not waited for until its read deadline; one being generated is finished."""
            cls.stopping = True
            if cls.reading is not None:
                cls.reading._stop_reading()

        def setup(self) -> None:
            """Start the request's read deadline: past it, the socket's reading side is shut, so a read in
            progress ends at once (short) and the client is answered 408 or dropped."""
            super().setup()
            self._started = time.monotonic()
            self._read_deadline = threading.Timer(config.request_timeout_s, self._stop_reading)
            self._read_deadline.daemon = True
            self._read_deadline.start()
            Handler.reading = self
            if Handler.stopping:  # the signal came between the accept and here
                self._stop_reading()

        def _done_reading(self) -> None:
            self._read_deadline.cancel()
            Handler.reading = None

        def _stop_reading(self) -> None:
            self._read_shut = True  # our own end of the stream: not the client leaving
            try:
                self.connection.shutdown(socket.SHUT_RD)
            except OSError:  # already closed
                pass

        def _check_client(self) -> None:
            if not self._read_shut and client_closed(self.connection):
                raise ClientGone

        def finish(self) -> None:
            self._done_reading()
            super().finish()

        def log_message(self, format, *args):  # noqa: A002 - the base class's name
            pass

        def send_error(self, code, message=None, explain=None):
            """The HTTP layer's own errors (a garbled request line, an unknown method) as JSON, like ours."""
            self.close_connection = True
            self._reply(code, {"error": message or self.responses.get(code, ("error",))[0]})

        def _reply(self, status: int, body: dict, headers: dict | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":  # a HEAD reply carries no body
                self.wfile.write(data)
            self._log(status, body)

        def _log(self, status: int, body: dict) -> None:
            """One line per answered request on stdout, as LLMSTEP's server prints: who, what, the answer, how
            long from the connection's start (the request's own text escaped, so it cannot forge log lines)."""
            what = f"{len(body['suggestions'])} suggestions" if "suggestions" in body else body["error"][:200]
            request = f"{self.command or '-'} {getattr(self, 'path', None) or '-'}"[:200]
            try:
                print(f"{self.client_address[0]} {json.dumps(request)} {status}: {json.dumps(what)[1:-1]} "
                      f"({time.monotonic() - self._started:.2f} s)", flush=True)
            except OSError:  # stdout closed (`megamath serve | head -1` read the address): the answer is sent
                pass

        def _refuse(self, status: int, error: str, headers: dict | None = None) -> None:
            """An error reply to a request whose body (if it has one) is not wanted: the body is read and dropped
            first, or closing the socket would reset the connection under a client still sending it."""
            self.close_connection = True
            length = self.headers.get("Content-Length", "")
            if _valid_length(length):
                self._discard(int(length))
            self._reply(status, {"error": error}, headers)

        def _discard(self, length: int) -> None:
            """Read and drop a refused body, up to DISCARD_BYTES: a socket closed with data unread is reset,
            and a client still sending would get an error instead of the answer."""
            left = min(length, DISCARD_BYTES)
            try:
                while left > 0 and (chunk := self.rfile.read(min(left, 1 << 16))):
                    left -= len(chunk)
            except TimeoutError:  # the 413 is sent all the same
                pass

        def do_GET(self):  # noqa: N802
            self._refuse(405, "use POST / with a JSON body", {"Allow": "POST"})

        do_HEAD = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_GET  # noqa: N815

        def do_POST(self):  # noqa: N802
            if self.path.split("?")[0] != "/":
                return self._refuse(404, f"unknown path {self.path}")
            length = self.headers.get("Content-Length")
            if length is None:
                return self._reply(411, {"error": "a Content-Length header is required"})
            if not _valid_length(length):
                return self._reply(400, {"error": f"invalid Content-Length {length[:40]!r}"})
            if int(length) > config.max_body_bytes:
                return self._refuse(413, f"body of {length} bytes exceeds {config.max_body_bytes}")
            try:
                body = self.rfile.read(int(length))
            except TimeoutError:
                body = b""
            if len(body) < int(length):  # the read deadline passed, the server is stopping, or the client stopped
                self.close_connection = True
                if Handler.stopping:
                    return self._reply(503, {"error": "the server is stopping"})
                return self._reply(408, {"error": f"the body did not arrive within {config.request_timeout_s} s "
                                                  f"({len(body)} of {length} bytes)"})
            self._done_reading()  # generation has a deadline of its own, and is finished on a stop
            try:
                request = json.loads(body.decode("utf-8"))
            except ValueError as err:  # bad UTF-8 or JSON, or an integer of more than 4300 digits
                return self._reply(400, {"error": f"malformed JSON: {err}"})
            except RecursionError:  # "[[[[...]]]]": Python's parser recurses once per level
                return self._reply(400, {"error": "malformed JSON: nested too deeply"})
            if not isinstance(request, dict):
                return self._reply(400, {"error": "the body must be a JSON object"})
            bad = [k for k in ("tactic_state", "prefix", "context") if not isinstance(request.get(k, ""), str)]
            if "tactic_state" not in request or bad:
                return self._reply(400, {"error": 'expected {"tactic_state": str, "prefix": str, "context": str}'})
            try:  # JSON's \ud800 escapes give lone surrogates, which the tokenizer cannot take
                for key in ("tactic_state", "prefix", "context"):
                    request.get(key, "").encode("utf-8")
            except UnicodeEncodeError as err:
                return self._reply(400, {"error": f"{key} is not valid Unicode: {err.reason}"})
            start = time.monotonic()
            number = next(counter)
            try:
                suggestions = suggest(model, codec, config, request["tactic_state"], request.get("prefix", ""),
                                      number, start + config.request_timeout_s, check=self._check_client,
                                      context=request.get("context", ""))
            except ClientGone:  # no one to answer
                self.close_connection = True
                Handler.abandoned += 1
                print(f"request {number} from {self.client_address[0]} abandoned: the client closed its connection; "
                      f"generation stopped after {time.monotonic() - start:.1f} s", file=sys.stderr, flush=True)
                return
            except TimeoutError:
                return self._reply(503, {"error": f"timed out after {config.request_timeout_s} s"})
            except Exception as err:  # noqa: BLE001 - e.g. out of GPU memory: answer, log, and keep serving
                print(f"request failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()  # an out-of-memory request must not leave the next one short
                return self._reply(500, {"error": f"generation failed: {type(err).__name__}: {err}"})
            self._reply(200, {"suggestions": suggestions})

    return Handler


def _valid_length(length: str) -> bool:
    """A Content-Length int() takes as it is meant: plain ASCII digits ("²" passes isdigit()), not absurdly many."""
    return length.isascii() and length.isdigit() and len(length) <= 18


def listen(config: ServeConfig) -> LLMStepServer:
    """The bound server, before any model is loaded: a port in use must not cost a model load first.
    Clients that connect before `serve` starts wait in the listen queue."""
    try:
        return LLMStepServer((config.host, config.port), BaseHTTPRequestHandler, bind_and_activate=True)
    except (OSError, ValueError) as err:  # port in use, unknown host, a name too long: the message names neither
        where = format_address(config.host, config.port)
        raise OSError(f"cannot listen on {where}: {getattr(err, 'strerror', None) or err}") from None


def serve(model, codec: PromptCodec, config: ServeConfig, ready=None, server: LLMStepServer | None = None) -> None:
    """Serve until SIGTERM or SIGINT on `server` (bound by `listen`; bound here when not given);
    `ready(host, port)` is called once listening. The request in flight is finished first; a second SIGINT
    (Ctrl-C again) does not wait for it: it raises KeyboardInterrupt."""
    server = server or listen(config)
    handler_class = server.RequestHandlerClass = make_handler(model, codec, config)
    stop = threading.Event()

    def on_signal(signum, frame):
        if stop.is_set():
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        stop.set()
        threading.Thread(target=server.shutdown, daemon=True).start()  # shutdown() waits for the loop
        handler_class.stop()  # the loop waits for the connection in hand: it must not wait on a silent client

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        if ready is not None:
            ready(*server.server_address[:2])
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        for s, handler in previous.items():
            signal.signal(s, handler)
