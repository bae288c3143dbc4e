"""The scoring actor's device side without Ray: out-of-memory batches are halved, device errors end the actor
(never error records), only a sample that fails on its own gets an error record, overlapped preparation gives
the serial scores; and with Ray: a device error restarts the actor and its batch is retried."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pyarrow as pa
import pytest
import torch

import model
from pipeline import corpus
from pipeline.preprocess import ENCODED_SCHEMA, encode_row
from pipeline.scorer import BatchScorer, DeviceFault, ScoringActor
from pipeline.sources import shard_end


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    return model.load(tiny_checkpoint)


def encoded_table(processor, n: int, seed: int = 0, long: int | None = None) -> pa.Table:
    rows = []
    for i, s in enumerate(corpus.caption_samples(n, seed=seed, prefix=f"e{seed}-")):
        caption = s["caption"] * (4 if i == long else 1)
        row = {"id": s["key"], "source": "x.tar", "kind": "caption", "ordinal": i, "texts": [None, caption],
               "images": [s["image"], None], "error": None, "key": None, "url": None}
        rows.append(encode_row(row, processor))
    rows.append({**{k: None for k in ENCODED_SCHEMA.names}, **{k: v for k, v in shard_end("x.tar", n).items()
                                                                if k in ENCODED_SCHEMA.names}})
    return pa.Table.from_pylist(rows, schema=ENCODED_SCHEMA)


class Faulty:
    """Wraps a model's score(): raises `error` for batches that `when` selects."""

    def __init__(self, net, error, when):
        self.net, self.error, self.when, self.calls = net, error, when, []

    def __getattr__(self, name):
        return getattr(self.net, name)

    def score(self, input_ids, attention_mask, pixel_values=None):
        self.calls.append(int(input_ids.shape[0]))
        if self.when(input_ids):
            raise self.error
        return self.net.score(input_ids, attention_mask, pixel_values)


def records(table: pa.Table) -> list[dict]:
    return [r for r in table.to_pylist() if not r["kind"].startswith("_")]


def test_an_out_of_memory_batch_is_halved_and_every_sample_scored(loaded):
    net, processor = loaded
    faulty = Faulty(net, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                    when=lambda ids: ids.shape[0] > 2)
    out = records(BatchScorer(faulty, processor, token_budget=10**6, max_batch=8).score_table(
        encoded_table(processor, 8)))
    assert len(out) == 8 and all(r["error"] is None and r["score"] is not None for r in out)
    assert faulty.calls == [8, 4, 2, 2, 4, 2, 2]  # 8 -> 4 + 4 -> 2 + 2 each


def test_a_device_error_ends_the_actor_and_is_never_a_record(loaded):
    net, processor = loaded
    faulty = Faulty(net, RuntimeError("CUDA error: device-side assert triggered"), when=lambda ids: True)
    with pytest.raises(DeviceFault, match="device-side assert"):
        BatchScorer(faulty, processor, token_budget=10**6, max_batch=8).score_table(encoded_table(processor, 8))


def test_only_a_sample_that_fails_on_its_own_gets_an_error_record(loaded):
    net, processor = loaded
    table = encoded_table(processor, 8, long=5)  # sample 5 is the one the model "fails on"
    bad = table.column("n_tokens")[5].as_py()
    assert sorted(table.column("n_tokens").to_pylist()[:8])[-1] == bad > sorted(table.column("n_tokens").to_pylist()[:8])[-2]
    faulty = Faulty(net, ValueError("bad sample"),
                    when=lambda ids: bool((ids != processor.config.pad_token_id).sum(1).eq(bad).any()))
    out = records(BatchScorer(faulty, processor, token_budget=10**6, max_batch=8).score_table(table))
    errors = {r["id"]: r["error"] for r in out if r["error"]}
    assert list(errors.values()) == ["score: ValueError: bad sample"] and len(out) == 8
    assert errors.keys() == {out[5]["id"]}


def test_every_sample_failing_alone_the_same_way_is_a_fault_not_bad_data(loaded):
    """An error the device-error patterns do not know, met by every sample alone: the model or the device is at
    fault, so the batch is retried (DeviceFault) instead of committing every sample as an error record."""
    net, processor = loaded
    faulty = Faulty(net, RuntimeError("cuDNN launch failure 0x7f"), when=lambda ids: True)
    with pytest.raises(DeviceFault, match="every one of 8 samples failed alone"):
        BatchScorer(faulty, processor, token_budget=10**6, max_batch=8).score_table(encoded_table(processor, 8))
    oom = Faulty(net, torch.OutOfMemoryError("CUDA out of memory"), when=lambda ids: True)  # memory held elsewhere
    with pytest.raises(DeviceFault, match="out of memory on this sample alone"):
        BatchScorer(oom, processor, token_budget=10**6, max_batch=8).score_table(encoded_table(processor, 3))


def test_overlapped_preparation_gives_the_serial_scores_in_any_order(loaded):
    net, processor = loaded
    tables = [encoded_table(processor, 12, seed=k) for k in range(3)]
    serial = BatchScorer(net, processor, token_budget=512, max_batch=4, overlap=False)
    overlapped = BatchScorer(net, processor, token_budget=512, max_batch=4, overlap=True)
    expected = {r["id"]: r for t in tables for r in records(serial.score_table(t))}
    order = list(range(3))
    random.Random(1).shuffle(order)
    got = {r["id"]: r for k in order for r in records(overlapped.score_table(tables[k]))}
    assert got.keys() == expected.keys()
    for key, record in expected.items():
        assert got[key]["score"] == record["score"] and got[key]["label"] == record["label"]
    assert max(overlapped.micro_batch_sizes) == 4


class DeviceFaultOnce(ScoringActor):
    """A scoring actor whose first call meets a device error (a CUDA device-side assert, injected): it must end,
    be restarted by Ray, and its batch retried. The marker beside the model makes it happen once per test."""

    def __call__(self, batch):
        marker = Path(self.model_uri).parent / "device-fault-injected"
        if not marker.exists():
            marker.write_text(str(os.getpid()))
            self.scorer.model = Faulty(self.scorer.model, RuntimeError("CUDA error: device-side assert triggered"),
                                       when=lambda ids: True)
        return super().__call__(batch)


def test_a_device_error_restarts_the_actor_and_its_batch_is_retried(tmp_path, tiny_checkpoint, ray_cluster):
    import shutil

    from pipeline.scoring import ScoreConfig, score_dataset
    from pipeline.sinks import read_scores
    from tests.pipeline.test_scoring import assert_exactly_once

    model_dir = tmp_path / "model" / "tiny"
    shutil.copytree(tiny_checkpoint, model_dir)
    expected = []
    for k in range(2):
        items = corpus.caption_samples(6, seed=k, prefix=f"dev{k}-")
        corpus.write_webdataset(str(tmp_path / "in" / f"{k}.tar"), items)
        expected += [i["key"] for i in items]
    summary = score_dataset(ScoreConfig(input=str(tmp_path / "in"), format="webdataset", output=str(tmp_path / "out"),
                                        model=str(model_dir)), progress=False, actor_cls=DeviceFaultOnce)
    marker = tmp_path / "model" / "device-fault-injected"
    assert marker.exists()  # the fault happened
    assert not Path(f"/proc/{marker.read_text()}").exists()  # and ended that actor's process
    assert summary["errors_this_run"] == 0 and summary["shards"]["incomplete"] == []
    table = read_scores(str(tmp_path / "out"))
    assert_exactly_once(table, expected)
    assert table.column("score").null_count == 0


def test_captions_fill_micro_batches_of_the_configured_size_across_calls(tmp_path, tiny_checkpoint, ray_cluster):
    """The CPU stage hands over 16 rows at a time; with the default rows per call (4 x max_batch) the device still
    sees micro-batches of max_batch, not of one call's worth of an old 64-row default."""
    from pipeline.scoring import ScoreConfig, score_dataset

    for k in range(6):
        corpus.write_webdataset(str(tmp_path / "in" / f"{k}.tar"), corpus.caption_samples(50, seed=k, prefix=f"m{k}-"))
    summary = score_dataset(ScoreConfig(input=str(tmp_path / "in"), format="webdataset", output=str(tmp_path / "out"),
                                        model=tiny_checkpoint, max_batch=128), progress=False)
    assert summary["samples_this_run"] == 300
    assert summary["micro_batch_rows"]["max"] == 128 and summary["micro_batch_rows"]["configured"] == 128
    assert summary["micro_batch_rows"]["mean"] >= 64  # most samples ride in full micro-batches
