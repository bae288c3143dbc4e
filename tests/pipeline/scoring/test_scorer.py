"""The scoring stage's device side without Ray: out-of-memory batches are halved (wherever the error is raised)
and lower the budget, device errors end the actor (never error records, unless a sample faults the device on its
own after a canary succeeded), only a sample that fails on its own gets an error record, overlapped preparation
gives the serial scores; and with Ray: a device error restarts the actor and its batch is retried, a sample that
faults the device is narrowed down while the rest of its call is scored and committed, and micro-batches fill
across Ray's calls."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pyarrow as pa
import pytest
import torch

import model
from jobs import sample_corpus as corpus
from pipeline.commit.markers import end_marker
from pipeline.errors import BrokenWorker, DeviceFault
from pipeline.runner import Resources, format_summary
from pipeline.scoring import ScoreConfig, ScoringSettings, read_scores, score_dataset
from pipeline.scoring.device_faults import CANARY_FAILURES_BEFORE_GIVING_UP, FaultJournal
from pipeline.scoring.reading import sample_rows
from pipeline.scoring.scorer import BatchScorer
from pipeline.scoring.stage import ScoreStage
from tests.support.scoring import score_with
from tests.support.shards import assert_exactly_once, write_shards


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    return model.load(tiny_checkpoint)


def sample_table(n: int, seed: int = 0, long: int | None = None) -> pa.Table:
    """n caption samples as the scoring actors receive them (encoded image bytes and text), then the shard's end
    marker; sample `long` has its caption four times over."""
    rows = []
    for i, s in enumerate(corpus.caption_samples(n, seed=seed, prefix=f"e{seed}-")):
        caption = s["caption"] * (4 if i == long else 1)
        rows.append({"id": s["key"], "source": "x.tar", "kind": "caption", "ordinal": i, "texts": [None, caption],
                     "images": [s["image"], None], "error": None})
    return sample_rows([*rows, end_marker("x.tar", n)])


def token_counts(processor, table: pa.Table) -> list[int]:
    """Each sample's token count (the end marker left out)."""
    return [processor.plan(r["texts"], r["images"], r["kind"]).n_tokens
            for r in table.to_pylist() if not r["kind"].startswith("_")]


def micro_batch_max(table: pa.Table) -> int:
    return max(v for v in table.column("micro_batch").to_pylist() if v is not None)


class Faulty:
    """Wraps a model's score(): raises `error` for batches that `when` selects."""

    def __init__(self, net, error, when):
        self.net = net
        self.error = error
        self.when = when
        self.calls = []

    def __getattr__(self, name):
        return getattr(self.net, name)

    def score(self, input_ids, attention_mask, pixel_values=None, **options):
        self.calls.append(int(input_ids.shape[0]))
        if self.when(input_ids):
            raise self.error
        return self.net.score(input_ids, attention_mask, pixel_values, **options)


def records(table: pa.Table) -> list[dict]:
    return [r for r in table.to_pylist() if not r["kind"].startswith("_")]


def test_an_out_of_memory_batch_is_halved_and_every_sample_scored(loaded):
    net, processor = loaded
    faulty = Faulty(net, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                    when=lambda ids: ids.shape[0] > 2)
    out = records(BatchScorer(faulty, processor, token_budget=10**6, max_batch=8).score_table(
        sample_table(8)))
    assert len(out) == 8 and all(r["error"] is None and r["score"] is not None for r in out)
    # 8 -> 4 + 4; the first 4 -> 2 + 2, and the budget is lowered to what fits: the second 4 (one token longer
    # each) is split before it is tried, its longest two alone
    assert faulty.calls == [8, 4, 2, 2, 2, 1, 1]


def test_a_device_error_ends_the_actor_and_is_never_a_record(loaded):
    net, processor = loaded
    faulty = Faulty(net, RuntimeError("CUDA error: device-side assert triggered"), when=lambda ids: True)
    with pytest.raises(DeviceFault, match="device-side assert"):
        BatchScorer(faulty, processor, token_budget=10**6, max_batch=8).score_table(sample_table(8))


def test_only_a_sample_that_fails_on_its_own_gets_an_error_record(loaded):
    net, processor = loaded
    table = sample_table(8, long=5)  # sample 5 is the one the model "fails on"
    counts = token_counts(processor, table)
    bad = counts[5]
    assert sorted(counts)[-1] == bad > sorted(counts)[-2]
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
        BatchScorer(faulty, processor, token_budget=10**6, max_batch=8).score_table(sample_table(8))
    oom = Faulty(net, torch.OutOfMemoryError("CUDA out of memory"), when=lambda ids: True)  # memory held elsewhere
    with pytest.raises(DeviceFault, match="out of memory on this sample alone"):
        BatchScorer(oom, processor, token_budget=10**6, max_batch=8).score_table(sample_table(3))


class CopyOutOfMemory(BatchScorer):
    """A device whose host-to-device step (the helper thread's pin and copy) runs out of memory for micro-batches
    of more than two samples."""

    def _to_device(self, batch):
        if batch["input_ids"].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB (pinned host memory)")
        return super()._to_device(batch)


def test_an_out_of_memory_error_in_the_copy_to_the_device_halves_the_batch(loaded):
    net, processor = loaded
    scorer = CopyOutOfMemory(net, processor, token_budget=10**6, max_batch=8, overlap=True)
    table = scorer.score_table(sample_table(8))
    out = records(table)
    assert len(out) == 8 and all(r["error"] is None and r["score"] is not None for r in out)
    assert micro_batch_max(table) == 2


def test_after_an_out_of_memory_error_later_micro_batches_fit_the_lowered_budget(loaded):
    net, processor = loaded
    faulty = Faulty(net, torch.OutOfMemoryError("CUDA out of memory"), when=lambda ids: ids.shape[0] > 2)
    scorer = BatchScorer(faulty, processor, token_budget=10**6, max_batch=8)
    scorer.score_table(sample_table(8, seed=1))
    faulty.calls.clear()
    table = scorer.score_table(sample_table(8, seed=2))
    assert faulty.calls and max(faulty.calls) <= 2  # no micro-batch fails first any more
    assert all(r["score"] is not None for r in records(table))
    reported = table.column("budget_lowered").to_pylist()[0]
    assert reported == {"actor": scorer.name, "from": 10**6, "to": scorer.token_budget} and scorer.token_budget < 10**6


def fresh_actors(net, processor, table, journal, error, when, limit=8):
    """Score `table` as Ray would: a scorer whose device faults ends (its process would), and a fresh one, with
    the run's journal, retries the same rows. Returns (the output, how many scorers ended)."""
    for ended in range(limit):
        scorer = BatchScorer(Faulty(net, error, when), processor, token_budget=10**6, max_batch=8, journal=journal)
        try:
            return scorer.score_table(table), ended
        except DeviceFault:
            continue
    return None, limit


DEVICE_ASSERT = RuntimeError("CUDA error: device-side assert triggered\nCompile with `TORCH_USE_CUDA_DSA`")


def test_a_sample_that_faults_the_device_is_narrowed_down_on_fresh_actors(loaded):
    net, processor = loaded
    table = sample_table(8, long=5)  # sample 5 faults the device whenever it is in the micro-batch
    bad = token_counts(processor, table)[5]
    journal = FaultJournal()
    out, ended = fresh_actors(net, processor, table, journal, DEVICE_ASSERT,
                              when=lambda ids: bool((ids != processor.config.pad_token_id).sum(1).eq(bad).any()))
    assert ended == 3  # the micro-batch twice as it was, then sample 5 alone after the canary
    rows = records(out)
    assert rows[5]["error"] == ("device: the sample faults the device on its own (RuntimeError: CUDA error: "
                                "device-side assert triggered)")
    assert rows[5]["error_category"] == "device"
    assert all(r["score"] is not None for k, r in enumerate(rows) if k != 5)
    assert journal.stats()["samples_blamed"] == 1


def test_a_device_that_faults_on_the_canary_blames_no_sample_and_ends_the_run(loaded):
    """A broken device faults on everything, the canary too: no sample is ever given an error record, and once the
    canary has failed CANARY_FAILURES_BEFORE_GIVING_UP times every call raises BrokenWorker (the run ends saying why,
    rather than retrying the block forever)."""
    net, processor = loaded
    table = sample_table(8)
    journal = FaultJournal()
    with pytest.raises(BrokenWorker, match=r"fail on a synthetic sample \(3 times.*device-side assert"):
        fresh_actors(net, processor, table, journal, DEVICE_ASSERT, when=lambda ids: True)
    stats = journal.stats()
    assert stats["samples_blamed"] == 0 and stats["canary_faults"] == CANARY_FAILURES_BEFORE_GIVING_UP


def test_overlapped_preparation_gives_the_serial_scores_in_any_order(loaded):
    net, processor = loaded
    tables = [sample_table(12, seed=k) for k in range(3)]
    serial = BatchScorer(net, processor, token_budget=512, max_batch=4, overlap=False)
    overlapped = BatchScorer(net, processor, token_budget=512, max_batch=4, overlap=True)
    expected = {r["id"]: r for t in tables for r in records(serial.score_table(t))}
    order = list(range(3))
    random.Random(1).shuffle(order)
    outputs = [overlapped.score_table(tables[k]) for k in order]
    got = {r["id"]: r for out in outputs for r in records(out)}
    assert got.keys() == expected.keys()
    for key, record in expected.items():
        assert got[key]["score"] == record["score"] and got[key]["label"] == record["label"]
    assert max(micro_batch_max(out) for out in outputs) == 4


def test_a_scoring_stage_torn_down_has_shut_its_decode_threads(tiny_checkpoint):
    stage = ScoreStage(Resources(), ScoringSettings(model=tiny_checkpoint))
    stage.setup()
    assert len(records(stage(sample_table(2)))) == 2
    stage.teardown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        stage(sample_table(2))


class DeviceFaultOnce(ScoreStage):
    """A scoring stage whose first call meets a device error (a CUDA device-side assert, injected): it must end,
    be restarted by Ray, and its batch retried. The marker beside the model makes it happen once per test."""

    def process_table(self, table):
        marker = Path(self.settings.model).parent / "device-fault-injected"
        if not marker.exists():
            marker.write_text(str(os.getpid()))
            self.scorer.model = Faulty(self.scorer.model, RuntimeError("CUDA error: device-side assert triggered"),
                                       when=lambda ids: True)
        return super().process_table(table)


def test_a_device_error_restarts_the_actor_and_its_batch_is_retried(tmp_path, tiny_checkpoint, ray_cluster):
    import shutil

    model_dir = tmp_path / "model" / "tiny"
    shutil.copytree(tiny_checkpoint, model_dir)
    expected = write_shards(tmp_path / "in", 2, 6, prefix="dev", name="{k}")
    _, summary = score_with(DeviceFaultOnce, ScoreConfig(input=str(tmp_path / "in"), format="webdataset",
                                                         output=str(tmp_path / "out"), model=str(model_dir)))
    marker = tmp_path / "model" / "device-fault-injected"
    assert marker.exists()  # the fault happened
    assert not Path(f"/proc/{marker.read_text()}").exists()  # and ended that actor's process
    assert summary["records"]["errors"] == 0 and summary["shards"]["incomplete"] == []
    table = read_scores(str(tmp_path / "out"))
    assert_exactly_once(table, expected)
    assert table.column("score").null_count == 0


def test_captions_fill_micro_batches_of_the_configured_size_across_calls(tmp_path, tiny_checkpoint, ray_cluster):
    """The CPU stage hands over 16 rows at a time; with the default rows per call (4 x max_batch) the device still
    sees micro-batches of max_batch, not of one call's worth of an old 64-row default."""
    write_shards(tmp_path / "in", 6, 50, prefix="m", name="{k}")
    summary = score_dataset(ScoreConfig(input=str(tmp_path / "in"), format="webdataset", output=str(tmp_path / "out"),
                                        model=tiny_checkpoint, max_batch=128), progress=False)
    assert summary["records"]["this_run"] == 300
    assert summary["score"]["micro_batch_rows"]["max"] == 128
    assert summary["score"]["micro_batch_rows"]["configured"] == 128
    assert summary["score"]["micro_batch_rows"]["mean"] >= 64  # most samples ride in full micro-batches


class FaultsWithOneSample(ScoreStage):
    """A scoring stage whose device faults (an injected CUDA device-side assert) whenever one given sample (told
    by its token count, written beside the model) is in the micro-batch; each of its processes leaves its pid
    there too, so the test counts restarts."""

    def setup(self):
        super().setup()
        root = Path(self.settings.model).parent
        (root / "actors").mkdir(exist_ok=True)
        (root / "actors" / str(os.getpid())).touch()
        bad = int((root / "faulting-sample-tokens").read_text())
        pad = self.scorer.processor.config.pad_token_id
        self.scorer.model = Faulty(self.scorer.model, RuntimeError("CUDA error: device-side assert triggered"),
                                   when=lambda ids: bool((ids != pad).sum(1).eq(bad).any()))


def test_a_sample_that_faults_the_device_becomes_its_error_and_its_call_completes(tmp_path, tiny_checkpoint,
                                                                                 ray_cluster):
    """Whenever sample X is in the micro-batch the device faults: the micro-batch is retried a bounded number of
    times on fresh actors, then narrowed down to X, which becomes X's error record (device); every other sample
    of the call, the healthy shard's too, is scored and both shards are committed."""
    import shutil

    from model.checkpoint import load_processor

    model_dir = tmp_path / "model" / "tiny"
    shutil.copytree(tiny_checkpoint, model_dir)
    processor = load_processor(str(model_dir))[0]
    items = [corpus.caption_samples(6, seed=k, prefix=f"df{k}-") for k in range(2)]
    bad = items[0][2]
    bad["caption"] = " and then ".join([bad["caption"]] * 6)  # a token count no other sample has
    tokens = {i["key"]: processor.encode([None, i["caption"]], [i["image"], None], "caption").n_tokens
              for shard in items for i in shard}
    assert list(tokens.values()).count(tokens[bad["key"]]) == 1
    (tmp_path / "model" / "faulting-sample-tokens").write_text(str(tokens[bad["key"]]))
    for k, shard in enumerate(items):
        corpus.write_webdataset(str(tmp_path / "in" / f"{k}.tar"), shard)
    max_batch = 4
    config = ScoreConfig(input=str(tmp_path / "in"), format="webdataset", output=str(tmp_path / "out"),
                         model=str(model_dir), max_batch=max_batch, batch_size=64,
                         no_progress_timeout_s=120)  # the narrowing's restarts are one task: no progress meanwhile
    _, summary = score_with(FaultsWithOneSample, config)
    assert summary["shards"]["incomplete"] == [] and summary["shards"]["committed_this_run"] == 2, summary
    by_id = {r["id"]: r for r in read_scores(str(tmp_path / "out")).to_pylist()}
    assert by_id.keys() == tokens.keys()
    assert by_id[bad["key"]]["error"].startswith("device: the sample faults the device on its own (")
    assert all(r["score"] is not None for key, r in by_id.items() if key != bad["key"])
    assert summary["errors"]["by_category"] == {"device": 1}
    assert summary["score"]["device_faults"]["samples_blamed"] == 1
    restarts = len(list((tmp_path / "model" / "actors").iterdir())) - 1
    assert restarts == 3  # the micro-batch twice as it was, then X alone after the canary


class OutOfMemoryAboveTwo(ScoreStage):
    """A scoring stage whose device runs out of memory for micro-batches of more than two samples."""

    def setup(self):
        super().setup()
        self.scorer.model = Faulty(self.scorer.model, torch.OutOfMemoryError("CUDA out of memory"),
                                   when=lambda ids: ids.shape[0] > 2)


def test_the_summary_reports_a_token_budget_lowered_after_out_of_memory(tmp_path, tiny_checkpoint):
    write_shards(tmp_path / "in", 2, 6, prefix="o", name="{k}")
    config = ScoreConfig(input=str(tmp_path / "in"), format="webdataset", output=str(tmp_path / "out"),
                         model=tiny_checkpoint, max_batch=8, batch_size=64, token_budget=4096, executor="local")
    job, summary = score_with(OutOfMemoryAboveTwo, config)
    assert summary["score"]["scored_this_run"] == 12 and summary["score"]["micro_batch_rows"]["max"] <= 2
    lowered = summary["score"]["token_budget_lowered"]
    assert lowered["actors"] == 1 and lowered["from"] == 4096 and lowered["to"] < 4096
    assert (f"token budget lowered after out-of-memory: 4096 -> {lowered['to']} on 1 actor"
            in format_summary(job, summary))
