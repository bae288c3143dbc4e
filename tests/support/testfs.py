"""A filesystem pyarrow has no native support for, as a user's fsspec package would bring one (gcsfs, adlfs):
`testdir://<absolute path>`, backed by the local disk so Ray's worker processes see the same files. Importing
this module registers it; jobs import it where `UNIFILTER_FSSPEC_IMPORTS` names it."""

from __future__ import annotations

import fsspec
from fsspec.implementations.local import LocalFileSystem


class TestDirFileSystem(LocalFileSystem):
    protocol = ("testdir",)
    root_marker = "/"

    @classmethod
    def _strip_protocol(cls, path):
        path = path[len("testdir://"):] if str(path).startswith("testdir://") else str(path)
        return super()._strip_protocol(path)


fsspec.register_implementation("testdir", TestDirFileSystem, clobber=True)
