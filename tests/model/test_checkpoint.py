"""Checkpoints: round trips (local, s3://, hub id), strict weight keys, no pickle, the LLaVA converter, create."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import model
from model.checkpoint import CheckpointError
from model.tokenization import tiny_tokenizer
from tests.support.images import jpeg_bytes

SAMPLES = [
    {"texts": [None, "a red square at the top"], "images": [jpeg_bytes("red"), None], "kind": "caption"},
    {"texts": ["intro", None, "body text", None], "images": [None, jpeg_bytes("blue"), None, jpeg_bytes("white")],
     "kind": "interleaved"},
]


def logits(uri_or_pair):
    net, processor = model.load(uri_or_pair) if isinstance(uri_or_pair, str) else uri_or_pair
    with torch.no_grad():
        return net(**processor(SAMPLES))


def test_local_round_trip_gives_identical_logits(tiny_checkpoint, tmp_path):
    net, processor = model.load(tiny_checkpoint)
    revision = model.save(net, processor.tokenizer, str(tmp_path / "copy"))
    reloaded = model.load(str(tmp_path / "copy"))
    assert torch.equal(logits((net, processor)), logits(reloaded))
    assert reloaded[0].model_id == f"{tmp_path / 'copy'}@{revision}"


def test_s3_round_trip_gives_identical_logits(tiny_checkpoint_4way, s3_bucket):
    net, processor = model.load(tiny_checkpoint_4way)
    uri = f"s3://{s3_bucket}/models/tiny4"
    model.save(net, processor.tokenizer, uri)
    reloaded_net, reloaded_processor = model.load(uri)
    assert reloaded_net.config.num_labels == 4
    assert torch.equal(logits((net, processor)), logits((reloaded_net, reloaded_processor)))
    assert reloaded_net.model_id.startswith(uri + "@")


def test_hub_id_loads_from_the_hub_cache(tiny_checkpoint, tmp_path, monkeypatch):
    """A hub id resolves through huggingface_hub (offline here): lay the checkpoint out as the hub cache does."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--unifilter-tiny"
    shutil.copytree(tiny_checkpoint, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    net, processor = model.load("acme/unifilter-tiny")
    assert net.model_id == f"acme/unifilter-tiny@{commit}"
    assert torch.equal(logits((net, processor)), logits(tiny_checkpoint))


def _rewrite_weights(src: str, dst: Path, edit) -> str:
    shutil.copytree(src, dst)
    weights = load_file(str(dst / "model.safetensors"))
    edit(weights)
    save_file(weights, str(dst / "model.safetensors"))
    return str(dst)


def test_missing_weight_key_fails_naming_it(tiny_checkpoint, tmp_path):
    uri = _rewrite_weights(tiny_checkpoint, tmp_path / "bad", lambda w: w.pop("projector.mlp.2.bias"))
    with pytest.raises(CheckpointError, match=r"missing weight keys \[projector\.mlp\.2\.bias\]"):
        model.load(uri)


def test_unexpected_weight_key_fails_naming_it(tiny_checkpoint, tmp_path):
    uri = _rewrite_weights(tiny_checkpoint, tmp_path / "bad",
                           lambda w: w.__setitem__("llm.extra_adapter.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"unexpected weight keys \[llm\.extra_adapter\.weight\]"):
        model.load(uri)


def test_pickled_weights_are_refused(tiny_checkpoint, tmp_path):
    bad = tmp_path / "pickled"
    shutil.copytree(tiny_checkpoint, bad)
    (bad / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, bad / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickled weights are refused"):
        model.load(str(bad))


# -- the released LLaVA layout -----------------------------------------------------------------------------------
def write_llava_checkpoint(tiny_checkpoint: str, out: Path, with_pad: bool = True, select_layer: int = -1) -> Path:
    """The released layout (weizhiwang/UniFilter-Qwen2.5-1.5B), in tiny: LLaVA keys, a Qwen2-style config with
    mm_* fields naming the tower's config directory, SigLIP's unused pooling-head weights, [PAD] in the tokenizer."""
    out.mkdir(parents=True)
    ours = load_file(str(Path(tiny_checkpoint) / "model.safetensors"))
    cfg = json.loads((Path(tiny_checkpoint) / "config.json").read_text())
    llava = {}
    for key, tensor in ours.items():
        if key.startswith("vision_tower."):
            llava["model.vision_tower.vision_tower.vision_model." + key[len("vision_tower."):]] = tensor
        elif key.startswith("projector.mlp."):
            llava["model.mm_projector.mlp_projector." + key[len("projector.mlp."):]] = tensor
        elif key.startswith("llm."):
            llava["model." + key[len("llm."):]] = tensor
        elif key == "score_head.weight":
            llava["score.weight"] = tensor
    width = cfg["vision"]["hidden_size"]
    llava["model.vision_tower.vision_tower.vision_model.head.probe"] = torch.zeros(1, 1, width)
    llava["model.vision_tower.vision_tower.vision_model.head.mlp.fc1.weight"] = torch.zeros(4, width)
    half = len(llava) // 2
    keys = sorted(llava)
    save_file({k: llava[k] for k in keys[:half]}, str(out / "model-00001-of-00002.safetensors"))
    save_file({k: llava[k] for k in keys[half:]}, str(out / "model-00002-of-00002.safetensors"))
    index = {"weight_map": {k: f"model-0000{1 if i < half else 2}-of-00002.safetensors" for i, k in enumerate(keys)}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))

    tower = out / "siglip_tower"
    tower.mkdir()
    (tower / "config.json").write_text(json.dumps({"model_type": "siglip", "vision_config": cfg["vision"]}))
    text = cfg["text"]
    (out / "config.json").write_text(json.dumps({
        "architectures": ["LlavaQwenClassifier"], "model_type": "llava_qwen", **text,
        "num_labels": 1, "id2label": {"0": "LABEL_0"}, "mm_vision_tower": str(tower),
        "mm_projector_type": "avgpool", "mm_hidden_size": cfg["vision"]["hidden_size"],
        "mm_num_image_tokens": cfg["pool_size"] ** 2, "mm_vision_select_layer": select_layer,
        "tokenizer_model_max_length": cfg["max_tokens"], "pad_token_id": cfg["pad_token_id"],
    }))
    tokenizer = tiny_tokenizer()  # the recipe's [PAD] is already added, as in the released tokenizer
    assert tokenizer.pad_token == "[PAD]" and tokenizer.pad_token_id == cfg["pad_token_id"]
    tokenizer.save_pretrained(str(out))
    return out


def test_llava_checkpoint_converts_and_matches_direct_load(tiny_checkpoint, tmp_path):
    from model.convert import main

    src = write_llava_checkpoint(tiny_checkpoint, tmp_path / "released")
    assert main(["--llava", str(src), "--output", str(tmp_path / "converted")]) == 0
    converted = model.load(str(tmp_path / "converted"))
    assert converted[0].config.num_labels == 1
    assert converted[0].config.pad_token_id == converted[1].tokenizer.convert_tokens_to_ids("[PAD]")
    assert torch.equal(logits(converted), logits(tiny_checkpoint))
    # model.load recognises the released layout and converts in memory too
    assert torch.equal(logits(str(src)), logits(tiny_checkpoint))


def test_llava_checkpoint_with_unknown_key_fails(tiny_checkpoint, tmp_path):
    src = write_llava_checkpoint(tiny_checkpoint, tmp_path / "released")
    shard = src / "model-00001-of-00002.safetensors"
    weights = load_file(str(shard))
    weights["lm_head.weight"] = torch.zeros(3, 3)
    save_file(weights, str(shard))
    with pytest.raises(CheckpointError, match=r"unexpected weight keys \['lm_head.weight'\]"):
        model.load(str(src))


def test_llava_converter_knows_the_so400m_tower_without_download():
    from model.llava import vision_config_for

    vision = vision_config_for("google/siglip-so400m-patch14-384", Path("/nonexistent"))
    assert (vision["hidden_size"], vision["num_hidden_layers"], vision["image_size"]) == (1152, 27, 384)


def test_create_cli_writes_a_loadable_4way_checkpoint(tmp_path, capsys):
    from model.create import main

    assert main(["--config", "tiny", "--output", str(tmp_path / "c"), "--num-labels", "4"]) == 0
    net, processor = model.load(str(tmp_path / "c"))
    assert net.config.num_labels == 4
    assert net.score(**processor(SAMPLES))["probs"].shape == (2, 4)


def test_real_size_configs_have_144_image_tokens_and_released_widths():
    for name, width in [("qwen2.5-0.5b", 896), ("qwen2.5-1.5b", 1536)]:
        cfg = model.get_config(name)
        assert cfg.tokens_per_image == 144 and cfg.grid_size == 27
        assert cfg.text["hidden_size"] == width and cfg.vision["hidden_size"] == 1152


def test_qwen25_tokenizer_is_built_offline_with_qwens_ids():
    from model.tokenization import qwen25_tokenizer

    tok = qwen25_tokenizer()
    assert tok("Hello world!", add_special_tokens=False).input_ids == [9707, 1879, 0]
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [151643, 151644, 151645]
    assert tok.pad_token == "[PAD]" and tok.pad_token_id == 151665
    assert tok.bos_token_id == tok.eos_token_id == 151643


def test_the_qwen25_tokenizer_is_built_once_per_process():
    from model.checkpoint import config_and_tokenizer
    from model.tokenization import qwen25_tokenizer

    first = qwen25_tokenizer()
    built = qwen25_tokenizer.cache_info().misses
    assert config_and_tokenizer("qwen2.5-0.5b")[1] is first and config_and_tokenizer("qwen2.5-1.5b")[1] is first
    assert qwen25_tokenizer.cache_info().misses == built


def test_llava_select_layer_minus_2_reads_the_penultimate_vision_layer(tiny_checkpoint, tmp_path):
    from model.convert import main

    src = write_llava_checkpoint(tiny_checkpoint, tmp_path / "released", select_layer=-2)
    net, processor = model.load(str(src))
    assert net.config.vision_select_layer == -2
    batch = processor(SAMPLES)
    with torch.no_grad():
        pixels = batch["pixel_values"].float() / 255.0
        direct = net.vision_tower(pixel_values=(pixels - 0.5) / 0.5, output_hidden_states=True).hidden_states
        assert len(direct) == net.config.vision["num_hidden_layers"] + 1  # the embeddings, then each layer
        torch.testing.assert_close(net.encode_images(batch["pixel_values"]), net.projector(direct[-2]))
        assert not torch.allclose(net.projector(direct[-2]), net.projector(direct[-1]))
        assert not torch.equal(logits((net, processor)), logits(tiny_checkpoint))  # a different layer, a new score
    assert main(["--llava", str(src), "--output", str(tmp_path / "converted")]) == 0
    converted = model.load(str(tmp_path / "converted"))
    assert converted[0].config.vision_select_layer == -2
    assert torch.equal(logits(converted), logits((net, processor)))


def _refuse_weight_reads(monkeypatch):
    """Every way the library reads tensor data raises: a processor-only load must not get there."""
    from model import checkpoint, weights

    def refuse(*args, **kwargs):
        raise AssertionError("a processor-only load read the weights")

    for module, name in [(weights, "iter_tensors"), (weights, "read_weights"), (weights, "load_weights"),
                         (checkpoint, "load_weights"), (checkpoint, "read_weights"), (checkpoint, "load")]:
        monkeypatch.setattr(module, name, refuse)


def test_load_processor_on_a_llava_checkpoint_reads_only_headers(tiny_checkpoint, tmp_path, monkeypatch):
    from model.checkpoint import load_processor

    src = write_llava_checkpoint(tiny_checkpoint, tmp_path / "released")
    expected_processor, expected_id = model.load(str(src))[1], model.load(str(src))[0].model_id
    _refuse_weight_reads(monkeypatch)
    processor, model_id = load_processor(str(src))
    assert model_id == expected_id
    assert processor.config == expected_processor.config
    assert processor.config.num_labels == 1 and processor.config.text["vocab_size"] == 1024


def test_load_processor_on_a_llava_checkpoint_in_s3_reads_header_bytes_only(tiny_checkpoint, tmp_path, monkeypatch,
                                                                             s3_bucket, checkpoint_cache):
    """On object storage: the small files are fetched, and of the weights only their headers are read (two
    ranged reads per shard), far below the shards' size."""
    from model import storage, weights
    from model.checkpoint import load_processor

    src = write_llava_checkpoint(tiny_checkpoint, tmp_path / "released")
    uri = f"s3://{s3_bucket}/released"
    for path in src.rglob("*"):
        if path.is_file():
            storage.upload_file(path, storage.join(uri, str(path.relative_to(src))))
    shard_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))

    read = []

    class CountingFile:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def size(self):
            return self.f.size()

        def read_at(self, nbytes, offset):
            read.append(nbytes)
            return self.f.read_at(nbytes, offset)

    class CountingFilesystem:
        def __init__(self, fs):
            self.fs = fs

        def open_input_file(self, path):
            return CountingFile(self.fs.open_input_file(path))

    counting = type(storage)("counting_storage")
    counting.filesystem_for = lambda uri: (lambda fs, path: (CountingFilesystem(fs), path))(
        *storage.filesystem_for(uri))
    monkeypatch.setattr(weights, "storage", counting)
    _refuse_weight_reads(monkeypatch)

    processor, model_id = load_processor(uri)
    assert processor.config.num_labels == 1 and model_id == uri
    assert len(read) == 4 and sum(read) < shard_bytes / 50, (read, shard_bytes)
    cached = [p.name for p in checkpoint_cache.rglob("*") if p.is_file()]
    assert "config.json" in cached and not [n for n in cached if n.endswith(".safetensors")]
