"""Training: the loop overfits a fixed set (without Ray: the class Ray Train's workers run), metrics, and settings
that fail naming the field; tests/jobs/test_train_job.py runs two workers on Ray Train, killed and resumed from S3
checkpoints, and loads what they export."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import model
import model.create
from jobs import sample_corpus as corpus
from pipeline.errors import InputError
from pipeline.synth import SynthConfig, synthesize
from pipeline.training import TrainConfig, spearman, train_classifier, validation_metrics


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Offline-generated pairs of both kinds: train/ and val/ directories (made in this process)."""
    root = tmp_path_factory.mktemp("pairs")
    corpus.write_webdataset(str(root / "in" / "caps.tar"), corpus.caption_samples(24, seed=7))
    corpus.write_obelics(str(root / "docs" / "docs.parquet"), corpus.documents(12, seed=8))
    for name, fmt in (("in", "webdataset"), ("docs", "obelics")):
        synthesize(SynthConfig(input=str(root / name), format=fmt, output=str(root / "pairs"), val_fraction=0.25,
                               executor="local"), progress=False)
    return root / "pairs"


def test_missing_or_empty_pairs_and_a_bad_init_fail_naming_the_field(pairs, tmp_path, ray_cluster):
    (tmp_path / "empty").mkdir()
    base = dict(train=str(pairs / "train"), val=str(pairs / "val"), output=str(tmp_path / "run"),
                cpus_per_worker=0.5, epochs=1)
    for override, message in (
        ({"val": str(tmp_path / "empty")}, "field 'val': no parquet shards"),
        ({"val": str(tmp_path / "missing")}, "field 'val': .*missing does not exist"),
        ({"train": str(tmp_path / "missing")}, "field 'train': .*missing does not exist"),
    ):
        with pytest.raises(InputError, match=message):
            train_classifier(TrainConfig(**{**base, **override}))
    with pytest.raises(InputError, match="field 'init': no checkpoint at"):
        train_classifier(TrainConfig(**{**base, "init": str(tmp_path / "missing")}))
    assert not (tmp_path / "run" / "ray_train").exists()  # nothing started
    assert not (tmp_path / "run" / "_base").exists()  # and the pair checks come before a base model is written


def test_the_model_overfits_a_small_fixed_set(tmp_path, tiny_checkpoint):
    """The training loop learns: 24 pairs of 6 scenes, seen 8 times an epoch, for 4 epochs (without Ray: the loop
    is the same class the Ray Train workers run)."""
    import pyarrow as pa

    from pipeline.training.data import encode_pairs
    from pipeline.training.loop import TrainLoop

    samples = corpus.caption_samples(6, seed=11)
    corpus.write_webdataset(str(tmp_path / "in" / "few.tar"), samples)
    synthesize(SynthConfig(input=str(tmp_path / "in"), format="webdataset", output=str(tmp_path / "pairs"),
                           val_fraction=0.0, executor="local"), progress=False)
    import pyarrow.parquet as pq

    (shard,) = (tmp_path / "pairs" / "train").glob("*.parquet")
    pairs = pq.read_table(shard, columns=["id", "kind", "texts", "images", "label"])
    base = str(tmp_path / "base")
    model.create.create("tiny", base, num_labels=4, seed=0)
    batch = encode_pairs(pairs, base)
    torch.manual_seed(0)
    config = TrainConfig(train="t", val="v", output=str(tmp_path / "run"), epochs=4, batch_size=8, lr=3e-3,
                         warmup_ratio=0.0, seed=0, num_labels=4)
    loop = TrainLoop(config, base, total_steps=4 * 8 * 3).setup(None)
    history = []
    for epoch in range(4):
        rng = np.random.default_rng(epoch)
        batches = [batch.take(pa.array(rng.permutation(batch.num_rows)[k:k + 8])) for _ in range(8)
                   for k in range(0, batch.num_rows, 8)]
        stats = loop.train_epoch(batches)
        history.append(stats["loss_sum"] / stats["seen"])
    val = loop.validate([batch])
    accuracy = np.mean(np.asarray(val["predicted"]) == np.asarray(val["labels"]))
    assert history[-1] < 0.5 * history[0]
    assert accuracy >= 0.6  # chance is 0.25


def test_validation_metrics():
    scores = [0.1, 0.9, 2.2, 2.9, 1.4, 0.2]
    predicted = [0, 1, 2, 3, 1, 0]
    labels = [0, 1, 2, 3, 2, 1]
    kinds = ["caption", "caption", "caption", "interleaved", "interleaved", "interleaved"]
    m = validation_metrics(scores, predicted, labels, kinds)
    assert m["val_accuracy"] == pytest.approx(4 / 6)
    assert m["val_accuracy_caption"] == 1.0 and m["val_accuracy_interleaved"] == pytest.approx(1 / 3)
    assert m["val_accuracy_level_2"] == 0.5 and m["val_accuracy_level_0"] == 1.0
    assert m["val_mae"] == pytest.approx(np.mean(np.abs(np.array(scores) - np.array(labels))))
    assert m["val_confusion"][2] == [0, 1, 1, 0]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 2, 3], [3, 2, 2, 1]) == pytest.approx(-1.0)


@pytest.mark.parametrize("fields, field", [
    ({"model_config": "qwen7b"}, "model_config"),
    ({"stage": "projector", "gradient_checkpointing": True}, "gradient_checkpointing"),
    ({"epochs": 0}, "epochs"),
    ({"bogus": 1}, "bogus"),
])
def test_invalid_configuration_names_the_field(fields, field):
    with pytest.raises(Exception) as err:
        TrainConfig(train="a", val="b", output="c", **fields)
    assert field in str(err.value)


def test_init_head_mismatch_fails_fast(pairs, tiny_checkpoint, tmp_path, ray_cluster):
    with pytest.raises(ValueError, match="field 'num_labels'"):
        train_classifier(TrainConfig(train=str(pairs / "train"), val=str(pairs / "val"), output=str(tmp_path / "o"),
                                     init=tiny_checkpoint, num_labels=4))
