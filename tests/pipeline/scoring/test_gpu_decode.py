"""JPEGs decoded on the scoring actor's device (`image_decoder: nvjpeg`, `pipeline.scoring.gpu_decode`): its pixels
and scores agree with the Pillow path's; a corrupt JPEG is its sample's error record while the others are scored;
what the device should not decode (a PNG, a truncated JPEG) takes the Pillow path; the decompression-bomb guards
(pixels, JPEG scans) hold before anything is decoded; a CUDA error is the device's fault; the setting is part of
the output's identity and needs torchvision, which a run without it says at once, naming the field.

The device decoder is torchvision's `decode_jpeg` where a torchvision built for the installed torch loads (its CPU
decoder here: libjpeg-turbo). Where none does (PyPI's torchvision is the CUDA build, which does not load beside
these machines' CPU torch), Pillow's JPEG decoder (libjpeg-turbo too) stands in for it, so everything around the
decode call (sniffing, the guard, the batched call and its retry, the fallbacks, pad and resize on the device, the
micro-batch) runs here all the same."""

from __future__ import annotations

import io
import random
import struct
import sys

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

import model
from benchmarks.inputs import photos
from jobs import sample_corpus as corpus
from model.processing import JPEG_MAX_SCANS
from pipeline.commit.markers import end_marker
from pipeline.errors import DeviceFault
from pipeline.scoring import ScoreConfig
from pipeline.scoring.gpu_decode import DeviceImageDecoder, torchvision_decode_jpegs, torchvision_problem
from pipeline.scoring.reading import sample_rows
from pipeline.scoring.scorer import BatchScorer
from tests.support.hostile import scan_bomb_jpeg

TORCHVISION = torchvision_problem() is None


def pillow_decode_jpegs(datas: list, device) -> list:
    """Stands in for torchvision's decode_jpeg where it cannot load: the same contract (a list of encoded JPEGs in,
    (3, H, W) uint8 RGB tensors on `device` out, an error for the whole call when one is bad)."""
    out = []
    for data in datas:
        img = Image.open(io.BytesIO(data.numpy().tobytes()), formats=("JPEG",))
        img.load()
        out.append(torch.from_numpy(np.asarray(img.convert("RGB")).transpose(2, 0, 1).copy()).to(device))
    return out


class Recording:
    """The device decoder, with what it was handed: one list of sizes per call."""

    def __init__(self, decode=None):
        self.decode = decode or (torchvision_decode_jpegs if TORCHVISION else pillow_decode_jpegs)
        self.calls: list[list[int]] = []

    def __call__(self, datas: list, device) -> list:
        self.calls.append([int(d.numel()) for d in datas])
        return self.decode(datas, device)

    def saw(self, data: bytes) -> bool:
        return any(len(data) in call for call in self.calls)


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    return model.load(tiny_checkpoint)


def on_device(net, processor, decode=None) -> tuple[BatchScorer, Recording]:
    """A scorer whose JPEGs are decoded on the model's device, and what its device decoder was handed."""
    recording = Recording(decode)
    scorer = BatchScorer(net, processor, token_budget=10**6, max_batch=8)
    scorer.device_images = DeviceImageDecoder(processor, net.device, decode_jpegs=recording)
    return scorer, recording


def caption_table(images: list[bytes]) -> pa.Table:
    """One caption sample per image, as the scoring actors receive them, then the shard's end marker."""
    rows = [{"id": f"s{i}", "source": "x.tar", "kind": "caption", "ordinal": i, "texts": [None, s["caption"]],
             "images": [image, None], "error": None}
            for i, (image, s) in enumerate(zip(images, corpus.caption_samples(len(images), seed=4)))]
    return sample_rows([*rows, end_marker("x.tar", len(rows))])


def records(table: pa.Table) -> list[dict]:
    return [r for r in table.to_pylist() if not r["kind"].startswith("_")]


def good_jpegs(n: int) -> list[bytes]:
    return [s["image"] for s in corpus.caption_samples(n, seed=5)]


def patched_sof(jpeg: bytes, **fields) -> bytes:
    """`jpeg` with its frame header (SOF0) changed: `height`, `width`, or `quant_table` (component 1's)."""
    data = bytearray(jpeg)
    sof = data.index(b"\xff\xc0")
    if "height" in fields:
        data[sof + 5:sof + 9] = struct.pack(">HH", fields["height"], fields["width"])
    if "quant_table" in fields:
        data[sof + 12] = fields["quant_table"]
    return bytes(data)


def test_device_decoded_pixels_agree_with_the_pillow_paths(loaded):
    """Measured at the released models' 384 px, on photo-like JPEGs at 512 px and a megapixel: a mean difference of
    0.001 grey levels and at most 2 (the resize's rounding: fixed point in Pillow, float here). With torchvision's
    CPU decoder or the Pillow stand-in the decoded pixels are libjpeg-turbo's either way; nvJPEG's own IDCT and
    chroma upsampling are measured by benchmarks/gpu.py on a GPU."""
    _, processor = loaded
    processor = model.UniFilterProcessor(processor.config.model_copy(
        update={"vision": {**processor.config.vision, "image_size": 384}}), processor.tokenizer)
    images = photos(6, "512", seed=2) + photos(2, "1mp", seed=3)
    planned = [processor.plan([None, "x"], [image, None], "caption") for image in images]
    pillow = np.stack([processor.decode(p).pixel_values for p in planned]).astype(np.int16)
    decoder = DeviceImageDecoder(processor, "cpu", decode_jpegs=Recording())
    device = np.stack([s.pixel_values.numpy() for s in decoder.decode(planned)]).astype(np.int16)
    assert device.shape == pillow.shape == (8, 1, 3, 384, 384)
    difference = np.abs(device - pillow)
    assert difference.mean() < 0.01 and difference.max() <= 2, (difference.mean(), difference.max())


def test_scores_agree_with_the_pillow_paths(loaded):
    net, processor = loaded
    table = caption_table(good_jpegs(8))
    pillow = records(BatchScorer(net, processor, token_budget=10**6, max_batch=8).score_table(table))
    scorer, recording = on_device(net, processor)
    device = records(scorer.score_table(table))
    assert len(recording.calls) == 1 and len(recording.calls[0]) == 8  # one batched call for the micro-batch
    assert [r["error"] for r in device] == [None] * 8
    assert np.abs(np.array([r["score"] for r in device]) - [r["score"] for r in pillow]).max() < 1e-3


def test_a_corrupt_jpeg_is_its_samples_error_record_and_the_others_are_scored(loaded):
    net, processor = loaded
    images = good_jpegs(5)
    images[2] = patched_sof(images[2], quant_table=3)  # a quantisation table the file never defines
    scorer, recording = on_device(net, processor)
    out = records(scorer.score_table(caption_table(images)))
    expected = records(BatchScorer(net, processor, token_budget=10**6, max_batch=8).score_table(
        caption_table(images)))[2]["error"]
    assert out[2]["error"] == expected and expected.startswith("decode: corrupt image")
    assert all(r["error"] is None and r["score"] is not None for k, r in enumerate(out) if k != 2)
    assert len(recording.calls) == 1 + 5  # the batch failed, then one image at a time found the bad one


def test_a_png_takes_the_pillow_path(loaded):
    net, processor = loaded
    png = corpus.draw(corpus.random_scene(random.Random(1)), fmt="PNG")
    images = [*good_jpegs(2), png]
    scorer, recording = on_device(net, processor)
    planned = [processor.plan([None, "x"], [image, None], "caption") for image in images]
    decoded = scorer.device_images.decode(planned)
    assert not recording.saw(png) and recording.calls == [[len(images[0]), len(images[1])]]
    assert np.array_equal(decoded[2].pixel_values.numpy(), processor.decode(planned[2]).pixel_values)
    assert records(scorer.score_table(caption_table(images)))[2]["score"] is not None


def test_a_truncated_jpeg_is_left_to_the_pillow_path(loaded):
    """A JPEG without its end-of-image marker: the device decoder might fill in what is missing; Pillow refuses."""
    net, processor = loaded
    images = good_jpegs(3)
    images[1] = images[1][: len(images[1]) * 2 // 3]
    scorer, recording = on_device(net, processor)
    out = records(scorer.score_table(caption_table(images)))
    assert not recording.saw(images[1])
    assert out[1]["error"] == processor_error(processor, images[1]) and out[1]["error"].startswith("decode: ")
    assert out[0]["score"] is not None and out[2]["score"] is not None


def processor_error(processor, image: bytes) -> str:
    from model.errors import SampleError

    with pytest.raises(SampleError) as refused:
        processor.image_pixels(image)
    return refused.value.reason


def test_an_oversized_jpeg_header_is_refused_before_decoding(loaded):
    """A small file whose header claims 9000 x 9000 pixels (81 MP, over the 64 MP default): refused from the header
    in the Pillow path's words; the device decoder never sees it."""
    net, processor = loaded
    images = good_jpegs(3)
    images[0] = patched_sof(images[0], height=9000, width=9000)
    scorer, recording = on_device(net, processor)
    out = records(scorer.score_table(caption_table(images)))
    assert out[0]["error"] == "decode: image too large: 9000x9000 pixels exceeds the limit of 64000000"
    assert out[0]["error"] == processor_error(processor, images[0])
    assert not recording.saw(images[0]) and out[1]["score"] is not None


def test_a_scan_bomb_is_refused_before_the_device_decodes_it(loaded):
    """A progressive JPEG of 510 scans (decoded, a valid image after a time linear in its scans): its sample's error
    record in the Pillow path's words; the device decoder never sees it."""
    net, processor = loaded
    images = good_jpegs(3)
    images[1] = scan_bomb_jpeg(256, scans=JPEG_MAX_SCANS)
    scorer, recording = on_device(net, processor)
    out = records(scorer.score_table(caption_table(images)))
    assert out[1]["error"].startswith(f"decode: JPEG has more than {JPEG_MAX_SCANS} scans at 256x256")
    assert out[1]["error"] == processor_error(processor, images[1])
    assert not recording.saw(images[1]) and out[0]["score"] is not None and out[2]["score"] is not None


def test_a_cuda_error_while_decoding_is_a_device_fault_not_a_record(loaded):
    net, processor = loaded

    def broken_device(datas, device):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    scorer, _ = on_device(net, processor, decode=broken_device)
    with pytest.raises(DeviceFault, match="illegal memory access"):
        scorer.score_table(caption_table(good_jpegs(4)))


def test_the_output_identity_names_the_nvjpeg_decoder():
    """Scores decoded by another decoder never mix with Pillow's in one output; outputs of the default keep the
    identity they had."""
    base = dict(input="in", format="webdataset", output="out", model="m", gpus_per_actor=0)
    default = ScoreConfig(**base).identity("m")
    assert "image_decoder" not in default
    assert ScoreConfig(**base, image_decoder="nvjpeg").identity("m") == {**default, "image_decoder": "nvjpeg"}


def test_nvjpeg_with_jpeg_draft_is_refused_naming_image_decoder():
    with pytest.raises(ValueError, match="field 'image_decoder'.*jpeg_draft"):
        ScoreConfig(input="in", format="webdataset", output="out", model="m", image_decoder="nvjpeg",
                    jpeg_draft=True)


def test_without_torchvision_the_job_fails_naming_image_decoder(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    from jobs.score import main

    monkeypatch.setitem(sys.modules, "torchvision", None)  # `import torchvision` raises ImportError
    corpus.write_webdataset(str(tmp_path / "in" / "00000.tar"), corpus.caption_samples(4, seed=1))
    status = main(["--input", str(tmp_path / "in"), "--format", "webdataset", "--output", str(tmp_path / "out"),
                   "--model", tiny_checkpoint, "--image-decoder", "nvjpeg"])
    error = capsys.readouterr().err
    assert status == 2 and "image_decoder" in error and "torchvision" in error, error
    assert not (tmp_path / "out").exists()  # nothing written
