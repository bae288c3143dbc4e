"""Shared fixtures: real local services (a moto S3 server on 127.0.0.1), tiny checkpoints, test images."""

from __future__ import annotations

import io
import logging
import os
import shutil
import socket
import tempfile

import pytest

# Set before anything imports boto3, pyarrow's S3 or huggingface_hub: nothing may leave this machine.
os.environ.update({
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",  # the same for every cluster and client the tests start
    # Ray otherwise resolves 127.0.0.1 to the host's network address; with cluster mode off every Ray instance
    # the tests start (and every job's own) binds and advertises loopback only.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    # the node-local checkpoint cache: this session's own, never the user's ~/.cache
    "UNIFILTER_CACHE_DIR": tempfile.mkdtemp(prefix="unifilter-test-cache-"),
})
os.environ.pop("AWS_PROFILE", None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def jpeg_bytes(color="red", size=(120, 80), fmt="JPEG") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1; AWS_ENDPOINT_URL points every client at it for the session."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    previous = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    try:
        yield endpoint
    finally:
        server.stop()
        if previous is None:
            os.environ.pop("AWS_ENDPOINT_URL", None)
        else:
            os.environ["AWS_ENDPOINT_URL"] = previous


@pytest.fixture()
def s3_bucket(s3_endpoint, request):
    """A fresh bucket on the moto server; yields its name."""
    import boto3

    name = "t-" + request.node.name.lower().replace("_", "-")[:40].strip("-") + f"-{free_port()}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A random-initialised tiny regression checkpoint (num_labels 1), written once per session."""
    from model.create import create

    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    create("tiny", str(path), num_labels=1, seed=0)
    return str(path)


@pytest.fixture(scope="session")
def tiny_checkpoint_4way(tmp_path_factory):
    from model.create import create

    path = tmp_path_factory.mktemp("ckpt") / "tiny4"
    create("tiny", str(path), num_labels=4, seed=1)
    return str(path)


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint):
    """One local Ray instance for the session (started after the S3 server, so workers inherit its endpoint).
    Yields the GCS address, so subprocess jobs can join it through RAY_ADDRESS."""
    import ray

    # address="local": always a new instance of this session's own, never one that `ray start` left on this host
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def job_env(**extra) -> dict:
    """Environment for a job run as a subprocess (the same Python, the repo importable)."""
    import sys

    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")  # `python` is this venv's
    env = dict(os.environ, PATH=path, PYTHONPATH=REPO_ROOT, PYTHONUNBUFFERED="1", RAY_AUTH_MODE="disabled")
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """`ray start --head` on 127.0.0.1 with its dashboard (job submission) on loopback; stopped at teardown.
    Runs in the foreground (--block) in its own temp dir, so stopping it touches no other Ray instance."""
    import subprocess
    import sys
    import time
    import urllib.request

    port, dashboard = free_port(), free_port()
    # Every port explicit: the session's in-process Ray already holds the defaults (e.g. the agent's 52365).
    ports = {f"--{name}": free_port() for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port",
        "ray-client-server-port", "node-manager-port", "object-manager-port")}
    temp_dir = tempfile.mkdtemp(prefix="rayhead-", dir="/tmp")
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    proc = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--temp-dir={temp_dir}", "--disable-usage-stats", *(f"{k}={v}" for k, v in ports.items())],
        env=job_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    url = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("ray start --head did not bring up its dashboard within 90 s")
    # The job agent registers a little after the dashboard answers: wait until a trivial job goes through.
    while time.time() < deadline:
        probe = subprocess.run([ray_bin, "job", "submit", "--address", url, "--", "python", "-c", "pass"],
                               env=job_env(), capture_output=True, text=True, timeout=120)
        if probe.returncode == 0:
            break
        time.sleep(1)
    else:
        proc.kill()
        pytest.fail(f"the local cluster never accepted a job: {probe.stderr[-500:]}")
    try:
        yield {"dashboard": url, "gcs": f"127.0.0.1:{port}"}
    finally:
        import signal

        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)
