"""The visual report of a curation run: one self-contained `index.html` to judge a threshold at a glance.

The page needs no network and no JavaScript: CSS is inline (allowed by its hash in a Content-Security-Policy that
forbids scripts and every fetch), the score histograms are matplotlib PNGs (Agg) and the example thumbnails are
JPEGs, all embedded as `data:` URIs. Every text that came from the data (captions, document excerpts, ids, shard
names, error reasons) is untrusted and goes through `html.escape` (`report_markup.esc`). Images are untrusted too:
each is decoded with the model's bomb-guarded decoder and an image that does not decode becomes a placeholder box,
never a failure.
Where the images are read (a curation's report tasks) they are made into `Thumbnail`s there, so the process that
draws the page never decodes a full image.

```python
from pipeline.curation.report_html import Example, KindStats, ReportData, write_report

uri = write_report("s3://bucket/runs/r1/report", ReportData(...))   # -> "s3://bucket/runs/r1/report/index.html"
```
"""

from __future__ import annotations

import base64
import hashlib
import io
import math
from dataclasses import dataclass, field

from model.errors import Category, SampleError
from model.limits import DEFAULT_MAX_IMAGE_PIXELS
from model.processing import decode_image
from pipeline.curation.report_markup import (
    DROPPED_COLOR,
    KEPT_COLOR,
    THRESHOLD_COLOR,
    data_uri,
    esc,
    num,
    pct,
)
from pipeline.curation.report_sections import extras_html
from pipeline.io.publish import write_bytes
from pipeline.io.uris import filesystem_for, join, normalize_uri, to_uri

__all__ = ["Example", "KindStats", "ReportData", "Thumbnail", "render_html", "thumbnail", "histogram_png",
           "make_thumbnail", "write_report", "THUMB_PX", "MAX_IMAGES", "KEPT_COLOR", "DROPPED_COLOR", "THRESHOLD_COLOR"]

THUMB_PX = 160  # longest side of an embedded thumbnail
MAX_IMAGES = 4  # images shown per example
CAPTION_CHARS = 300  # a caption is shown in full up to this many characters
EXCERPT_CHARS = 320  # a document's excerpt
ID_CHARS = 120
REASON_CHARS = 300
THUMB_MAX_PIXELS = DEFAULT_MAX_IMAGE_PIXELS  # what the scorer accepts, the report can show


@dataclass(frozen=True)
class Thumbnail:
    """An image made ready for the page where it was read: a small JPEG, or why the image cannot be shown."""

    jpeg: bytes | None
    reason: str | None = None


@dataclass
class Example:
    id: str
    source: str  # the input shard it came from
    kind: str  # "caption" or "interleaved"
    score: float
    label: int | None  # predicted level 0-3
    text: str  # the caption, or an excerpt of the document: UNTRUSTED web text
    # up to 4: encoded image bytes (UNTRUSTED, may be corrupt; decoded when the page is drawn), or Thumbnails
    images: list[bytes | Thumbnail] = field(default_factory=list)
    truncated: bool | None = None  # the text was cut to the model's length
    n_images: int | None = None
    decision: str | None = None  # "kept", or "dropped: <the rule that removed it>"


@dataclass
class KindStats:
    kind: str
    bin_edges: list[float]  # score histogram of every scored record of this kind
    counts: list[int]
    threshold: float | None  # the cut for this kind (None: no cut)
    kept: int
    dropped: int
    kept_by_level: dict[int, int]
    dropped_by_level: dict[int, int]
    left_out: int = 0  # scored records outside the histogram's range (counted, not drawn)


@dataclass
class ReportData:
    title: str
    scores_uri: str
    rule: str  # e.g. "keep-fraction 0.3 per kind" or "min-score 2.0"
    kinds: list[KindStats]
    errors_by_reason: dict[str, int]  # reason (ids, paths and numbers taken out) -> records
    error_examples: dict[str, dict]  # reason -> one example: {"id", "shard", "error"} (the reason in full)
    sections: list[tuple[str, list[Example]]]  # (heading, examples)
    generated_at: str
    extras: object | None = None  # pipeline.curation.report_sections.Extras: the sections for choosing a rule


# -- text ----------------------------------------------------------------------------------------------------------
def _level(label: int | None) -> str:
    return "\u2014" if label is None else esc(label)


# -- images --------------------------------------------------------------------------------------------------------
def thumbnail(data: bytes, size: int = THUMB_PX, max_pixels: int = THUMB_MAX_PIXELS) -> bytes:
    """Untrusted encoded image -> a JPEG at most `size` px on its longest side. Raises `SampleError` for an image
    that does not decode (corrupt, not an image, or over the pixel bounds, checked before the pixels are
    allocated)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise SampleError(Category.DECODE, f"not image bytes ({type(data).__name__})")
    img = decode_image(bytes(data), max_pixels=max_pixels, draft_size=size)
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=82, optimize=True)
    return buf.getvalue()


def make_thumbnail(data: bytes) -> Thumbnail:
    """`thumbnail`, with an image that does not decode turned into its reason: never raises."""
    try:
        return Thumbnail(thumbnail(data))
    except Exception as err:  # noqa: BLE001 - one bad image never fails the report
        return Thumbnail(None, str(err) if isinstance(err, SampleError) else f"{type(err).__name__}: {err}")


def _image_html(image: bytes | Thumbnail, alt: str) -> str:
    thumb = image if isinstance(image, Thumbnail) else make_thumbnail(image)
    if thumb.jpeg is None:
        return (f'<div class="placeholder" role="img" aria-label="image could not be decoded">'
                f'<span>image could not be decoded</span><small>{esc(thumb.reason, 120)}</small></div>')
    return f'<img class="thumb" src="{data_uri("image/jpeg", thumb.jpeg)}" alt="{alt}">'


# -- histograms ----------------------------------------------------------------------------------------------------
def histogram_png(stats: KindStats, width_in: float = 6.4, height_in: float = 3.4, dpi: int = 110) -> bytes:
    """The score histogram of one kind as a PNG (matplotlib, Agg): bins at or above the threshold in the kept
    colour, the others in the dropped colour, the threshold a labelled vertical line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(width_in, height_in), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    edges = [float(e) for e in stats.bin_edges]
    counts = [int(c) for c in stats.counts]
    usable = len(edges) == len(counts) + 1 and counts and all(math.isfinite(e) for e in edges)
    if usable and sum(counts) > 0:
        lefts, widths = edges[:-1], [b - a for a, b in zip(edges[:-1], edges[1:])]
        cut = stats.threshold
        colors = [KEPT_COLOR if cut is None or (a + b) / 2 >= cut else DROPPED_COLOR
                  for a, b in zip(edges[:-1], edges[1:])]
        ax.bar(lefts, counts, width=widths, align="edge", color=colors, linewidth=0)
        ax.set_xlim(edges[0], edges[-1])
        if cut is not None and math.isfinite(cut):
            ax.axvline(cut, color=THRESHOLD_COLOR, linewidth=2.2, linestyle="--")
            inside = edges[0] <= cut <= edges[-1]
            x = min(max(cut, edges[0]), edges[-1])
            label = f"threshold {cut:.3f}" + ("" if inside else " (off scale)")
            right = (x - edges[0]) > 0.6 * (edges[-1] - edges[0])
            ax.annotate(label, xy=(x, 1.0), xycoords=("data", "axes fraction"), xytext=(-6 if right else 6, -6),
                        textcoords="offset points", ha="right" if right else "left", va="top",
                        color=THRESHOLD_COLOR, fontsize=9, fontweight="bold",
                        bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.85})
    else:
        ax.text(0.5, 0.5, "no scored records", ha="center", va="center", transform=ax.transAxes, color="#555")
        ax.set_xticks([])
        ax.set_yticks([])
    drawn, scored = (sum(counts) if usable else 0) + stats.left_out, stats.kept + stats.dropped
    out = (f"; {drawn:,} passed the filters" if drawn != scored else "") + (
        f", {stats.left_out:,} outside the range shown" if stats.left_out else "")
    ax.set_title(f"{stats.kind}: {scored:,} scored, {stats.kept:,} kept, {stats.dropped:,} dropped{out}", fontsize=10)
    ax.set_xlabel("score")
    ax.set_ylabel("records")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return buf.getvalue()


# -- page ----------------------------------------------------------------------------------------------------------
CSS = """
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:#1c1f23;
background:#fff}
header,main{max-width:1400px;margin:0 auto;padding:12px 20px}
header{border-bottom:1px solid #d8dde3}
h1{font-size:22px;margin:4px 0 6px}
h2{font-size:18px;margin:22px 0 8px;border-bottom:1px solid #e4e7eb;padding-bottom:3px}
.meta{color:#4a5560;margin:2px 0;overflow-wrap:anywhere}
.cuts{display:flex;flex-wrap:wrap;gap:8px;margin:8px 0 2px;padding:0;list-style:none}
.cuts li{background:#f2f5f8;border:1px solid #dde3ea;border-radius:6px;padding:4px 10px}
.hists{display:flex;flex-wrap:wrap;gap:12px}
.hists figure{margin:0;flex:1 1 420px;max-width:720px}
.hists img{width:100%;height:auto;display:block;border:1px solid #e4e7eb;border-radius:4px}
.legend{color:#4a5560;font-size:13px;margin:6px 0}
.sw{display:inline-block;width:12px;height:12px;vertical-align:-1px;border-radius:2px;margin:0 4px 0 10px}
.sw.kept{background:KEPT}.sw.dropped{background:DROPPED}.sw.cut{background:CUT}
.tables{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;font-variant-numeric:tabular-nums}
th,td{border:1px solid #dde3ea;padding:3px 9px;text-align:right;vertical-align:top}
th{background:#f2f5f8}
td.l,th.l{text-align:left}
td.reason{text-align:left;max-width:520px;overflow-wrap:anywhere;font-family:ui-monospace,monospace;font-size:12px}
tr.total td{font-weight:600;background:#fafbfc}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(190px,1fr));gap:10px;align-items:start}
.example{border:1px solid #dde3ea;border-radius:6px;padding:8px;background:#fbfcfd;min-width:0}
.thumbs{display:flex;flex-wrap:wrap;gap:4px;margin-bottom:6px}
.thumb{display:block;max-width:100%;height:auto;border-radius:3px}
.interleaved .thumb,.interleaved .placeholder{max-width:calc(50% - 2px)}
.placeholder{display:flex;flex-direction:column;justify-content:center;align-items:center;text-align:center;
width:160px;max-width:100%;height:110px;border:2px dashed #b0b7c0;border-radius:3px;background:#f4f4f4;
color:#5a6570;font-size:12px;padding:4px;overflow:hidden;overflow-wrap:anywhere}
.placeholder small{font-size:10px;color:#7a838c}
.noimg{color:#7a838c;font-size:12px;margin-bottom:6px}
.score{font-weight:600}
.lvl{display:inline-block;border-radius:8px;padding:0 7px;background:#e8edf2;margin-left:4px}
.id,.src{color:#56616c;font-size:12px;overflow-wrap:anywhere}
.text{margin:4px 0 0;white-space:pre-wrap;overflow-wrap:anywhere;unicode-bidi:plaintext}
.empty{color:#7a838c}
.flags{color:#8a4b00;font-size:12px}
tr.chosen td{font-weight:600;background:#fdeef5}
@media (max-width:600px){header,main{padding:8px 10px}th,td{padding:2px 5px}table{font-size:13px}
.grid{grid-template-columns:repeat(auto-fill,minmax(140px,1fr))}}
""".replace("KEPT", KEPT_COLOR).replace("DROPPED", DROPPED_COLOR).replace("CUT", THRESHOLD_COLOR).strip()


def _csp(css: str) -> str:
    """No scripts, no fetches, no frames, no forms: only data: images and this page's own stylesheet (by hash)."""
    digest = base64.b64encode(hashlib.sha256(css.encode("utf-8")).digest()).decode("ascii")
    return (f"default-src 'none'; img-src data:; style-src 'sha256-{digest}'; script-src 'none'; "
            "base-uri 'none'; form-action 'none'")


def _level_keys(stats: KindStats) -> list[int]:
    keys = set(stats.kept_by_level or {}) | set(stats.dropped_by_level or {})
    return sorted(keys, key=lambda k: (not isinstance(k, int), k if isinstance(k, int) else str(k)))


def _counts_tables(kinds: list[KindStats]) -> str:
    rows = []
    for s in kinds:
        total = s.kept + s.dropped
        cut = "no cut" if s.threshold is None else num(s.threshold)
        rows.append(f'<tr><td class="l">{esc(s.kind)}</td><td>{cut}</td><td>{s.kept:,}</td><td>{s.dropped:,}</td>'
                    f'<td>{total:,}</td><td>{pct(s.kept, total)}</td></tr>')
    kept, dropped = sum(s.kept for s in kinds), sum(s.dropped for s in kinds)
    rows.append(f'<tr class="total"><td class="l">total</td><td></td><td>{kept:,}</td><td>{dropped:,}</td>'
                f'<td>{kept + dropped:,}</td><td>{pct(kept, kept + dropped)}</td></tr>')
    parts = ['<div class="scroll"><table class="counts"><caption>Kept and dropped per kind</caption>'
             '<tr><th class="l">kind</th><th>threshold</th><th>kept</th><th>dropped</th><th>scored</th>'
             '<th>kept %</th></tr>' + "".join(rows) + "</table></div>"]
    for s in kinds:
        body, kept_by, dropped_by = [], s.kept_by_level or {}, s.dropped_by_level or {}
        for level in _level_keys(s):
            k, d = int(kept_by.get(level, 0)), int(dropped_by.get(level, 0))
            body.append(f'<tr><td class="l">{esc(level)}</td><td>{k:,}</td><td>{d:,}</td><td>{k + d:,}</td>'
                        f'<td>{pct(k, k + d)}</td></tr>')
        k, d = sum(int(v) for v in kept_by.values()), sum(int(v) for v in dropped_by.values())
        body.append(f'<tr class="total"><td class="l">total</td><td>{k:,}</td><td>{d:,}</td><td>{k + d:,}</td>'
                    f'<td>{pct(k, k + d)}</td></tr>')
        parts.append(f'<div class="scroll"><table class="levels"><caption>{esc(s.kind)}: per predicted level'
                     '</caption><tr><th class="l">level</th><th>kept</th><th>dropped</th><th>total</th>'
                     '<th>kept %</th></tr>' + "".join(body) + "</table></div>")
    return '<div class="tables">' + "".join(parts) + "</div>"


def _errors_table(errors: dict[str, int], examples: dict[str, dict]) -> str:
    if not errors:
        return '<p class="empty">No error records.</p>'
    rows = []
    for reason, n in sorted(errors.items(), key=lambda kv: (-int(kv[1]), str(kv[0]))):
        example = examples.get(reason) or {}
        if isinstance(example, str):  # a report of an earlier version: the reason only
            example = {"error": example}
        where = (f'<div class="id">{esc(example.get("id"), ID_CHARS)} in {esc(example.get("shard"), ID_CHARS)}'
                 "</div>" if example.get("id") else "")
        rows.append(f'<tr><td class="l reason">{esc(reason, REASON_CHARS)}</td><td>{int(n):,}</td>'
                    f'<td class="reason">{where}{esc(example.get("error", ""), REASON_CHARS)}</td></tr>')
    rows.append(f'<tr class="total"><td class="l">total</td><td>{sum(int(n) for n in errors.values()):,}</td>'
                "<td></td></tr>")
    return ('<div class="scroll"><table class="errors"><tr><th class="l">reason</th><th>records</th>'
            '<th class="l">example</th></tr>' + "".join(rows) + "</table></div>")


def _flags(ex: Example) -> str:
    images = [f"{ex.n_images} image{'' if ex.n_images == 1 else 's'}"] if ex.n_images is not None else []
    flags = ([ex.decision] if ex.decision else []) + images + (["truncated"] if ex.truncated else [])
    return '<div class="flags">' + esc(" \u00b7 ".join(flags)) + "</div>" if flags else ""


def _example_html(ex: Example) -> str:
    images = list(ex.images or [])[:MAX_IMAGES]
    alt = esc(f"{ex.kind} {ex.id}", ID_CHARS)
    if images:
        thumbs = '<div class="thumbs">' + "".join(_image_html(img, alt) for img in images) + "</div>"
    else:
        thumbs = '<div class="noimg">(no image)</div>'
    limit = CAPTION_CHARS if ex.kind == "caption" else EXCERPT_CHARS
    kind_class = "interleaved" if ex.kind != "caption" else "caption"
    return (f'<article class="example {kind_class}">{thumbs}'
            f'<div><span class="score">score {num(ex.score)}</span><span class="lvl">level {_level(ex.label)}'
            f'</span></div><div class="id">{esc(ex.id, ID_CHARS)}</div>'
            f'<div class="src">{esc(ex.kind)} \u00b7 {esc(ex.source, ID_CHARS)}</div>{_flags(ex)}'
            f'<p class="text">{esc(ex.text, limit)}</p></article>')


def render_html(data: ReportData) -> str:
    """The whole page as one string (no external resource of any kind)."""
    kept = sum(s.kept for s in data.kinds)
    dropped = sum(s.dropped for s in data.kinds)
    n_errors = sum(int(n) for n in data.errors_by_reason.values())
    cuts = "".join(
        f'<li><b>{esc(s.kind)}</b>: {"no cut" if s.threshold is None else "threshold " + num(s.threshold)}'
        f" \u2014 kept {s.kept:,} / {s.kept + s.dropped:,} ({pct(s.kept, s.kept + s.dropped)})</li>"
        for s in data.kinds)
    figures = "".join(
        f'<figure><img class="hist" src="{data_uri("image/png", histogram_png(s))}" '
        f'alt="score histogram of {esc(s.kind)}, threshold {"none" if s.threshold is None else num(s.threshold)}">'
        "</figure>" for s in data.kinds)
    sections = []
    for i, (heading, examples) in enumerate(data.sections):
        cards = "".join(_example_html(ex) for ex in examples) or '<p class="empty">No examples.</p>'
        sections.append(f'<section class="examples" id="section-{i}"><h2>{esc(heading)} '
                        f'<small>({len(examples)})</small></h2><div class="grid">{cards}</div></section>')
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_csp(CSS)}">
<meta name="referrer" content="no-referrer">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(data.title)}</title>
<style>{CSS}</style>
</head>
<body>
<header>
<h1>{esc(data.title)}</h1>
<p class="meta">Rule: <b>{esc(data.rule)}</b> \u00b7 kept <b>{kept:,}</b>, dropped <b>{dropped:,}</b>
({pct(kept, kept + dropped)} kept) \u00b7 error records <b>{n_errors:,}</b></p>
<ul class="cuts">{cuts}</ul>
<p class="meta">Scores: {esc(data.scores_uri)} \u00b7 generated {esc(data.generated_at)}</p>
</header>
<main>
<section id="histograms"><h2>Score distribution</h2>
<p class="legend">Bins:<span class="sw kept"></span>kept<span class="sw dropped"></span>dropped<span class="sw cut">
</span>threshold</p>
<div class="hists">{figures}</div></section>
<section id="counts"><h2>Kept and dropped</h2>{_counts_tables(data.kinds)}</section>
<section id="errors"><h2>Errors by reason</h2>{_errors_table(data.errors_by_reason, data.error_examples)}</section>
{_extras(data)}{"".join(sections)}
</main>
</body>
</html>
"""


def _extras(data: ReportData) -> str:
    return extras_html(data.extras) if data.extras is not None else ""


def write_report(directory: str, data: ReportData) -> str:
    """Write `directory/index.html` (a local path or an `s3://` prefix), whole or not at all (a reader never sees
    half a page; on S3 it is served as a page through a presigned URL); return its URI."""
    uri = join(normalize_uri(directory), "index.html")
    fs, path = filesystem_for(uri)
    write_bytes(fs, path, render_html(data).encode("utf-8"), content_type="text/html; charset=utf-8")
    return to_uri(uri, path)
