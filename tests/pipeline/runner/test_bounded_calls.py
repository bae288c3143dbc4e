"""A call to a stage's actor is bounded in bytes as well as rows: Ray Data gathers rows of ordinary size into calls
of `batch_size` rows as before, and rows a thousand times bigger into calls of fewer rows, not of a thousand times
the bytes."""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipeline.runner.ray_compat import calls_bounded_in_bytes, calls_unbounded

ROWS_PER_CALL = 256


class Reader:
    """A stand-in read stage: per input row, 4 blocks of 64 rows of `row_bytes` each."""

    def __call__(self, batch: pa.Table):
        for size in batch.column("row_bytes").to_pylist():
            for _ in range(4):
                yield pa.table({"payload": [b"x" * size] * 64})


class CallSizes:
    """A stand-in model stage: what each call it gets holds."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.table({"rows": [batch.num_rows], "bytes": [batch.nbytes]})


def calls(row_bytes: int) -> list[dict]:
    import ray

    ds = ray.data.from_items([{"row_bytes": row_bytes}] * 4, override_num_blocks=4)
    ds = ds.map_batches(Reader, batch_size=1, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=1))
    ds = ds.map_batches(CallSizes, batch_size=ROWS_PER_CALL, batch_format="pyarrow",
                        compute=ray.data.ActorPoolStrategy(size=1))
    return ds.take_all()


@pytest.fixture
def bound(ray_cluster):
    calls_bounded_in_bytes(2**20)
    yield 2**20
    calls_unbounded()


def test_rows_of_ordinary_size_fill_calls_of_batch_size_rows(bound):
    sizes = calls(row_bytes=100)  # 1,024 rows of 100 bytes: 100 KB in all
    assert [c["rows"] for c in sizes] == [ROWS_PER_CALL] * 4


def test_big_rows_come_in_calls_of_fewer_rows_bounded_in_bytes(bound):
    sizes = calls(row_bytes=50_000)  # 1,024 rows of 50 KB: without the bound, calls of 256 rows, 12.8 MB
    assert sum(c["rows"] for c in sizes) == 1024
    assert max(c["bytes"] for c in sizes) <= 2.5 * bound and max(c["rows"] for c in sizes) < ROWS_PER_CALL
