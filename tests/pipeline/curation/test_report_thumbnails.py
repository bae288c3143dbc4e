"""The curation report's images are made into thumbnails by the tasks that read them, so the driver that draws
the page never decodes a full image."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from jobs import sample_corpus as corpus
from pipeline.curation.report_html import Example, ReportData, Thumbnail, render_html
from pipeline.io.samples import SourceOptions


def _png(width: int, height: int) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def test_report_tasks_return_thumbnails_not_the_images_they_read(tmp_path):
    from pipeline.curation.report_data import fetch_examples

    big = _png(2000, 1500)
    shard = tmp_path / "in.tar"
    corpus.write_webdataset(str(shard), [{"key": "big", "image": big, "caption": "a big one", "ext": "png"},
                                         {"key": "bad", "image": b"not an image", "caption": "a bad one"}])
    found = fetch_examples({"uri": str(shard), "key": "in.tar"}, "webdataset", ["big", "bad"],
                           SourceOptions().model_dump())
    [thumb] = found["big"]["images"]
    assert isinstance(thumb, Thumbnail) and len(thumb.jpeg) < len(big) // 20
    assert Image.open(io.BytesIO(thumb.jpeg)).size == (160, 120)
    [bad] = found["bad"]["images"]
    assert bad.jpeg is None and bad.reason.startswith("decode: not a recognised image format")
    examples = [Example(i, "in.tar", "caption", 1.0, 1, found[i]["text"], found[i]["images"]) for i in ("big", "bad")]
    page = render_html(ReportData("t", "u", "r", [], {}, {}, [("s", examples)], "now"))
    assert page.count('class="thumb"') == 1 and page.count('class="placeholder"') == 1
    assert "not a recognised image format" in page
