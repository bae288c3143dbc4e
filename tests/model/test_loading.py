"""Loading straight into the target dtype and device: host memory at a real model size, a meta-built model equal
to a normally built one, strict keys and shapes from the headers, the files `save` writes, and export."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import model
from model import storage, weights
from model.checkpoint import build, config_and_tokenizer, create, load_state, read_weights
from model.errors import CheckpointError
from model.modeling import UniFilter
from tests.support.images import jpeg_bytes
from tests.support.jobs import REPO_ROOT

SAMPLES = [{"texts": [None, "a red square"], "images": [jpeg_bytes("red"), None], "kind": "caption"}]


def write_checkpoint_without_init(name: str, directory: Path, dtype=torch.bfloat16) -> Path:
    """A real-size checkpoint in seconds: the model's state-dict shapes from a meta-device build, written one
    zero tensor at a time (no random init, never the whole model in memory), with its config and tokenizer."""
    config, tokenizer = config_and_tokenizer(name)
    with torch.device("meta"):
        net = UniFilter(config)
    specs = {key: torch.empty(t.shape, dtype=dtype, device="meta") for key, t in net.state_dict().items()}
    directory.mkdir(parents=True)
    weights.write_safetensors(directory / weights.WEIGHTS_NAME, specs,
                              host_copy=lambda spec: torch.zeros(spec.shape, dtype=spec.dtype))
    tokenizer.save_pretrained(str(directory))
    (directory / weights.CONFIG_NAME).write_text(config.to_json())
    return directory


MEASURE_LOAD = textwrap.dedent("""
    import json, resource, sys, time
    import torch, transformers  # imported before the baseline: the load is what is measured
    import model

    def rss_bytes():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    before = rss_bytes()
    started = time.perf_counter()
    net, processor = model.load(sys.argv[1], dtype=torch.bfloat16)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    meta = [n for n, t in [*net.named_parameters(), *net.named_buffers()] if t.is_meta]
    print(json.dumps({"before": before, "peak": peak, "seconds": seconds, "meta": meta,
                      "dtype": str(net.dtype), "head": str(net.score_head.weight.dtype)}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and ru_maxrss in kilobytes")
def test_load_holds_one_copy_of_the_weights_in_host_memory(tmp_path):
    """qwen2.5-0.5b (909M parameters, 1.8 GB in bf16): the load's peak host memory above what the process held
    before it is at most 1.2x the checkpoint's size on disk (no random-init model, no second copy)."""
    directory = write_checkpoint_without_init("qwen2.5-0.5b", tmp_path / "qwen0.5b")
    on_disk = sum(p.stat().st_size for p in directory.iterdir())
    run = subprocess.run([sys.executable, "-c", MEASURE_LOAD, str(directory)], capture_output=True, text=True,
                         timeout=300, cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": REPO_ROOT})
    assert run.returncode == 0, run.stderr[-3000:]
    measured = json.loads(run.stdout.strip().splitlines()[-1])
    increase = measured["peak"] - measured["before"]
    mb = 1 << 20
    print(f"\n[load memory] qwen2.5-0.5b bf16: checkpoint {on_disk / mb:.0f} MB on disk; RSS before load "
          f"{measured['before'] / mb:.0f} MB, peak {measured['peak'] / mb:.0f} MB, increase {increase / mb:.0f} MB "
          f"= {increase / on_disk:.3f}x the checkpoint; load took {measured['seconds']:.1f} s")
    assert measured["meta"] == []
    assert (measured["dtype"], measured["head"]) == ("torch.bfloat16", "torch.float32")
    assert increase <= 1.2 * on_disk


def test_a_meta_built_load_equals_a_normally_built_model(tiny_checkpoint):
    """Same logits and the same non-persistent buffers (values, dtypes and layout) as a model built the usual
    way (random init, then the weights copied in)."""
    loaded, processor = model.load(tiny_checkpoint)
    config = loaded.config
    reference = UniFilter(config).eval()
    load_state(reference, read_weights(Path(tiny_checkpoint)), source=tiny_checkpoint)
    batch = processor(SAMPLES)
    with torch.no_grad():
        assert torch.equal(loaded(**batch), reference(**batch))
    ours, theirs = dict(loaded.named_buffers()), dict(reference.named_buffers())
    assert ours.keys() == theirs.keys() == {
        "vision_tower.embeddings.position_ids", "llm.rotary_emb.inv_freq", "llm.rotary_emb.original_inv_freq"}
    for name, buffer in ours.items():
        assert buffer.dtype == theirs[name].dtype and buffer.stride() == theirs[name].stride(), name
        assert torch.equal(buffer, theirs[name]), name


def test_build_with_weights_takes_them_without_random_init(tiny_checkpoint):
    net, processor = model.load(tiny_checkpoint)
    rebuilt, _ = build(net.config, processor.tokenizer, read_weights(Path(tiny_checkpoint)))
    batch = processor(SAMPLES)
    with torch.no_grad():
        assert torch.equal(net(**batch), rebuilt(**batch))


def test_a_buffer_the_loader_does_not_know_fails_naming_it(tiny_checkpoint):
    net, _ = model.load(tiny_checkpoint)
    net.projector.register_buffer("new_table", torch.zeros(3, device="meta"), persistent=False)
    with pytest.raises(RuntimeError, match=r"still on the meta device after loading: \['projector.new_table'\]"):
        net.materialise_buffers("cpu")


def test_a_weight_of_the_wrong_shape_fails_naming_it(tiny_checkpoint, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_checkpoint, bad)
    tensors = read_weights(bad)
    tensors["projector.mlp.0.bias"] = torch.zeros(7)
    weights.write_safetensors(bad / weights.WEIGHTS_NAME, tensors)
    with pytest.raises(CheckpointError, match=r"weight projector\.mlp\.0\.bias has shape \(7,\)"):
        model.load(str(bad))


def test_a_truncated_weights_file_fails(tiny_checkpoint, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_checkpoint, bad)
    path = bad / weights.WEIGHTS_NAME
    os.truncate(path, path.stat().st_size - 100)
    with pytest.raises(CheckpointError, match="offsets"):
        model.load(str(bad))


def test_write_safetensors_is_read_by_the_reference_library(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(2, 2).bfloat16(),
               "scalar": torch.tensor(1.5), "empty": torch.zeros(0, 4), "strided": torch.randn(4, 6)[:, ::2]}
    digest = weights.write_safetensors(tmp_path / "x.safetensors", tensors, {"format": "pt"})
    back = load_file(str(tmp_path / "x.safetensors"))
    assert back.keys() == tensors.keys()
    for key, tensor in tensors.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key
    assert digest == weights.content_hash(tmp_path / "x.safetensors")


@pytest.mark.parametrize("writer", ["save", "create"])
def test_checkpoint_files_are_readable_like_any_other_output(writer, tiny_checkpoint, tmp_path):
    previous = os.umask(0o022)
    try:
        out = tmp_path / "ckpt"
        if writer == "save":
            net, processor = model.load(tiny_checkpoint)
            model.save(net, processor.tokenizer, str(out))
        else:
            create("tiny", str(out))
    finally:
        os.umask(previous)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()}
    assert weights.WEIGHTS_NAME in modes and set(modes.values()) == {"0o644"}, modes


def test_save_writes_config_last_and_hashes_what_it_wrote(tiny_checkpoint, tmp_path, monkeypatch, s3_bucket):
    uploaded = []
    upload = storage.upload_file
    monkeypatch.setattr(storage, "upload_file", lambda src, uri: (uploaded.append(Path(src).name), upload(src, uri)))
    net, processor = model.load(tiny_checkpoint)
    revision = model.save(net, processor.tokenizer, f"s3://{s3_bucket}/m")
    assert uploaded[-1] == "config.json" and weights.WEIGHTS_NAME in uploaded
    assert model.load(f"s3://{s3_bucket}/m")[0].model_id == f"s3://{s3_bucket}/m@{revision}"
    local = tmp_path / "local"
    assert model.save(net, processor.tokenizer, str(local)) == revision
    assert revision == weights.content_hash(local / weights.WEIGHTS_NAME)[:16]


def test_export_copies_the_model_files_config_last(tiny_checkpoint, tmp_path, monkeypatch, s3_bucket):
    """A training checkpoint (model files plus optimizer state) exported to a loadable checkpoint."""
    run = tmp_path / "checkpoint_000003"
    shutil.copytree(tiny_checkpoint, run)
    (run / "optimizer.safetensors").write_bytes(b"x" * 100)
    (run / "train_state.json").write_text("{}")
    uploaded = []
    upload = storage.upload_file
    monkeypatch.setattr(storage, "upload_file", lambda src, uri: (uploaded.append(Path(src).name), upload(src, uri)))
    for target in (str(tmp_path / "best"), f"s3://{s3_bucket}/best"):
        uploaded.clear()
        names = weights.export_checkpoint(run, target)
        assert names == uploaded and uploaded[-1] == "config.json"
        assert "optimizer.safetensors" not in names and "train_state.json" not in names
        net, _ = model.load(target)
        assert net.config.num_labels == 1
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        weights.export_checkpoint(tmp_path / "best" / "..", str(tmp_path / "nowhere"))


def test_the_layout_knows_what_makes_a_checkpoint():
    assert weights.is_complete(["config.json", "model.safetensors", "tokenizer.json"])
    assert weights.is_complete(["config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors"])
    assert not weights.is_complete(["model.safetensors", "tokenizer.json"])  # config.json is written last
    assert not weights.is_complete(["config.json", "optimizer.safetensors"])
    assert weights.write_order(["config.json", "tokenizer.json", "model.safetensors"])[-1] == "config.json"
    assert not weights.is_model_file("optimizer.safetensors") and weights.is_model_file("model.safetensors")
