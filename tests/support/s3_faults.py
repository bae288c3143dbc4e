"""A fault-injecting HTTP proxy in front of an S3 endpoint (the tests' moto server), standard library only.

Clients pointed at the proxy behave exactly as against the upstream: every request (method, raw path and query,
headers in order with the original ``Host``, body) is forwarded and the response (status, headers, body) relayed.
On top of that the proxy counts requests by ``(method, "bucket/key")`` and injects faults by rule::

    with S3FaultProxy(s3_endpoint) as proxy:                 # or: with s3_fault_proxy(s3_endpoint) as proxy
        fs = proxy.pyarrow_fs()                               # S3FileSystem(endpoint_override=proxy.endpoint, http)
        s3 = proxy.boto3_client()                             # boto3.client("s3", endpoint_url=proxy.url)
        with proxy.environ():                                 # AWS_ENDPOINT_URL(_S3) -> proxy for this block
            ...
        proxy.fail(method="GET", key_pattern="in/000.tar", times=2, status=503)   # next 2 matching GETs: SlowDown
        proxy.fail(method="GET", key_pattern="in/*", times=None)                  # every matching GET until clear()
        proxy.fail(method="GET", key_pattern="in/000.tar", mode="reset")          # headers + half the body, then EOF
        proxy.count("GET", "bucket/in/000.tar"); proxy.log; proxy.reset(); proxy.clear()

Paths are path-style (``/bucket/key``, percent-decoded); a bucket-level request (list, create) counts as
``"bucket"``. A key pattern is an fnmatch glob tried against both ``"bucket/key"`` and the bare ``"key"`` (so
``"in/000.tar"`` matches that key in any bucket), or a compiled regex searched in ``"bucket/key"``.

Fault modes (the request body is always read first, so a kept-alive connection stays in step):

- ``"error"`` (default): an S3-style XML error (``SlowDown`` for 503, ``InternalError`` for 500, ``NoSuchKey``
  for 404, ...; ``code=``/``message=`` override) with the given status; the connection is kept alive. HEAD gets
  the status with no body, as S3 does; ``xml_body=False`` sends no body for any method.
- ``"reset"``: the real upstream response's status line and headers (full ``Content-Length``), then only
  ``partial_bytes`` of the body (default: half), then the connection is shut down (FIN; ``rst=True``: an abortive
  close, TCP RST). A bodiless response (HEAD, UploadPart) is cut inside its header block and always reset with
  RST: curl accepts a header block cut short by a FIN as complete, so pyarrow would report a 0-byte file.
  The request has reached the upstream: a PUT is stored though the client sees a failure.
- ``"drop"``: the connection is closed without any response (FIN, or RST with ``rst=True``); not forwarded.
- ``"hang"``: no response until ``hang_s`` passes (default: until the rule is cleared or the proxy stops),
  then the connection is closed. Not forwarded. Meant for client timeouts.

What pyarrow's S3 client (AWS SDK C++, default ``AwsStandardS3RetryStrategy(max_attempts=3)``, pyarrow 26) does,
as tests/support/test_s3_faults.py checks:

- 500/503 (and any 5xx or throttling error): retried, 3 attempts in all, with a backoff of roughly 0.5-1 s per
  retry; ``times=2`` is absorbed (the read succeeds, 3 GETs), ``times=None`` raises ``OSError`` ("AWS Error
  SLOW_DOWN / SERVICE_UNAVAILABLE / INTERNAL_FAILURE during GetObject operation ..."). 403/404: not retried.
- Caveat: the SDK writes an error response's body into pyarrow's read buffer, which is sized to the requested
  range. An XML error longer than the read (an object or a range under ~250 bytes) overflows it: the request
  fails at once with "INTERNAL_FAILURE ... Failed to flush response stream", not retried. ``xml_body=False``
  sidesteps that; real S3 does send the XML.
- ``"reset"``/``"drop"``/``"hang"``: curl errors (18 partial file, 56 connection reset, 52 empty reply,
  28 timeout), all NETWORK_CONNECTION, retried like a 5xx; persistent ones raise ``OSError`` after 3 attempts.
  ``"hang"`` needs ``request_timeout=`` on the filesystem (curl's low-speed limit; the SDK default is 3 s).
- HEAD faults surface from ``get_file_info``/``open_input_*`` as "When getting/reading information for key ...:
  AWS Error UNKNOWN (HTTP status 503) during HeadObject operation: No response body."; write faults surface from
  ``close()`` of the output stream (small writes still go through a multipart upload: POST, PUT part, POST).

Request framing: a ``Transfer-Encoding: chunked`` body is de-chunked and forwarded with a ``Content-Length``
(as a buffering reverse proxy such as nginx does); HTTP trailers, if any, are appended as headers. An
``aws-chunked`` *content* encoding is part of the payload and passes through byte for byte. ``Expect:
100-continue`` is answered by the proxy (``100 Continue``) and not forwarded, since the body is sent along with
the request. Hop-by-hop headers (Connection, Keep-Alive, TE, Trailer, Upgrade, Proxy-*) are not forwarded either
way. Everything else, ``Host`` included, is forwarded unchanged, so a SigV4 signature stays valid.
"""

from __future__ import annotations

import contextlib
import fnmatch
import http.client
import http.server
import os
import re
import socket
import struct
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from urllib.parse import unquote, urlsplit

import pytest

__all__ = ["S3FaultProxy", "Rule", "LogEntry", "Record", "s3_fault_proxy", "s3_faults"]

MODES = ("error", "reset", "drop", "hang")
ERROR_CODES = {
    400: ("InvalidRequest", "Invalid Request"),
    403: ("AccessDenied", "Access Denied"),
    404: ("NoSuchKey", "The specified key does not exist."),
    409: ("OperationAborted", "A conflicting conditional operation is currently in progress."),
    500: ("InternalError", "We encountered an internal error. Please try again."),
    501: ("NotImplemented", "A header you provided implies functionality that is not implemented."),
    502: ("BadGateway", "Bad Gateway"),
    503: ("SlowDown", "Please reduce your request rate."),
    504: ("GatewayTimeout", "Gateway Timeout"),
}
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization", "te",
              "trailer", "trailers", "transfer-encoding", "upgrade"}
_BLOCK = 64 * 1024


class LogEntry(NamedTuple):
    """One request as the client saw it: status is what the proxy answered (None: no status line was sent)."""

    method: str
    path: str
    status: int | None


@dataclass
class Record:
    """Everything the proxy noted about one request (``proxy.records``), for debugging and finer assertions."""

    method: str
    path: str                 # "bucket/key" (percent-decoded), "bucket", or "" for the service root
    query: str                # raw query string, e.g. "partNumber=1&uploadId=..." or "list-type=2&prefix=..."
    headers: dict[str, str]   # request headers, names lower-cased (last value wins for repeats)
    request_bytes: int        # body bytes received (after de-chunking)
    status: int | None = None
    fault: str | None = None  # None, or the mode of the rule that fired ("error", "reset", "drop", "hang")
    response_bytes: int = 0   # body bytes sent to the client


@dataclass
class Rule:
    """A fault rule. ``times=None``: fires on every match until cleared; otherwise on the next ``times`` matches
    (after letting ``skip`` matches through). ``hits`` counts the requests it has faulted."""

    method: str | None = None
    key_pattern: str | re.Pattern | None = None
    times: int | None = 1
    status: int = 503
    mode: str = "error"
    code: str | None = None
    message: str | None = None
    skip: int = 0
    partial_bytes: int | None = None
    hang_s: float | None = None
    rst: bool = False
    xml_body: bool = True
    match: Callable[[Record], bool] | None = None
    hits: int = 0
    active: bool = True
    _released: threading.Event = field(default_factory=threading.Event, repr=False)

    def matches(self, record: Record) -> bool:
        if self.method is not None and record.method != self.method.upper():
            return False
        if self.key_pattern is not None:
            if isinstance(self.key_pattern, re.Pattern):
                if not self.key_pattern.search(record.path):
                    return False
            else:
                key = record.path.partition("/")[2]
                if not (fnmatch.fnmatchcase(record.path, self.key_pattern)
                        or fnmatch.fnmatchcase(key, self.key_pattern)):
                    return False
        return self.match is None or bool(self.match(record))

    @property
    def remaining(self) -> int | None:
        return None if self.times is None else max(self.times - self.hits, 0)

    def cancel(self) -> None:
        self.active = False
        self._released.set()


def _split_path(raw: str) -> tuple[str, str]:
    """``/bucket/some%20key?x=1`` -> ("bucket/some key", "x=1"); a trailing "/" after a bare bucket is dropped."""
    parts = urlsplit(raw)
    path = unquote(parts.path).lstrip("/")
    bucket, sep, key = path.partition("/")
    return (f"{bucket}/{key}" if key else bucket), parts.query


def error_body(code: str, message: str, resource: str, request_id: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message><Resource>{_xml(resource)}</Resource>"
        f"<RequestId>{request_id}</RequestId></Error>"
    ).encode()


def _xml(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True  # never holds up the interpreter's exit; stop() joins them itself

    def __init__(self, proxy: S3FaultProxy):
        self.proxy = proxy
        super().__init__(("127.0.0.1", 0), _Handler)

    def process_request(self, request, client_address):
        thread = threading.Thread(target=self.process_request_thread, args=(request, client_address),
                                  name=f"S3FaultProxy-conn:{client_address[1]}", daemon=True)
        self.proxy._add_thread(thread)
        thread.start()

    def handle_error(self, request, client_address):
        import sys

        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return  # a client that went away, or a connection stop() closed: nothing to report
        super().handle_error(request, client_address)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the SDKs expect
    server: _Server
    timeout = 120  # an idle kept-alive connection is closed after this (stop() closes them at once)

    def setup(self):
        super().setup()
        self.server.proxy._track(self.connection, True)

    def finish(self):
        try:
            super().finish()
        finally:
            self.server.proxy._track(self.connection, False)

    def log_message(self, format, *args):  # noqa: A002 - quiet; the proxy keeps its own log
        pass

    # Every method goes through one path.
    def do_GET(self):
        self._proxy()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_OPTIONS = do_PATCH = do_GET

    def _read_body(self) -> tuple[bytes | None, list[tuple[str, str]]]:
        """The request body (None: the request had none) and any HTTP trailers."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks, trailers = [], []
            while True:
                line = self.rfile.readline(65537)
                if not line:
                    raise ConnectionError("the client closed the connection inside a chunked body")
                size = int(line.split(b";", 1)[0].strip(), 16)
                if size == 0:
                    break
                chunk = self.rfile.read(size)
                if len(chunk) < size:
                    raise ConnectionError("the client closed the connection inside a chunk")
                chunks.append(chunk)
                self.rfile.readline(65537)  # CRLF after the chunk
            while True:
                line = self.rfile.readline(65537)
                if line in (b"\r\n", b"\n", b""):
                    break
                name, _, value = line.decode("latin-1").partition(":")
                trailers.append((name.strip(), value.strip()))
            return b"".join(chunks), trailers
        length = self.headers.get("Content-Length")
        if length is None:
            return None, []
        body = self.rfile.read(int(length))
        if len(body) < int(length):
            raise ConnectionError("the client closed the connection inside the body")
        return body, []

    def _proxy(self):
        proxy = self.server.proxy
        body, trailers = self._read_body()
        path, query = _split_path(self.path)
        record = Record(self.command, path, query, {k.lower(): v for k, v in self.headers.items()},
                        len(body or b""))
        rule = proxy._take_rule(record)
        self._noted = False
        try:
            if rule is None:
                self._forward(record, body, trailers)
            else:
                record.fault = rule.mode
                getattr(self, f"_fault_{rule.mode}")(record, rule, body, trailers)
        finally:
            self._note(record)

    def _note(self, record: Record, status: int | None = None) -> None:
        """Count and log the request once, before the client can see the answer (so a test that got its
        response always finds it counted)."""
        if status is not None:
            record.status = status
        if not self._noted:
            self._noted = True
            self.server.proxy._note(record)

    # --- forwarding --------------------------------------------------------------------------------------------
    def _upstream_request(self, body: bytes | None, trailers) -> tuple[http.client.HTTPConnection,
                                                                       http.client.HTTPResponse]:
        proxy = self.server.proxy
        conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=proxy.upstream_timeout)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            drop = HOP_BY_HOP | {"expect", "content-length"}
            drop |= {t.strip().lower() for t in self.headers.get("Connection", "").split(",") if t.strip()}
            for name, value in self.headers.items():  # in order, repeats kept, Host unchanged
                if name.lower() not in drop:
                    conn.putheader(name, value)
            for name, value in trailers:
                conn.putheader(name, value)
            if body is not None:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body if body else None)
            return conn, conn.getresponse()
        except BaseException:
            conn.close()
            raise

    def _relay_head(self, resp: http.client.HTTPResponse, content_length: int | None) -> bytes:
        """The status line and headers for a relayed response, as bytes."""
        lines = [f"HTTP/1.1 {resp.status} {resp.reason}"]
        for name, value in resp.getheaders():
            if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                lines.append(f"{name}: {value}")
        if content_length is not None:
            lines.append(f"Content-Length: {content_length}")
        if self.close_connection:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _response_length(self, resp: http.client.HTTPResponse) -> tuple[int | None, bytes | None]:
        """(Content-Length to send, body already read or None to stream). Bodiless responses keep the upstream's
        Content-Length header (HEAD reports the object's size)."""
        if self.command == "HEAD" or resp.status in (204, 304) or 100 <= resp.status < 200:
            header = resp.getheader("Content-Length")
            return (int(header) if header is not None else None), b""
        if resp.length is not None and not resp.chunked:
            return resp.length, None
        data = resp.read()  # chunked or close-delimited upstream: buffer, send with a length
        return len(data), data

    def _forward(self, record: Record, body: bytes | None, trailers) -> None:
        try:
            conn, resp = self._upstream_request(body, trailers)
        except OSError as err:
            self._send_error(record, 502, "BadGateway", f"upstream unreachable: {err}")
            return
        try:
            length, data = self._response_length(resp)
            head = self._relay_head(resp, length)
            self._note(record, resp.status)
            self.wfile.write(head)
            if data is not None:
                self.wfile.write(data)
                record.response_bytes = len(data)
            else:
                while chunk := resp.read(_BLOCK):
                    self.wfile.write(chunk)
                    record.response_bytes += len(chunk)
            self.wfile.flush()
        finally:
            conn.close()

    # --- faults --------------------------------------------------------------------------------------------------
    def _send_error(self, record: Record, status: int, code: str, message: str, xml: bool = True) -> None:
        request_id = uuid.uuid4().hex[:16].upper()
        xml = xml and self.command != "HEAD"
        payload = error_body(code, message, "/" + record.path, request_id) if xml else b""
        record.response_bytes = len(payload)
        self._note(record, status)
        self.send_response_only(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("x-amz-request-id", request_id)
        self.send_header("Date", self.date_time_string())
        self.send_header("Server", "S3FaultProxy")
        self.end_headers()
        self.wfile.write(payload)
        self.wfile.flush()

    def _fault_error(self, record: Record, rule: Rule, body, trailers) -> None:
        default_code, default_message = ERROR_CODES.get(
            rule.status, ("InternalError" if rule.status >= 500 else "InvalidRequest", "Injected fault"))
        self._send_error(record, rule.status, rule.code or default_code, rule.message or default_message,
                         rule.xml_body)

    def _fault_reset(self, record: Record, rule: Rule, body, trailers) -> None:
        self.close_connection = True
        conn, resp = self._upstream_request(body, trailers)
        try:
            length, data = self._response_length(resp)
            if data is None:
                data = resp.read()
            head = self._relay_head(resp, length)
            self._note(record, resp.status)
            if data:
                cut = len(data) // 2 if rule.partial_bytes is None else min(rule.partial_bytes, len(data) - 1)
                self.wfile.write(head + data[:max(cut, 0)])
                record.response_bytes = max(cut, 0)
            else:  # nothing to truncate: cut the header block short, and reset (see the module's docstring)
                self.wfile.write(head[:len(head) // 2])
            self.wfile.flush()
        finally:
            conn.close()
        self._shutdown(rule.rst or not data)

    def _fault_drop(self, record: Record, rule: Rule, body, trailers) -> None:
        self.close_connection = True
        self._note(record)
        self._shutdown(rule.rst)

    def _fault_hang(self, record: Record, rule: Rule, body, trailers) -> None:
        self.close_connection = True
        deadline = None if rule.hang_s is None else time.monotonic() + rule.hang_s
        proxy = self.server.proxy
        self._note(record)
        while not (rule._released.is_set() or proxy._stopping.is_set()):
            if deadline is not None and time.monotonic() >= deadline:
                break
            rule._released.wait(0.05)
        self._shutdown(rule.rst)

    def _shutdown(self, rst: bool = False) -> None:
        """End the connection: FIN after everything written, or (rst) an abortive close that sends a TCP RST."""
        with contextlib.suppress(OSError):
            self.wfile.flush()
        with contextlib.suppress(OSError):
            if rst:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
            else:
                self.connection.shutdown(socket.SHUT_RDWR)


class S3FaultProxy:
    """A forwarding proxy on 127.0.0.1 (a free port) in front of ``upstream_url`` that counts requests and
    injects faults by rule. Start with ``start()`` or ``with``; ``stop()`` closes every connection and joins
    every thread it started."""

    def __init__(self, upstream_url: str, *, upstream_timeout: float = 60.0):
        parsed = urlsplit(upstream_url if "://" in upstream_url else f"http://{upstream_url}")
        if parsed.scheme != "http":
            raise ValueError(f"the upstream must be plain http, not {upstream_url!r}")
        self.upstream_url = f"http://{parsed.netloc}"
        self.upstream_host = parsed.hostname or "127.0.0.1"
        self.upstream_port = parsed.port or 80
        self.upstream_timeout = upstream_timeout
        self._lock = threading.Lock()
        self._rules: list[Rule] = []
        self._counts: Counter = Counter()
        self.log: list[LogEntry] = []
        self.records: list[Record] = []
        self._connections: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle -------------------------------------------------------------------------------------------------
    def start(self) -> S3FaultProxy:
        if self._server is not None:
            return self
        self._stopping.clear()
        self._server = _Server(self)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"S3FaultProxy:{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()  # the accept loop
        self._thread.join()
        with self._lock:
            connections = list(self._connections)
        for sock in connections:  # wake the handler threads blocked on kept-alive connections
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        server.server_close()  # the listening socket
        with self._lock:
            threads, self._threads = self._threads, []
        for thread in threads:  # each ends promptly now that its socket is shut (or hung requests released)
            thread.join(self.upstream_timeout + 5)

    def __enter__(self) -> S3FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the proxy is not running")
        return self._server.server_address[1]

    @property
    def endpoint(self) -> str:
        """``127.0.0.1:PORT``: pyarrow's ``endpoint_override`` (with ``scheme="http"``)."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``: ``AWS_ENDPOINT_URL`` or boto3's ``endpoint_url``."""
        return f"http://{self.endpoint}"

    # --- clients ---------------------------------------------------------------------------------------------------
    def pyarrow_fs(self, **kwargs: Any):
        """A fresh pyarrow ``S3FileSystem`` pointed at the proxy (path-style, http); kwargs override, e.g.
        ``retry_strategy=pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=1)`` or ``request_timeout=1``."""
        import pyarrow.fs as pafs

        options = {"endpoint_override": self.endpoint, "scheme": "http", "force_virtual_addressing": False,
                   "region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"}
        options.update(kwargs)
        return pafs.S3FileSystem(**options)

    def boto3_client(self, **kwargs: Any):
        import boto3

        return boto3.client("s3", endpoint_url=self.url, **kwargs)

    @contextlib.contextmanager
    def environ(self):
        """Point ``AWS_ENDPOINT_URL`` (and ``AWS_ENDPOINT_URL_S3`` when set, which takes precedence) at the proxy
        for the block, then restore them. Only this process and children started inside the block see it; note
        that ``model.storage`` caches one filesystem per endpoint, so the proxy's port makes it a fresh one."""
        names = ["AWS_ENDPOINT_URL"] + (["AWS_ENDPOINT_URL_S3"] if os.environ.get("AWS_ENDPOINT_URL_S3") else [])
        previous = {name: os.environ.get(name) for name in names}
        os.environ.update(dict.fromkeys(names, self.url))
        try:
            yield self.url
        finally:
            for name, value in previous.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value

    # --- rules -----------------------------------------------------------------------------------------------------
    def fail(self, method: str | None = None, key_pattern: str | re.Pattern | None = None, *,
             times: int | None = 1, status: int = 503, mode: str = "error", code: str | None = None,
             message: str | None = None, skip: int = 0, partial_bytes: int | None = None,
             hang_s: float | None = None, rst: bool = False, xml_body: bool = True,
             match: Callable[[Record], bool] | None = None) -> Rule:
        """Add a fault rule and return it. ``method``/``key_pattern``/``match`` (a predicate on the ``Record``)
        select requests (None: any); ``times`` matching requests fail after ``skip`` are let through, or every
        one until ``clear()``/``rule.cancel()`` when ``times=None``. The first active matching rule wins."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        if times is not None and times < 1:
            raise ValueError("times must be >= 1, or None for 'until cleared'")
        rule = Rule(method=method, key_pattern=key_pattern, times=times, status=status, mode=mode, code=code,
                    message=message, skip=skip, partial_bytes=partial_bytes, hang_s=hang_s, rst=rst,
                    xml_body=xml_body, match=match)
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear(self) -> None:
        """Lift every rule (and release hung requests)."""
        with self._lock:
            rules, self._rules = self._rules, []
        for rule in rules:
            rule.cancel()

    @property
    def rules(self) -> list[Rule]:
        with self._lock:
            return [r for r in self._rules if r.active]

    def _take_rule(self, record: Record) -> Rule | None:
        with self._lock:
            for rule in self._rules:
                if not rule.active or not rule.matches(record):
                    continue
                if rule.skip > 0:
                    rule.skip -= 1
                    continue
                rule.hits += 1
                if rule.times is not None and rule.hits >= rule.times:
                    rule.active = False
                    self._rules.remove(rule)
                return rule
        return None

    # --- accounting ------------------------------------------------------------------------------------------------
    def _note(self, record: Record) -> None:
        with self._lock:
            self._counts[(record.method, record.path)] += 1
            self.log.append(LogEntry(record.method, record.path, record.status))
            self.records.append(record)

    def _add_thread(self, thread: threading.Thread) -> None:
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]

    def _track(self, sock: socket.socket, alive: bool) -> None:
        with self._lock:
            (self._connections.add if alive else self._connections.discard)(sock)
            if alive and self._stopping.is_set():  # accepted just as stop() ran: close it now
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def count(self, method: str | None = None, path: str | None = None) -> int:
        """Requests received (faulted ones included) for ``method`` (None: any) and ``"bucket/key"`` (None: any;
        a glob such as ``"bucket/in/*"`` also works)."""
        with self._lock:
            items = list(self._counts.items())
        return sum(n for (m, p), n in items
                   if (method is None or m == method.upper())
                   and (path is None or p == path or fnmatch.fnmatchcase(p, path)))

    @property
    def counts(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self._counts)

    def reset(self) -> None:
        """Forget counts, log and records (rules stay)."""
        with self._lock:
            self._counts.clear()
            self.log = []
            self.records = []


@contextlib.contextmanager
def s3_fault_proxy(upstream_url: str | None = None, *, set_env: bool = False, **kwargs: Any):
    """``with s3_fault_proxy(s3_endpoint) as proxy:`` a running ``S3FaultProxy`` (upstream: the argument, else
    ``AWS_ENDPOINT_URL``); ``set_env=True`` also points ``AWS_ENDPOINT_URL`` at it for the block."""
    upstream = upstream_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not upstream:
        raise ValueError("no upstream S3 endpoint: pass one or set AWS_ENDPOINT_URL")
    with S3FaultProxy(upstream, **kwargs) as proxy:
        if set_env:
            with proxy.environ():
                yield proxy
        else:
            yield proxy


@pytest.fixture()
def s3_faults(s3_endpoint):
    """An ``S3FaultProxy`` in front of the session's moto server, stopped after the test. ``AWS_ENDPOINT_URL``
    is left alone: point clients at ``proxy.url`` / ``proxy.pyarrow_fs()`` or use ``with proxy.environ():``.
    To use it from a conftest: ``from tests.support.s3_faults import s3_faults  # noqa: F401``."""
    with S3FaultProxy(s3_endpoint) as proxy:
        yield proxy
