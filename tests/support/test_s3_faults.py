"""Self-test of the fault-injecting S3 proxy (tests/support/s3_faults.py): faithful forwarding to the session's
moto server for boto3 and pyarrow, request counts, and what pyarrow's S3 client (AWS SDK C++, standard retry
strategy, 3 attempts) does on each fault mode. No Ray."""

from __future__ import annotations

import http.client
import http.server
import json
import os
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support.s3_faults import S3FaultProxy, s3_fault_proxy

MB = 1024 * 1024


@pytest.fixture()
def proxy(s3_endpoint):
    with S3FaultProxy(s3_endpoint) as p:
        yield p


@pytest.fixture()
def fs(proxy):
    return proxy.pyarrow_fs()


@pytest.fixture()
def s3(proxy):
    """boto3 through the proxy, without botocore's own retries (so every fault surfaces)."""
    from botocore.config import Config

    return proxy.boto3_client(config=Config(retries={"total_max_attempts": 1, "mode": "standard"}))


@pytest.fixture()
def direct(s3_endpoint):
    """boto3 straight to moto, to check what really reached the store."""
    import boto3

    return boto3.client("s3", endpoint_url=s3_endpoint)


def put(client, bucket, key, data: bytes) -> None:
    client.put_object(Bucket=bucket, Key=key, Body=data)


# --- faithful forwarding ---------------------------------------------------------------------------------------------

def test_boto3_put_get_list_head_delete_through_the_proxy(proxy, s3, direct, s3_bucket):
    s3.put_object(Bucket=s3_bucket, Key="dir/a b.txt", Body=b"hello")
    assert direct.get_object(Bucket=s3_bucket, Key="dir/a b.txt")["Body"].read() == b"hello"
    assert s3.get_object(Bucket=s3_bucket, Key="dir/a b.txt")["Body"].read() == b"hello"
    assert s3.head_object(Bucket=s3_bucket, Key="dir/a b.txt")["ContentLength"] == 5
    listed = s3.list_objects_v2(Bucket=s3_bucket, Prefix="dir/")
    assert [o["Key"] for o in listed["Contents"]] == ["dir/a b.txt"]
    s3.delete_object(Bucket=s3_bucket, Key="dir/a b.txt")
    assert direct.list_objects_v2(Bucket=s3_bucket).get("KeyCount") == 0

    key = f"{s3_bucket}/dir/a b.txt"  # percent-decoded
    assert [(e.method, e.path, e.status) for e in proxy.log] == [
        ("PUT", key, 200), ("GET", key, 200), ("HEAD", key, 200), ("GET", s3_bucket, 200), ("DELETE", key, 204)]
    assert proxy.count("GET", key) == 1 and proxy.count("PUT", key) == 1 and proxy.count("GET", s3_bucket) == 1
    assert proxy.count(path=key) == 4 and proxy.count() == 5 and proxy.count("GET", f"{s3_bucket}/dir/*") == 1
    assert "list-type=2" in proxy.records[3].query
    proxy.reset()
    assert proxy.log == [] and proxy.count() == 0


def test_pyarrow_writes_and_reads_a_multi_mb_object_and_a_range(proxy, fs, direct, s3_bucket):
    data = os.urandom(12 * MB + 12345)
    with fs.open_output_stream(f"{s3_bucket}/big.bin") as out:
        out.write(data)
    # What reached moto is the object (multipart upload: the SDK streams the parts as aws-chunked bodies).
    assert direct.get_object(Bucket=s3_bucket, Key="big.bin")["Body"].read() == data
    puts = [r for r in proxy.records if r.method == "PUT"]
    assert puts and all(r.status == 200 for r in puts)
    assert sum(r.request_bytes for r in puts) >= len(data)

    proxy.reset()
    assert fs.get_file_info(f"{s3_bucket}/big.bin").size == len(data)
    assert fs.open_input_stream(f"{s3_bucket}/big.bin").read() == data
    with fs.open_input_file(f"{s3_bucket}/big.bin") as f:
        assert f.read_at(1000, 5 * MB) == data[5 * MB:5 * MB + 1000]
    ranged = [r for r in proxy.records if r.method == "GET"]
    assert all(r.status == 206 for r in ranged)
    assert ranged[-1].headers.get("range") == f"bytes={5 * MB}-{5 * MB + 999}"
    assert sum(r.response_bytes for r in ranged) == len(data) + 1000
    assert proxy.count("HEAD", f"{s3_bucket}/big.bin") >= 1
    assert proxy.count("GET", f"{s3_bucket}/big.bin") == len(ranged)


def _storage_module():
    """model/storage.py on its own (it needs only pyarrow): importing the `model` package would pull in torch."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "..", "model", "storage.py")
    spec = importlib.util.spec_from_file_location("_storage_for_s3_faults_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_environ_points_model_storage_and_boto3_at_the_proxy_and_restores(s3_endpoint, s3_bucket, direct):
    import boto3

    storage = _storage_module()
    put(direct, s3_bucket, "k.txt", b"via env")
    before = os.environ["AWS_ENDPOINT_URL"]
    with s3_fault_proxy(s3_endpoint, set_env=True) as proxy:
        assert os.environ["AWS_ENDPOINT_URL"] == proxy.url
        fs, path = storage.filesystem_for(f"s3://{s3_bucket}/k.txt")
        assert fs.open_input_stream(path).read() == b"via env"
        assert boto3.client("s3").get_object(Bucket=s3_bucket, Key="k.txt")["Body"].read() == b"via env"
        assert proxy.count("GET", f"{s3_bucket}/k.txt") == 2
    assert os.environ["AWS_ENDPOINT_URL"] == before


# --- pyarrow against each fault mode ---------------------------------------------------------------------------------

@pytest.fixture()
def obj(direct, s3_bucket):
    """A 64 KiB object: large enough that an S3 XML error body fits the SDK's read buffer (see the tiny test)."""
    data = os.urandom(64 * 1024)
    put(direct, s3_bucket, "in/000.tar", data)
    return f"{s3_bucket}/in/000.tar", data


def gets(proxy, path):
    return [e.status for e in proxy.log if e.method == "GET" and e.path == path]


def test_two_503s_are_absorbed_by_the_sdk_retries(proxy, fs, obj):
    path, data = obj
    rule = proxy.fail(method="GET", key_pattern="in/000.tar", times=2, status=503)
    assert fs.open_input_stream(path).read() == data
    assert proxy.count("GET", path) == 3 and gets(proxy, path) == [503, 503, 206]
    assert rule.hits == 2 and rule.remaining == 0 and proxy.rules == []


@pytest.mark.parametrize("status", [503, 500])
def test_a_failure_on_every_get_reaches_python_as_oserror(proxy, fs, obj, status):
    path, data = obj
    proxy.fail(method="GET", key_pattern="in/000.tar", times=None, status=status)
    with pytest.raises(OSError, match="GetObject"):
        fs.open_input_stream(path).read()
    assert proxy.count("GET", path) == 3  # AwsStandardS3RetryStrategy(max_attempts=3)
    proxy.clear()
    assert fs.open_input_stream(path).read() == data


def test_404_and_403_are_not_retried(proxy, fs, obj):
    """The SDK names the error from the XML body when it parses it, else from the status (both are seen)."""
    path, _ = obj
    proxy.fail(method="GET", key_pattern="in/000.tar", times=None, status=404)
    with pytest.raises(OSError, match="(NO_SUCH_KEY|RESOURCE_NOT_FOUND) during GetObject"):
        fs.open_input_stream(path).read()
    proxy.clear()
    proxy.fail(method="GET", key_pattern="in/000.tar", times=None, status=403)
    with pytest.raises(OSError, match="ACCESS_DENIED during GetObject"):
        fs.open_input_stream(path).read()
    assert gets(proxy, path) == [404, 403]


def test_a_5xx_with_an_xml_body_on_a_tiny_read_is_not_retried(proxy, fs, direct, s3_bucket):
    """The SDK writes an error body into pyarrow's read buffer, sized to the range: an XML error longer than the
    read overflows it, the transfer is aborted and the status lost (INTERNAL_FAILURE, not retryable). A 5xx without
    a body is retried as usual."""
    put(direct, s3_bucket, "tiny", b"hello")
    path = f"{s3_bucket}/tiny"
    proxy.fail(method="GET", key_pattern="tiny", times=2, status=503)
    with pytest.raises(OSError, match="INTERNAL_FAILURE.*Failed to flush response stream"):
        fs.open_input_stream(path).read()
    assert gets(proxy, path) == [503]
    proxy.clear()
    proxy.fail(method="GET", key_pattern="tiny", times=2, status=503, xml_body=False)
    assert fs.open_input_stream(path).read() == b"hello"
    assert gets(proxy, path) == [503, 503, 503, 206]


def test_reset_mid_body_is_retried_by_the_sdk(proxy, fs, obj):
    path, data = obj
    proxy.fail(method="GET", key_pattern="in/000.tar", times=1, mode="reset")
    assert fs.open_input_stream(path).read() == data
    assert proxy.count("GET", path) == 2
    assert [r.fault for r in proxy.records if r.method == "GET"] == ["reset", None]
    assert proxy.records[-2].response_bytes == len(data) // 2

    proxy.reset()
    proxy.fail(method="GET", key_pattern="in/000.tar", times=None, mode="reset")  # FIN after half the body
    with pytest.raises(OSError, match="NETWORK_CONNECTION.*curlCode: 18"):
        fs.open_input_stream(path).read()
    assert proxy.count("GET", path) == 3

    proxy.clear()
    proxy.reset()
    proxy.fail(method="GET", key_pattern="in/000.tar", times=None, mode="reset", rst=True)  # TCP RST
    with pytest.raises(OSError, match="NETWORK_CONNECTION.*curlCode: 56"):
        fs.open_input_stream(path).read()
    assert proxy.count("GET", path) == 3


def test_drop_and_head_faults(proxy, fs, obj):
    path, data = obj
    proxy.fail(method="GET", key_pattern="in/000.tar", times=1, mode="drop")
    assert fs.open_input_stream(path).read() == data
    assert gets(proxy, path) == [None, 206]

    proxy.reset()
    proxy.fail(method="HEAD", key_pattern="in/000.tar", times=2, status=503)
    assert fs.get_file_info(path).size == len(data)
    proxy.fail(method="HEAD", key_pattern="in/000.tar", times=None, mode="reset")  # cut headers, RST
    with pytest.raises(OSError, match="HeadObject"):
        fs.get_file_info(path)
    assert proxy.count("HEAD", path) == 3 + 3
    proxy.clear()
    proxy.fail(method="HEAD", key_pattern="in/000.tar", times=None, status=500)
    with pytest.raises(OSError, match=r"HTTP status 500.*HeadObject"):
        fs.open_input_stream(path)


def test_hang_until_the_client_times_out(proxy, obj):
    path, data = obj
    fs = proxy.pyarrow_fs(request_timeout=1, connect_timeout=1)
    proxy.fail(method="GET", key_pattern="in/000.tar", times=1, mode="hang")
    start = time.monotonic()
    assert fs.open_input_stream(path).read() == data  # curl gives up after ~1 s (< 1 byte/s), the SDK retries
    assert time.monotonic() - start >= 1
    assert gets(proxy, path) == [None, 206]


def test_a_hung_request_is_released_by_clear(proxy, s3, obj):
    path, data = obj
    proxy.fail(method="GET", key_pattern="in/000.tar", times=None, mode="hang")
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(s3.get_object, Bucket=path.split("/")[0], Key="in/000.tar")
        deadline = time.monotonic() + 5
        while proxy.count("GET", path) == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not future.done()
        proxy.clear()
        with pytest.raises(Exception, match="(?i)connection|closed|endpoint"):
            future.result(timeout=10)


def test_put_faults(proxy, fs, direct, s3_bucket):
    path = f"{s3_bucket}/out/x.bin"
    proxy.fail(method="PUT", key_pattern="out/*", times=2, status=503)
    with fs.open_output_stream(path) as out:
        out.write(b"x" * 1000)
    assert [e.status for e in proxy.log if e.method == "PUT"] == [503, 503, 200]

    proxy.fail(method="PUT", key_pattern="out/*", times=None, status=503)
    with pytest.raises(OSError, match="UploadPart"), fs.open_output_stream(f"{s3_bucket}/out/y.bin") as out:
        out.write(b"y" * 1000)
    proxy.clear()
    # A reset after the store took the part: the client cannot tell, retries, and the object is whole.
    proxy.fail(method="PUT", key_pattern="out/z.bin", times=1, mode="reset")
    with fs.open_output_stream(f"{s3_bucket}/out/z.bin") as out:
        out.write(b"z" * 1000)
    assert direct.get_object(Bucket=s3_bucket, Key="out/z.bin")["Body"].read() == b"z" * 1000
    assert proxy.count("PUT", f"{s3_bucket}/out/z.bin") == 2
    assert "out/y.bin" not in {o["Key"] for o in direct.list_objects_v2(Bucket=s3_bucket)["Contents"]}


# --- rules -----------------------------------------------------------------------------------------------------------

def test_rules_are_consumed_once_per_match_across_parallel_connections(proxy, s3, direct, s3_bucket):
    from botocore.exceptions import ClientError

    put(direct, s3_bucket, "p", b"payload")
    rule = proxy.fail(method="GET", key_pattern="p", times=7, status=503)

    def get(_):
        try:
            return s3.get_object(Bucket=s3_bucket, Key="p")["Body"].read()
        except ClientError as err:
            return err.response["Error"]["Code"]

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(get, range(48)))
    assert results.count("SlowDown") == 7 and results.count(b"payload") == 41
    assert rule.hits == 7 and proxy.count("GET", f"{s3_bucket}/p") == 48


def test_rule_matching(proxy, s3, direct, s3_bucket):
    from botocore.exceptions import ClientError

    for key in ("a/1", "a/2", "b/1"):
        put(direct, s3_bucket, key, key.encode())

    def code(key, method=s3.get_object):
        try:
            method(Bucket=s3_bucket, Key=key)
            return "ok"
        except ClientError as err:
            return err.response["Error"]["Code"]

    proxy.fail(key_pattern=f"{s3_bucket}/a/*", times=None, status=500)  # any method, bucket-qualified glob
    assert [code("a/1"), code("a/2"), code("b/1"), code("a/1", s3.head_object)] == ["InternalError"] * 2 + ["ok", "500"]
    proxy.clear()
    proxy.fail(method="GET", key_pattern=re.compile(r"/b/\d$"), times=1, status=403, skip=1)
    assert [code("b/1"), code("b/1"), code("b/1")] == ["ok", "AccessDenied", "ok"]
    proxy.fail(method="GET", times=None, status=503, code="ServiceUnavailable", match=lambda r: r.path.endswith("2"))
    assert [code("a/1"), code("a/2")] == ["ok", "ServiceUnavailable"]
    with pytest.raises(ValueError):
        proxy.fail(mode="explode")


# --- the HTTP layer itself, against a recording upstream -------------------------------------------------------------

class _Recorder(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_PUT(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.seen.append((self.command, self.path, self.headers.items(), body))
        payload = json.dumps({"n": len(body)}).encode()
        self.send_response(201)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("ETag", '"abc"')
        self.end_headers()
        self.wfile.write(payload)

    def do_HEAD(self):
        self.server.seen.append((self.command, self.path, self.headers.items(), b""))
        self.send_response(200)
        self.send_header("Content-Length", "123456")
        self.end_headers()


@pytest.fixture()
def recorder():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    server.seen = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def read_response(f, body: bool = True) -> tuple[int, dict, bytes]:
    status = int(f.readline().split()[1])
    headers = {}
    while (line := f.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, f.read(int(headers.get("content-length", 0))) if body else b""


def test_forwarding_keeps_host_and_headers_and_dechunks_with_expect_continue(recorder):
    with S3FaultProxy(f"http://127.0.0.1:{recorder.server_address[1]}") as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
            f = sock.makefile("rb")
            sock.sendall(b"PUT /bkt/some%20key?partNumber=1&uploadId=u%2B1 HTTP/1.1\r\n"
                         b"Host: bkt.s3.example.com:9000\r\nX-Amz-Date: 20240101T000000Z\r\n"
                         b"Authorization: AWS4-HMAC-SHA256 Credential=x, SignedHeaders=host;x-amz-date, Signature=0\r\n"
                         b"Content-Encoding: aws-chunked\r\nExpect: 100-continue\r\n"
                         b"Transfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n")
            assert f.readline().startswith(b"HTTP/1.1 100")
            assert f.readline() == b"\r\n"
            sock.sendall(b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nx-amz-checksum-crc32: AAAA\r\n\r\n")
            status, headers, body = read_response(f)
            assert (status, json.loads(body), headers["etag"]) == (201, {"n": 11}, '"abc"')
            # The same connection again (keep-alive), a HEAD: the upstream's Content-Length is relayed, no body.
            sock.sendall(b"HEAD /bkt/k HTTP/1.1\r\nHost: h\r\n\r\n")
            status, headers, _ = read_response(f, body=False)
            assert (status, headers["content-length"]) == (200, "123456")
        method, path, headers, body = recorder.seen[0]
        names = [n.lower() for n, _ in headers]
        assert (method, path, body) == ("PUT", "/bkt/some%20key?partNumber=1&uploadId=u%2B1", b"hello world")
        assert dict(headers)["Host"] == "bkt.s3.example.com:9000"  # unchanged, first as sent
        assert names[:2] == ["host", "x-amz-date"]
        assert dict(headers)["Content-Length"] == "11" and dict(headers)["Content-Encoding"] == "aws-chunked"
        assert dict(headers)["x-amz-checksum-crc32"] == "AAAA"  # the trailer
        assert not {"expect", "transfer-encoding", "connection"} & set(names)
        assert recorder.seen[1][0] == "HEAD"
        assert proxy.log == [("PUT", "bkt/some key", 201), ("HEAD", "bkt/k", 200)]
        assert proxy.records[0].query == "partNumber=1&uploadId=u%2B1" and proxy.records[0].request_bytes == 11


def test_an_unreachable_upstream_is_a_502(s3_endpoint):
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    dead = port.getsockname()[1]
    port.close()
    with S3FaultProxy(f"http://127.0.0.1:{dead}") as proxy:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        conn.request("GET", "/bkt/k")
        resp = conn.getresponse()
        assert resp.status == 502 and b"<Code>BadGateway</Code>" in resp.read()
        conn.close()


def test_stop_closes_kept_alive_connections_and_joins_every_thread(s3_endpoint, s3_bucket, direct):
    put(direct, s3_bucket, "k", b"v")
    proxy = S3FaultProxy(s3_endpoint).start()
    port = proxy.port
    fs = proxy.pyarrow_fs()
    assert fs.open_input_stream(f"{s3_bucket}/k").read() == b"v"  # curl keeps its connections open
    idle = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    idle.request("HEAD", f"/{s3_bucket}/k")
    idle.getresponse().read()
    proxy.fail(method="GET", times=None, mode="hang")
    hung = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    hung.request("GET", "/x/y")
    deadline = time.monotonic() + 5
    while not proxy.count("GET", "x/y") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert any(t.name.startswith("S3FaultProxy") for t in threading.enumerate())
    start = time.monotonic()
    proxy.stop()
    assert time.monotonic() - start < 5
    assert not [t for t in threading.enumerate() if t.name.startswith("S3FaultProxy")]
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    for conn in (idle, hung):  # both were closed by the proxy
        assert conn.sock.recv(1) == b""
        conn.close()
    proxy.stop()  # idempotent
