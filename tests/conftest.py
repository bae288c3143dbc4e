"""Shared fixtures, used by name (never imported): real local services (a moto S3 server and Ray on 127.0.0.1, a
job server), tiny checkpoints. Helpers the tests share live in tests/support/."""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile

import pytest

from tests.support.ports import free_port

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


def pytest_collection_modifyitems(items):
    """With two workers (`make test`: pytest-xdist, `--dist loadgroup`), the tests that submit jobs to the session's
    job server all run on one worker, which starts it once."""
    for item in items:
        if "token_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("job-server"))


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

    name = "t-" + re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower())[:40].strip("-") + f"-{free_port()}"
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


@pytest.fixture(scope="session")
def token_cluster(tmp_path_factory):
    """The session's job server: `ray start --head` on 127.0.0.1 as aws.yaml starts a node: RAY_AUTH_MODE=token in
    its environment, and in its ~/.ray/auth_token the token made on the user's machine with `ray get-auth-token
    --generate` (file_mounts). Every port explicit, its own temp dir; stopped at teardown. Yields its dashboard
    URL, the user's home (holding the token in ~/.ray) and the token."""
    import signal
    import subprocess
    import time
    import urllib.error
    import urllib.request

    from tests.support.cluster import RAY, ray_env, submit

    base = tmp_path_factory.mktemp("token-cluster")
    user_home, node_home = base / "user", base / "node"
    user_home.mkdir()
    subprocess.run([RAY, "get-auth-token", "--generate"], env=ray_env(user_home), check=True, capture_output=True,
                   timeout=120)
    token_file = user_home / ".ray" / "auth_token"
    (node_home / ".ray").mkdir(parents=True)
    shutil.copy(token_file, node_home / ".ray" / "auth_token")
    dashboard = free_port()
    ports = {f"--{name}": free_port() for name in (
        "port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
        "metrics-export-port", "ray-client-server-port", "node-manager-port", "object-manager-port")}
    temp_dir = tempfile.mkdtemp(prefix="raytoken-", dir="/tmp")
    proc = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=2", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--temp-dir={temp_dir}",
         "--disable-usage-stats", *(f"{k}={v}" for k, v in ports.items())],
        env=ray_env(node_home, RAY_AUTH_MODE="token"), stdout=open(base / "head.log", "w"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{dashboard}"
    with_token = ray_env(user_home, RAY_AUTH_MODE="token")
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{url}/api/version", timeout=2).close()
            except urllib.error.HTTPError:
                break  # it answers (401: the token is required)
            except OSError:
                time.sleep(0.5)
        while time.time() < deadline:  # the job agent registers a little after the dashboard answers
            probe = submit(url, with_token, "python", "-c", "pass")
            if probe.returncode == 0:
                break
            time.sleep(1)
        else:
            pytest.fail("the token-auth cluster never accepted a job: " + (base / "head.log").read_text()[-3000:])
        yield {"dashboard": url, "user_home": user_home, "token": token_file.read_text().strip()}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)
