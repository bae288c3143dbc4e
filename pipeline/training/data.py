"""Training data: synthetic pairs (jobs.synth's train/ and val/) read as Ray Datasets and encoded on CPU by the
same processor the scorer uses."""

from __future__ import annotations

import pyarrow as pa

from model.checkpoint import load_processor
from pipeline.encoded import ENCODED_FIELDS, encode_row
from pipeline.io.listing import list_shards
from pipeline.io.uris import filesystem_for
from pipeline.runner.deaths import TASK_RETRIES
from pipeline.runner.ray_compat import retry_bounds_allowed

TRAIN_COLUMNS = ["id", "kind", "texts", "images", "label"]
ENCODED_PAIR_SCHEMA = pa.schema([("id", pa.string()), ("kind", pa.string()), ("error", pa.string()),
                                 ("error_category", pa.string()), *ENCODED_FIELDS, ("label", pa.int8())])
# CPUs each encoding task holds: the feed runs beside the training workers, in the CPUs they leave free.
ENCODE_TASK_CPUS = 0.5

_PROCESSORS: dict = {}  # per worker process: the processor loads once, not once per batch


def encode_pairs(batch: pa.Table, model_uri: str) -> pa.Table:
    """Ray Data task, fused with the Parquet read: pairs -> encoded rows (the scorer's processor), keeping the
    label; a pair the processor rejects keeps its reason in `error` and is skipped by the training loop. (Tasks
    rather than an actor pool: a pool would hold CPUs the training workers' data feed needs.)"""
    if model_uri not in _PROCESSORS:
        _PROCESSORS[model_uri] = load_processor(model_uri)[0]
    processor = _PROCESSORS[model_uri]
    rows = []
    for row in batch.to_pylist():
        rows.append(encode_row({**row, "error": None, "error_category": None}, processor))
    return pa.Table.from_pylist([{name: r.get(name) for name in ENCODED_PAIR_SCHEMA.names} for r in rows],
                                schema=ENCODED_PAIR_SCHEMA)


def read_pairs(uri: str, field: str):
    """The pairs under `uri` (jobs.synth's train/ or val/); `InputError` naming `field` when there are none."""
    import ray

    files = [s.uri for s in list_shards(uri, "parquet", field=field).shards]
    fs, _ = filesystem_for(uri)  # one filesystem for all files; their paths without the scheme
    with retry_bounds_allowed():  # a read task whose worker dies is tried again a few times, not forever
        ds = ray.data.read_parquet([filesystem_for(f)[1] for f in files], filesystem=fs,
                                   ray_remote_args={"max_retries": TASK_RETRIES})
    return ds.select_columns(TRAIN_COLUMNS)


def encoded(ds, base_uri: str):
    with retry_bounds_allowed():
        return ds.map_batches(encode_pairs, fn_kwargs={"model_uri": base_uri}, batch_size=32, batch_format="pyarrow",
                              num_cpus=ENCODE_TASK_CPUS, max_retries=TASK_RETRIES)

