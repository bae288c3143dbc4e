"""One worker's training loop without Ray: resume across a change of device (a dtype change stands in for the move
to a GPU), token-budget micro-batches, the no-progress watchdog, fitting workers into the local CPUs."""

from __future__ import annotations

import random

import pyarrow as pa
import pytest
import torch

from jobs import sample_corpus as corpus
from pipeline.errors import InputError
from pipeline.training import TrainConfig
from pipeline.training.data import encode_pairs
from pipeline.training.driver import TrainingStalled, Watchdog, fit_workers
from pipeline.training.loop import TrainLoop


@pytest.fixture(scope="module")
def batch(tiny_checkpoint) -> pa.Table:
    rng = random.Random(0)
    samples = corpus.caption_samples(12, seed=5)
    pairs = pa.table({"id": [s["key"] for s in samples], "kind": ["caption"] * 12,
                      "texts": [[None, s["caption"]] for s in samples], "images": [[s["image"], None] for s in samples],
                      "label": pa.array([rng.randrange(4) for _ in samples], pa.int8())})
    return encode_pairs(pairs, tiny_checkpoint)


def config(tmp_path, **kw) -> TrainConfig:
    return TrainConfig(train="t", val="v", output=str(tmp_path), lr=1e-3, warmup_ratio=0.0, **kw)


def test_resume_after_the_model_changes_dtype_trains_on_and_continues_the_step_counter(tmp_path, tiny_checkpoint,
                                                                                         batch):
    cfg = config(tmp_path, batch_size=6)
    first = TrainLoop(cfg, tiny_checkpoint, total_steps=10).setup(None)
    first.train_epoch([batch.slice(0, 6), batch.slice(6, 6)])
    assert first.step == 2
    first.epoch = 1
    first.save(tmp_path / "ckpt", batches_into_epoch=0)
    saved_state = first.optimizer.state_dict()["state"]
    assert all(v.dtype == torch.float32 for s in saved_state.values() for v in s.values() if v.dim() > 0)

    # The stand-in for a GPU: the model moves to another dtype after its weights load, and the optimizer state,
    # restored only after that move, must follow it; restored before, step() would mix dtypes and fail.
    resumed = TrainLoop(cfg, tiny_checkpoint, total_steps=10, param_dtype=torch.bfloat16).setup(tmp_path / "ckpt")
    assert resumed.step == 2 and resumed.epoch == 1 and resumed.resumed_from == 2
    assert resumed.net.llm.embed_tokens.weight.dtype == torch.bfloat16
    params = resumed.optimizer.param_groups[0]["params"]
    state = resumed.optimizer.state
    assert all(state[p]["exp_avg"].dtype == p.dtype for p in params)  # each state follows its parameter
    assert sum(p.dtype == torch.bfloat16 for p in params) > len(params) // 2  # (the score head stays fp32)
    before = resumed.net.llm.layers[0].mlp.up_proj.weight.detach().clone()
    resumed.train_epoch([batch.slice(0, 6)])
    assert resumed.step == 3  # the step counter carried on
    assert not torch.equal(before, resumed.net.llm.layers[0].mlp.up_proj.weight)


def test_a_step_split_into_micro_batches_matches_one_whole_batch(tmp_path, tiny_checkpoint, batch):
    grads = []
    for budget in (100_000, 64):  # one micro-batch; then one or two rows at a time
        torch.manual_seed(0)
        loop = TrainLoop(config(tmp_path, token_budget=budget), tiny_checkpoint, total_steps=10).setup(None)
        loop.model.train()
        loop.optimizer.zero_grad()
        n = batch.num_rows
        for _, inputs, labels, _ in loop._micro_batches(batch):
            loss, _ = loop._forward(inputs, labels)
            (loss * len(labels) / n).backward()
        grads.append(loop.net.score_head.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_the_watchdog_stops_a_run_that_makes_no_progress():
    now = [1000.0]
    beat = [(1000.0, None)]
    dog = Watchdog(lambda: beat[0], timeout_s=60, clock=lambda: now[0])
    now[0] += 59
    dog.check()  # not yet
    beat[0] = (now[0], 7)
    now[0] += 59
    dog.check()  # a recent beat: fine
    now[0] += 2
    with pytest.raises(TrainingStalled, match=r"no training progress for 61 s \(after step 7\).*no_progress_timeout_s"):
        dog.check()


def test_workers_and_the_data_feed_fit_the_local_cpus(tmp_path):
    assert fit_workers(config(tmp_path, workers=2), cluster_cpus=2, local=True) == 0.5
    assert fit_workers(config(tmp_path, workers=1), cluster_cpus=2, local=True) == 1.0
    assert fit_workers(config(tmp_path, workers=2), cluster_cpus=2, local=False) == 1.0  # a cluster scales
    with pytest.raises(InputError, match="field 'cpus_per_worker'"):
        fit_workers(config(tmp_path, workers=2, cpus_per_worker=1.0), cluster_cpus=2, local=True)
    with pytest.raises(InputError, match="field 'workers'"):
        fit_workers(config(tmp_path, workers=40), cluster_cpus=2, local=True)
