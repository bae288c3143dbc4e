"""Shared fixtures: real local services (a moto S3 server on 127.0.0.1), tiny checkpoints, test images."""

from __future__ import annotations

import io
import logging
import os
import socket

import pytest

# Set before anything imports boto3, pyarrow's S3 or huggingface_hub: nothing may leave this machine.
os.environ.update({
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
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
