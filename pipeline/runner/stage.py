"""Stages with a lifecycle (NeMo Curator's shape), mapped to Ray Data by one adapter (`StageActor`).

A stage is a plain object built on the driver from a typed config. It declares the `Resources` each of its actors
holds, does its heavy set-up in `setup()` (once per actor, never in the constructor, so building one on the driver
costs nothing) and implements only its own work:

- `ShardStage.process_shard(shard)`: a generator of the rows of one input shard (tables or lists of dicts); what it
  returns is recorded with the shard's commit (its own counts, the files it wrote). The base class decodes the
  runner's input (groups of shards), counts the rows, appends the shard's end marker, and turns a fault, or any
  failure of its own, into the shard's failed marker: the shard stays uncommitted and is named.
- `TableStage.process_table(table)`: rows in, rows out (the model stage). Marker rows pass around it untouched.

Stages run without Ray too: call one with a batch (tests and benchmarks do).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.commit.markers import end_marker, failed_marker, is_marker, marker_table
from pipeline.errors import Category, DeviceFault, ShardFault
from pipeline.io.listing import Shard


@dataclass(frozen=True)
class Resources:
    """What each actor of a stage holds, and the pool's bounds. `batch_size`: rows per call of a table stage
    (None: each block as it comes); a shard stage gets one group of shards per call. `concurrent_calls`: calls an
    actor runs at once (its stage must be thread-safe). `accelerator_type` pins the GPU type (`H200`, `L40S`);
    `custom`: other resources each actor needs (a node label, say)."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    min_actors: int = 1
    max_actors: int = 1
    batch_size: int | None = None
    concurrent_calls: int = 1
    accelerator_type: str | None = None
    custom: dict | None = None


class Stage:
    """A stage's lifecycle: built on the driver, `setup()` once per actor, then called with batches, then
    `teardown()` once as the actor ends (the local executor's run ends; on Ray, the actor exits gracefully: not
    after a kill or a crash, where the process takes its threads with it).

    Ray restarts an actor whose process dies (a node lost, a process killed) and retries the call it was on, a
    bounded number of times (Ray Data's own default is without end): `restarts` over the actor's life (a long run's
    node losses included), `call_retries` for one call. A call that keeps killing its actor ends the run naming the
    stage; a stage that can tell which of its inputs kills it (scoring's fault journal) asks for more."""

    name = "stage"
    schema: pa.Schema  # the rows it hands on (the wire columns and its own)
    restarts = 64
    call_retries = 3

    def __init__(self, resources: Resources):
        self.resources = resources

    def setup(self) -> None:
        """Heavy set-up, once per actor: load a model, open a client."""

    def teardown(self) -> None:
        """Release what `setup` took (threads, clients), once, at the actor's end."""

    def __call__(self, batch: pa.Table):
        raise NotImplementedError

    def table(self, rows: pa.Table | list[dict]) -> pa.Table:
        """Rows as a table of this stage's schema (missing columns null)."""
        if isinstance(rows, pa.Table):
            columns = {f.name: rows.column(f.name) if f.name in rows.column_names else pa.nulls(rows.num_rows, f.type)
                       for f in self.schema}
            return pa.table(columns).cast(self.schema)
        return pa.Table.from_pylist([{name: row.get(name) for name in self.schema.names} for row in rows],
                                    schema=self.schema)


def shards_of(batch: pa.Table) -> Iterator[Shard]:
    """The shards of the runner's input rows (each row a group of shards: `shard_groups`)."""
    for group in batch.column("shards").to_pylist():
        for fields in group:
            yield Shard(**fields)


def shard_rows(groups: list[list[Shard]]) -> list[dict]:
    """The runner's input rows for groups of shards (what `shards_of` decodes)."""
    return [{"shards": [asdict(s) for s in group]} for group in groups]


class ShardStage(Stage):
    """Reads whole shards; `rows_per_sample` rows make one of the shard's samples (the end marker counts samples).

    On Ray each shard is held in the run's work ledger while it is read (`ledger`, set by the executor;
    `pipeline.runner.deaths`): a shard whose reader's process dies `SHARD_DEATHS` times (a crash in a native decoder,
    a memory kill) is not read again but closed with a failed marker naming it, so the run finishes and the rest of
    its call commits; a rerun tries it again."""

    rows_per_sample = 1
    call_retries = 8  # room for a few shards in one call that kill their reader, each SHARD_DEATHS times
    ledger: str | None = None

    def process_shard(self, shard: Shard) -> Iterator[pa.Table | list[dict]]:
        raise NotImplementedError

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        for shard in shards_of(batch):
            yield from self._one_shard(shard)

    def _one_shard(self, shard: Shard) -> Iterator[pa.Table]:
        if self.ledger is None:
            yield from self._read(shard)
            return
        from pipeline.runner import deaths

        died = deaths.begin(self.ledger, shard.key)
        if died >= deaths.SHARD_DEATHS:
            fault = ShardFault(Category.INTERNAL, f"the process reading {shard.key} died {died} times (killed for "
                                                  f"memory or crashed; stage {self.name}): left uncommitted, a rerun "
                                                  "tries it again")
            yield marker_table([failed_marker(shard.key, fault)], self.schema)
        else:
            yield from self._read(shard)
        deaths.end(self.ledger, shard.key)  # never reached when the process dies: the shard stays in hand

    def _read(self, shard: Shard) -> Iterator[pa.Table]:
        rows, parts = 0, self.process_shard(shard)
        try:
            while True:
                try:
                    part = next(parts)
                except StopIteration as done:
                    stats = done.value
                    break
                table = self.table(part)
                rows += table.num_rows
                if table.num_rows:
                    yield table
        except ShardFault as fault:
            yield marker_table([failed_marker(shard.key, fault)], self.schema)
            return
        except Exception as err:  # noqa: BLE001 - a failure of ours is never the data's: the shard stays uncommitted
            fault = ShardFault(Category.INTERNAL, f"{self.name} failed on {shard.key} after {rows} rows "
                                                  f"({type(err).__name__}: {err})")
            yield marker_table([failed_marker(shard.key, fault)], self.schema)
            return
        yield marker_table([end_marker(shard.key, rows // self.rows_per_sample, stats)], self.schema)


class TableStage(Stage):
    """Rows in, rows out: `process_table` gets a batch's data rows; its marker rows are handed on as they are."""

    def process_table(self, table: pa.Table) -> pa.Table:
        raise NotImplementedError

    def __call__(self, batch: pa.Table) -> pa.Table:
        markers = is_marker(batch.column("kind"))
        data = batch.filter(pc.invert(markers))
        out = self.process_table(data) if data.num_rows else self.schema.empty_table()
        passed = batch.filter(markers)
        return pa.concat_tables([out, self.table(passed)]) if passed.num_rows else out


class StageActor:
    """The one adapter between stages and Ray Data: built once per actor with a stage object, sets it up, then
    hands it each batch (`map_batches(StageActor, fn_constructor_kwargs={"stage": stage}, ...)`). A device fault
    leaves the actor's process unusable (a CUDA context cannot be recovered): the process ends, Ray restarts the
    actor and retries the batch (the scoring job's fault journal bounds those retries). In this process (the
    local executor) the same fault ends the run instead. The stage is torn down as the actor exits gracefully: Ray
    Data then drops its callable class's instance (`_MapWorker.__ray_shutdown__`), whose `__del__` runs."""

    def __init__(self, stage: Stage):
        self.stage = stage
        stage.setup()

    def __del__(self):
        stage = getattr(self, "stage", None)  # None when the constructor failed before the stage was kept
        if stage is not None:
            stage.teardown()

    def __call__(self, batch: pa.Table):
        try:
            return self.stage(batch)
        except DeviceFault as fault:
            print(f"[{self.stage.name}] device error in an actor ({fault.first_line}); ending it so Ray restarts it "
                  "and retries the batch", file=sys.stderr, flush=True)
            os._exit(3)
