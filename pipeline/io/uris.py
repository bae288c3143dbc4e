"""URIs and filesystems: the model library's one URI-to-filesystem helper (honouring `AWS_ENDPOINT_URL`, any fsspec
filesystem besides), and what Ray workers need to reach the same stores as the driver."""

from __future__ import annotations

import os

from model.storage import (
    FSSPEC_IMPORTS_ENV,
    filesystem_for,
    is_local,
    is_remote,
    join,
    normalize_uri,
    scheme_of,
    to_uri,
)

__all__ = ["filesystem_for", "is_local", "is_remote", "join", "normalize_uri", "scheme_of", "storage_env", "to_uri"]

_STORAGE_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", FSSPEC_IMPORTS_ENV)


def storage_env() -> dict[str, str]:
    """What Ray workers need to reach the same object store as the driver: the endpoint and region variables
    that are set (never credentials, which come from each node's own environment or instance role)."""
    return {k: os.environ[k] for k in _STORAGE_ENV if os.environ.get(k)}
