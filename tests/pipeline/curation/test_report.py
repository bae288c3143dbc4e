"""The curation report (pipeline/curation/report_html.py), checked the way a user sees it: opened offline in
headless Chromium.

No Ray: the report data is built by hand from drawn images (`jobs.sample_corpus`) and fake scores. Chromium runs
three times in all: the report itself (DOM and screenshot in one run), the report with its CSP taken out (so the
escaping alone must stop the hostile captions, with a trusted canary proving scripts do run on that page), and a
narrow window.
"""

from __future__ import annotations

import base64
import io
import re
import struct
import zlib
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs import sample_corpus as corpus
from model.errors import SampleError
from pipeline.curation.report_html import (
    DROPPED_COLOR,
    KEPT_COLOR,
    THRESHOLD_COLOR,
    Example,
    KindStats,
    ReportData,
    histogram_png,
    render_html,
    thumbnail,
    write_report,
)
from tests.support.browser import Browser, find_or_install_chromium

HOSTILE = [
    "<script>document.title='PWNED'</script>",
    "<img src=x onerror=\"document.body.setAttribute('data-pwned','1')\">",
    "</textarea><script>alert(1)</script>",
]
HOSTILE_ID = "\"><img src=x onerror=\"document.body.setAttribute('data-pwned','id')\">"
HOSTILE_SOURCE = "</title><script>document.title='PWNED'</script>.tar"
HOSTILE_REASON = "decode: <script>document.body.setAttribute('data-pwned','reason')</script>"
TITLE = "Curation report <b>r1</b>"


def _hex(color: str) -> tuple[int, int, int]:
    return tuple(int(color[i:i + 2], 16) for i in (1, 3, 5))


def png_bomb(width: int = 60_000, height: int = 60_000) -> bytes:
    """A valid PNG header claiming width x height pixels (3.6 G here) with almost no data: a decompression bomb
    that must be refused from its header, before any pixel is allocated."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def truncated_jpeg() -> bytes:
    data = corpus.draw(corpus.Scene("circle", "red", 2, "left", "blue"), size=256)
    return data[: len(data) // 3]


BAD_IMAGES = [b"this is not an image", png_bomb(), truncated_jpeg()]


def fake_kind(kind: str, n: int, keep_fraction: float, rng: np.random.Generator) -> tuple[KindStats, np.ndarray]:
    scores = np.clip(rng.normal(1.7, 0.75, n), 0.0, 3.0)
    labels = np.clip(np.rint(scores + rng.normal(0, 0.5, n)), 0, 3).astype(int)
    counts, edges = np.histogram(scores, bins=30, range=(0.0, 3.0))
    threshold = float(np.quantile(scores, 1 - keep_fraction))
    kept = scores >= threshold
    by = lambda mask: {lvl: int(((labels == lvl) & mask).sum()) for lvl in range(4)}  # noqa: E731
    return KindStats(kind, edges.tolist(), counts.tolist(), threshold, int(kept.sum()), int((~kept).sum()),
                     by(kept), by(~kept)), scores


@pytest.fixture(scope="module")
def report_data() -> ReportData:
    rng = np.random.default_rng(7)
    cap_stats, _ = fake_kind("caption", 400, 0.3, rng)
    doc_stats, _ = fake_kind("interleaved", 250, 0.3, rng)
    caps = corpus.caption_samples(12, seed=5)
    docs = corpus.documents(3, seed=6)

    def cap(i: int, score: float, label: int, **kw) -> Example:
        c = caps[i]
        return Example(**{"id": c["key"], "source": "captions/00000.tar", "kind": "caption", "score": score,
                          "label": label, "text": c["caption"], "images": [c["image"]], **kw})

    def doc(d: dict, score: float) -> Example:
        text = " ".join(t for t in d["texts"] if t)
        return Example(d["key"], "documents/00000.parquet", "interleaved", score, 3, text,
                       [img for img in d["images"] if img is not None])

    cut = cap_stats.threshold
    level3 = [cap(i, 2.9 - 0.01 * i, 3) for i in range(4)] + [doc(d, 2.8) for d in docs]
    above = [cap(4 + i, cut + 0.01 * (i + 1), 2) for i in range(4)]
    below = [
        cap(8, cut - 0.01, 2, text=HOSTILE[0]),
        cap(9, cut - 0.02, 2, text=HOSTILE[1], id=HOSTILE_ID),
        cap(10, cut - 0.03, 1, text=HOSTILE[2], source=HOSTILE_SOURCE),
        # one example, three bad images (not an image, a bomb, a truncated JPEG) around a good one
        cap(11, cut - 0.04, 1, images=[BAD_IMAGES[0], caps[11]["image"], BAD_IMAGES[1], BAD_IMAGES[2]]),
    ]
    return ReportData(
        title=TITLE, scores_uri="s3://bucket/scores/laion", rule="keep-fraction 0.3 per kind",
        kinds=[cap_stats, doc_stats],
        errors_by_reason={"decode": 12, "empty": 3, "malformed": 1},
        error_examples={"decode": HOSTILE_REASON, "empty": "empty: no caption", "malformed": "malformed: lists"},
        sections=[("Predicted level 3", level3), ("Just above the threshold (caption)", above),
                  ("Just below the threshold (caption)", below)],
        generated_at="2026-11-30T12:00:00Z")


@pytest.fixture(scope="module")
def browser() -> Browser:
    return Browser(find_or_install_chromium())


@pytest.fixture(scope="module")
def written(report_data, tmp_path_factory) -> str:
    directory = tmp_path_factory.mktemp("report") / "run" / "report"
    uri = write_report(str(directory), report_data)
    assert uri == str(directory / "index.html")
    return uri


@pytest.fixture(scope="module")
def loaded(browser, written, tmp_path_factory):
    shot = tmp_path_factory.mktemp("shot") / "report.png"
    return browser.load(written, screenshot=shot, window=(1280, 3000))


# -- parsing the DOM Chromium dumped -------------------------------------------------------------------------------
class Dom(HTMLParser):
    """Elements of interest from a serialised DOM: per section, its examples' thumbnails, placeholders and texts."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.title = ""
        self.hists: list[str] = []
        self.sections: list[dict] = []
        self.attrs_seen: list[tuple[str, str, str | None]] = []
        self._in: str | None = None
        self._buf: list[str] = []
        self.feed(html)
        self.close()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for name, value in attrs:
            self.attrs_seen.append((tag, name, value))
        cls = (a.get("class") or "").split()
        if tag == "title":
            self._in, self._buf = "title", []
        elif tag == "section" and "examples" in cls:
            self.sections.append({"examples": 0, "thumbs": [], "placeholders": 0, "texts": [], "ids": []})
        elif tag == "img" and "hist" in cls:
            self.hists.append(a.get("src", ""))
        elif self.sections and tag == "article" and "example" in cls:
            self.sections[-1]["examples"] += 1
        elif self.sections and tag == "img" and "thumb" in cls:
            self.sections[-1]["thumbs"].append(a.get("src", ""))
        elif self.sections and tag == "div" and "placeholder" in cls:
            self.sections[-1]["placeholders"] += 1
        elif self.sections and tag in ("p", "div") and ("text" in cls or "id" in cls):
            self._in, self._buf = ("text" if "text" in cls else "id"), []

    def handle_data(self, data):
        if self._in:
            self._buf.append(data)

    def handle_endtag(self, tag):
        if self._in == "title" and tag == "title":
            self.title = "".join(self._buf)
            self._in = None
        elif self._in in ("text", "id") and tag in ("p", "div"):
            self.sections[-1]["texts" if self._in == "text" else "ids"].append("".join(self._buf))
            self._in = None


def _decodes(data: bytes) -> bool:
    try:
        thumbnail(data)
    except SampleError:
        return False
    return True


def _data_image(src: str, mime: str) -> Image.Image:
    prefix = f"data:{mime};base64,"
    assert src.startswith(prefix), src[:60]
    img = Image.open(io.BytesIO(base64.b64decode(src[len(prefix):])))
    img.load()
    return img


def near(pixels: np.ndarray, rgb: tuple[int, int, int], tol: int = 14) -> int:
    pixels = pixels if pixels.dtype == np.int16 else pixels.astype(np.int16)
    return int((np.abs(pixels - np.array(rgb, dtype=np.int16)).max(axis=-1) <= tol).sum())


# -- the tests -----------------------------------------------------------------------------------------------------
def test_report_opens_offline_with_no_console_errors(loaded):
    assert loaded.problems == [], "\n".join(loaded.problems)
    assert loaded.requests == []  # no fetch at all (any would have failed: the network is off)
    assert not [line for line in loaded.console if "Uncaught" in line or "Refused" in line]
    dom = loaded.dom
    assert "Content-Security-Policy" in dom and "default-src 'none'" in dom and "img-src data:" in dom
    # every resource the page names is inline: no element refers to anything but a data: URI
    refs = [(tag, name, value) for tag, name, value in Dom(dom).attrs_seen
            if name in ("src", "href", "srcset", "action", "poster", "data", "background", "formaction")]
    assert refs and all((value or "").startswith("data:") for _, _, value in refs), refs
    assert not [tag for tag, _, _ in Dom(dom).attrs_seen if tag in ("link", "script", "iframe", "object", "embed")]
    styles = "".join(re.findall(r"<style[^>]*>(.*?)</style>", dom, re.S))
    assert styles and "url(" not in styles and "@import" not in styles


def test_dom_holds_histograms_and_every_example(loaded, report_data):
    dom = Dom(loaded.dom)
    assert len(dom.hists) == len(report_data.kinds) == 2
    for src in dom.hists:
        img = _data_image(src, "image/png")
        assert img.format == "PNG" and img.width > 400 and img.height > 200
    assert len(dom.sections) == len(report_data.sections)
    for (heading, examples), seen in zip(report_data.sections, dom.sections):
        images = [img for ex in examples for img in ex.images[:4]]
        good = sum(_decodes(img) for img in images)
        assert seen["examples"] == len(examples), heading
        assert len(seen["thumbs"]) == good, heading
        assert seen["placeholders"] == len(images) - good, heading
        for src in seen["thumbs"]:
            thumb = _data_image(src, "image/jpeg")
            assert thumb.format == "JPEG" and max(thumb.size) <= 160
        assert len(seen["texts"]) == len(examples)
        for ex, text in zip(examples, seen["texts"]):
            if ex.kind == "caption" or len(ex.text) <= 300:  # captions in full (all under 300 chars here)
                assert text == ex.text
            else:  # a document: an excerpt, cut with an ellipsis
                assert text.endswith("\u2026") and 250 < len(text) < len(ex.text) and ex.text.startswith(text[:-1])
        assert seen["ids"] == [ex.id for ex in examples]
    # the bad images of the last section: three placeholders, the good image beside them still shown
    assert dom.sections[2]["placeholders"] == 3
    assert "image could not be decoded" in loaded.dom and "image too large" in loaded.dom


def test_screenshot_shows_histograms_and_thumbnails(loaded, report_data):
    shot = np.asarray(Image.open(loaded.screenshot).convert("RGB")).astype(np.int16)
    assert shot.shape[:2] == (3000, 1280)
    packed = (shot[::2, ::2].astype(np.int32) * np.array([65536, 256, 1])).sum(axis=-1)
    assert shot.std() > 20 and len(np.unique(packed)) > 500  # not blank
    # the histogram bars (kept and dropped bins) and the threshold line, drawn by matplotlib
    assert near(shot, _hex(KEPT_COLOR), 6) > 3000
    assert near(shot, _hex(DROPPED_COLOR), 6) > 3000
    assert near(shot, _hex(THRESHOLD_COLOR), 10) > 150
    # the drawn thumbnails: every coloured background of the examples shown shows up as a patch of its colour
    backgrounds = {corpus.caption_samples(12, seed=5)[i]["meta"]["scene"]["background"] for i in range(12)}
    for name in sorted(backgrounds - {"white", "black"}):
        assert near(shot, corpus.COLORS[name], 16) > 2000, name
    # the drawn shapes' colours (as a whole) inside the thumbnail area, below the histograms
    shapes = sum(near(shot[1000:], corpus.COLORS[c], 16) for c in corpus.COLORS if c not in ("white", "black"))
    assert shapes > 40_000


def test_untrusted_text_is_shown_as_text_and_never_runs(loaded):
    raw = loaded.dom
    dom = Dom(raw)
    assert dom.title == TITLE  # the page's title, escaped, not PWNED
    assert "PWNED" not in dom.title
    assert "data-pwned" not in [name for _, name, _ in dom.attrs_seen]
    assert not [(tag, name) for tag, name, _ in dom.attrs_seen if name.startswith("on")]
    assert not re.search(r"<\s*script", raw, re.IGNORECASE)  # no script element came out of any text
    assert not re.search(r"<textarea", raw, re.IGNORECASE)
    # the captions are there, literally, as text
    texts = dom.sections[2]["texts"]
    assert texts[:3] == HOSTILE
    assert "&lt;script&gt;document.title='PWNED'&lt;/script&gt;" in raw
    assert "&lt;img src=x onerror=\"document.body.setAttribute('data-pwned','1')\"&gt;" in raw
    assert "&lt;/textarea&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in raw
    assert dom.sections[2]["ids"][1] == HOSTILE_ID
    assert "&lt;/title&gt;&lt;script&gt;" in raw
    assert "&lt;script&gt;document.body.setAttribute('data-pwned','reason')" in raw


def test_escaping_alone_stops_the_injection(browser, report_data, tmp_path):
    """The same page without its CSP, plus a trusted canary script and a deliberately raw onerror image: the
    canaries prove scripts and onerror handlers run on this page, so only the escaping keeps the captions inert."""
    page = render_html(report_data)
    page, n = re.subn(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", page)
    assert n == 1
    canary = ("<img src=x onerror=\"document.body.setAttribute('data-canary-img','1')\">"
              "<script>document.body.setAttribute('data-canary','1')</script>")
    page = page.replace("</body>", canary + "</body>")
    path = tmp_path / "no-csp.html"
    path.write_text(page, encoding="utf-8")
    result = browser.load(path)
    dom = Dom(result.dom)
    body = {name: value for tag, name, value in dom.attrs_seen if tag == "body"}
    assert body.get("data-canary") == "1" and body.get("data-canary-img") == "1", result.stderr[-2000:]
    assert "data-pwned" not in [name for _, name, _ in dom.attrs_seen]
    assert dom.title == TITLE
    assert dom.sections[2]["texts"][:3] == HOSTILE
    assert not [line for line in result.console if "Uncaught" in line]


def test_narrow_window_still_shows_the_report(browser, written, tmp_path):
    result = browser.load(written, screenshot=tmp_path / "narrow.png", window=(420, 1800))
    assert result.problems == []
    shot = np.asarray(Image.open(result.screenshot).convert("RGB"))
    assert shot.shape[:2] == (1800, 420)
    assert near(shot, _hex(KEPT_COLOR), 6) > 500  # the histograms shrink to the window, still drawn


def test_bad_images_become_placeholders(report_data):
    for bad in BAD_IMAGES:
        with pytest.raises(SampleError):
            thumbnail(bad)
    with pytest.raises(SampleError, match="too large"):
        thumbnail(png_bomb())
    good = thumbnail(corpus.draw(corpus.Scene("square", "red", 1, "center", "blue"), size=600))
    img = Image.open(io.BytesIO(good))
    assert img.format == "JPEG" and max(img.size) == 160
    only_bad = Example("x", "s", "caption", 1.0, None, "caption", [*BAD_IMAGES, None, "text, not bytes"])
    page = render_html(ReportData("t", "u", "r", [], {}, {}, [("bad", [only_bad])], "now"))
    assert page.count('class="placeholder"') == 4 and 'class="thumb"' not in page  # the first 4 images


def test_histogram_is_matplotlib_png_with_the_threshold(report_data):
    stats = report_data.kinds[0]
    img = np.asarray(Image.open(io.BytesIO(histogram_png(stats))).convert("RGB"))
    assert near(img, _hex(KEPT_COLOR), 6) > 1000 and near(img, _hex(DROPPED_COLOR), 6) > 1000
    assert near(img, _hex(THRESHOLD_COLOR), 10) > 100
    no_cut = KindStats("caption", stats.bin_edges, stats.counts, None, stats.kept + stats.dropped, 0, {}, {})
    img = np.asarray(Image.open(io.BytesIO(histogram_png(no_cut))).convert("RGB"))
    assert near(img, _hex(THRESHOLD_COLOR), 10) == 0 and near(img, _hex(DROPPED_COLOR), 6) == 0
    empty = KindStats("interleaved", [], [], 1.5, 0, 0, {}, {})
    assert histogram_png(empty).startswith(b"\x89PNG")


def test_header_and_tables(report_data):
    page = render_html(report_data)
    kept = sum(k.kept for k in report_data.kinds)
    dropped = sum(k.dropped for k in report_data.kinds)
    assert "keep-fraction 0.3 per kind" in page
    assert f"kept <b>{kept:,}</b>, dropped <b>{dropped:,}</b>" in page
    for k in report_data.kinds:
        assert f"threshold {k.threshold:.3f}" in page
        for level in range(4):
            a, b = k.kept_by_level[level], k.dropped_by_level[level]
            assert f"<td>{a:,}</td><td>{b:,}</td><td>{a + b:,}</td>" in page
    assert '<td class="l reason">decode</td><td>12</td>' in page and "<td>16</td>" in page  # errors and their total
    assert "<script" not in page.lower()


def test_write_report_local_and_s3(report_data, written, s3_bucket):
    import boto3

    with open(written, encoding="utf-8") as f:
        local = f.read()
    assert local.startswith("<!DOCTYPE html>") and local.rstrip().endswith("</html>")
    assert [p.name for p in Path(written).parent.iterdir()] == ["index.html"]  # no temporary file left
    uri = write_report(f"s3://{s3_bucket}/runs/r1/report/", report_data)
    assert uri == f"s3://{s3_bucket}/runs/r1/report/index.html"
    obj = boto3.client("s3").get_object(Bucket=s3_bucket, Key="runs/r1/report/index.html")
    body = obj["Body"].read().decode("utf-8")
    assert obj["ContentType"].startswith("text/html")
    assert body.count('class="hist"') == 2 and body.count('<article class="example') == 15
    assert body == local  # the same page, byte for byte
