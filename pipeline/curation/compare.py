"""Comparing two scorings of one corpus (`python -m jobs.compare A B --output DIR`): how far two models (0.5B
against 1.5B, a retrained classifier against the last one) agree, before anyone decides to rescore.

Both outputs' commit records say which input shard each score file scored, with its size and sample count; two
outputs whose shards of the same name differ are refused (they scored different corpora). Samples are matched by
shard and id, never by position; error records and samples only one side scored are counted, not compared.
Per kind and per source folder: Spearman's rho (Pearson's r of average ranks, as pandas computes it), Kendall's
tau-b (exact, O(n log n)), and at each fraction the overlap (Jaccard) of the two kept sets, each the best
`ceil(fraction x n)` by score. The samples on which the two disagree most are those whose percentile within their
kind moves most.

Memory: the driver holds, per matched sample, two scores, its kind and source codes and its id (about 60 bytes):
some 10 million samples per GB.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.commit.identity import read_identity
from pipeline.commit.manifest import read_manifest
from pipeline.errors import InputError
from pipeline.io.uris import filesystem_for, join

DEFAULT_FRACTIONS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)
DISAGREEMENTS = 20  # samples listed as those the two scorings disagree on most
_COLUMNS = ["id", "kind", "score", "error"]


@dataclass
class Matched:
    """The samples both outputs scored, one entry each, in a fixed order (by shard, then id)."""

    ids: list[str] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    a: list[np.ndarray] = field(default_factory=list)
    b: list[np.ndarray] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    inputs: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)  # shard -> (input URI, format)

    def scores(self) -> tuple[np.ndarray, np.ndarray]:
        a = np.concatenate(self.a) if self.a else np.zeros(0, np.float64)
        b = np.concatenate(self.b) if self.b else np.zeros(0, np.float64)
        return a, b


def _scored_shards(output: str, field_name: str) -> dict[str, dict]:
    identity = read_identity(output, field_name)
    if identity is None or identity.get("job") != "score":
        raise InputError(field_name, f"{output} is not a scoring job's output (no _output.json of a scoring job)")
    entries = read_manifest(output, field_name)
    if not entries:
        raise InputError(field_name, f"{output} has no committed shards")
    return entries


def _read(output: str, entry: dict) -> pa.Table:
    parts = []
    for name in entry["files"]:
        fs, path = filesystem_for(join(output, name))
        with fs.open_input_file(path) as f:
            parts.append(pq.read_table(f, columns=_COLUMNS))
    return pa.concat_tables(parts) if parts else pa.table({c: [] for c in _COLUMNS})


def _same_input(shard: str, ea: dict, eb: dict) -> None:
    for name, what in (("samples", "samples"), ("input_size", "bytes")):
        if ea.get(name) is not None and eb.get(name) is not None and ea[name] != eb[name]:
            raise InputError("b", f"the two outputs scored different corpora: shard {shard} had {ea[name]} {what} "
                                  f"when A scored it and {eb[name]} when B did")


def match(a: str, b: str) -> Matched:
    """Every sample both outputs scored, matched by shard and id."""
    ea, eb = _scored_shards(a, "a"), _scored_shards(b, "b")
    common = sorted(ea.keys() & eb.keys())
    if not common:
        raise InputError("b", "the two outputs share no shard: they scored different corpora")
    for shard in common:
        _same_input(shard, ea[shard], eb[shard])
    out = Matched()
    out.counts.update(shards_matched=len(common), shards_only_in_a=len(ea.keys() - eb.keys()),
                      shards_only_in_b=len(eb.keys() - ea.keys()))
    for shard in common:
        out.inputs[shard] = (ea[shard].get("input"), ea[shard].get("format"))
        ta, tb = _read(a, ea[shard]), _read(b, eb[shard])
        out.counts["errors_a"] += ta.num_rows - ta.column("error").null_count
        out.counts["errors_b"] += tb.num_rows - tb.column("error").null_count
        ta = ta.filter(pc.is_null(ta.column("error"))).select(["id", "kind", "score"])
        tb = tb.filter(pc.is_null(tb.column("error"))).select(["id", "score"]).rename_columns(["id", "score_b"])
        joined = ta.join(tb, "id", join_type="inner").sort_by("id")
        out.counts["only_in_a"] += ta.num_rows - joined.num_rows
        out.counts["only_in_b"] += tb.num_rows - joined.num_rows
        out.ids += joined.column("id").to_pylist()
        out.kinds += joined.column("kind").to_pylist()
        out.shards += [shard] * joined.num_rows
        out.a.append(joined.column("score").to_numpy().astype(np.float64))
        out.b.append(joined.column("score_b").to_numpy().astype(np.float64))
    out.counts["matched"] = len(out.ids)
    return out


# -- statistics --------------------------------------------------------------------------------------------------
def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average (pandas' `rank()`)."""
    values, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + 1 + ends) / 2.0)[inverse]


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    if len(a) < 2:
        return None
    ra, rb = average_ranks(a), average_ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def _tie_pairs(x: np.ndarray) -> int:
    counts = np.unique(x, return_counts=True)[1].astype(np.int64)
    return int((counts * (counts - 1) // 2).sum())


def inversions(v: np.ndarray) -> int:
    """Pairs i < j with v[i] > v[j], for integers in [0, len(v)): a bottom-up merge sort, each level whole-array."""
    n = len(v)
    v = v.astype(np.int64)
    total, width = 0, 1
    position = np.arange(n)
    while width < n:
        block = position // (2 * width)
        right = (position % (2 * width)) >= width
        key = v + block * n  # blocks apart, each block's values in order: the left halves, together, are sorted
        left_keys, right_keys = key[~right], key[right]
        found = np.searchsorted(left_keys, right_keys, side="right")
        total += int(((block[right] + 1) * width - found).sum())  # left values above each right value
        v = np.sort(key) - block * n
        width *= 2
    return total


def kendall_tau_b(a: np.ndarray, b: np.ndarray) -> float | None:
    """Kendall's tau-b (ties in either variable accounted), as scipy.stats.kendalltau computes it."""
    n = len(a)
    if n < 2:
        return None
    order = np.lexsort((b, a))  # by a, then b: pairs tied in a are never counted as discordant
    a, b = a[order], b[order]
    total = n * (n - 1) // 2
    a_ties, b_ties = _tie_pairs(a), _tie_pairs(b)
    starts = np.flatnonzero(np.r_[True, (a[1:] != a[:-1]) | (b[1:] != b[:-1]), True])
    runs = np.diff(starts).astype(np.int64)  # runs of equal (a, b) pairs: sorted, they sit together
    both = int((runs * (runs - 1) // 2).sum())
    discordant = inversions(np.unique(b, return_inverse=True)[1].ravel())
    if total == a_ties or total == b_ties:
        return None
    return float((total - a_ties - b_ties + both - 2 * discordant) / math.sqrt((total - a_ties) * (total - b_ties)))


def kept_overlap(a: np.ndarray, b: np.ndarray, fraction: float) -> float | None:
    """Jaccard of the two kept sets: the best ceil(fraction x n) by each score (ties by position, the id order)."""
    n = len(a)
    if n == 0:
        return None
    k = min(n, math.ceil(fraction * n - 1e-9))
    top_a = set(np.argsort(-a, kind="stable")[:k].tolist())
    top_b = set(np.argsort(-b, kind="stable")[:k].tolist())
    return len(top_a & top_b) / len(top_a | top_b)


def percentiles(x: np.ndarray) -> np.ndarray:
    """The share of the values at or below each (ties sharing the highest)."""
    values, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.cumsum(counts) / len(x))[inverse]


def _group_stats(a: np.ndarray, b: np.ndarray, fractions: list[float]) -> dict:
    return {"n": int(len(a)), "spearman": spearman(a, b), "kendall": kendall_tau_b(a, b),
            "mean_a": float(a.mean()) if len(a) else None, "mean_b": float(b.mean()) if len(b) else None,
            "overlap": {f"{f:g}": kept_overlap(a, b, f) for f in fractions}}


def source_folder(shard: str) -> str:
    """A shard's source: the folder it sits in under the corpus root ('.' for shards at the root)."""
    return shard.rsplit("/", 1)[0] if "/" in shard else "."


def compare(matched: Matched, fractions: list[float]) -> dict:
    """compare.json's content: counts, then per kind and per source the agreement, and the disagreements."""
    a, b = matched.scores()
    kinds = np.array(matched.kinds, dtype=object)
    sources = np.array([source_folder(s) for s in matched.shards], dtype=object)
    result: dict = {"counts": dict(sorted(matched.counts.items())), "fractions": fractions,
                    "all": _group_stats(a, b, fractions), "by_kind": {}, "by_source": {}}
    pct_a, pct_b = np.zeros(len(a)), np.zeros(len(b))
    for kind in sorted(set(matched.kinds)):
        mask = kinds == kind
        result["by_kind"][kind] = _group_stats(a[mask], b[mask], fractions)
        pct_a[mask], pct_b[mask] = percentiles(a[mask]), percentiles(b[mask])
    for source in sorted(set(sources.tolist())):
        mask = sources == source
        result["by_source"][source] = _group_stats(a[mask], b[mask], fractions)
    moved = np.abs(pct_a - pct_b)
    worst = np.argsort(-moved, kind="stable")[:DISAGREEMENTS]
    result["disagreements"] = [
        {"id": matched.ids[i], "shard": matched.shards[i], "kind": matched.kinds[i], "score_a": float(a[i]),
         "score_b": float(b[i]), "percentile_a": round(float(pct_a[i]), 4), "percentile_b": round(float(pct_b[i]), 4)}
        for i in worst.tolist() if moved[i] > 0]
    return result


# -- the page ----------------------------------------------------------------------------------------------------
SCATTER_POINTS = 4000  # at most this many samples drawn in the scatter (an even spread over the id order)
_STYLE = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:70em;color:#222}"
          "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}"
          "th{background:#f4f4f4}td.t{text-align:left;font-family:monospace}svg{background:#fafafa;"
          "border:1px solid #ddd}")


def _num(x, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _scatter(a: np.ndarray, b: np.ndarray, size: int = 360) -> str:
    if not len(a):
        return "<p>No sample was scored by both.</p>"
    pick = np.unique(np.linspace(0, len(a) - 1, min(len(a), SCATTER_POINTS)).astype(int))
    lo, hi = float(min(a.min(), b.min())), float(max(a.max(), b.max()))
    span = (hi - lo) or 1.0

    def at(v):
        return 20 + (v - lo) / span * (size - 40)

    dots = "".join(f'<circle cx="{at(a[i]):.1f}" cy="{size - at(b[i]):.1f}" r="1.6"/>' for i in pick.tolist())
    return (f'<svg width="{size}" height="{size}" role="img" aria-label="score A against score B">'
            f'<line x1="20" y1="{size - 20}" x2="{size - 20}" y2="20" stroke="#bbb"/>'
            f'<g fill="#2a6fb0" fill-opacity=".45">{dots}</g>'
            f'<text x="{size / 2}" y="{size - 4}" font-size="11" text-anchor="middle">score A ({lo:.2f} to '
            f'{hi:.2f})</text><text x="10" y="{size / 2}" font-size="11" transform="rotate(-90 10 {size / 2})" '
            f'text-anchor="middle">score B</text></svg>')


def _overlap_curve(result: dict, size: int = 360) -> str:
    fractions = result["fractions"]
    lines = []
    colours = ["#2a6fb0", "#c0392b", "#27ae60", "#8e44ad"]
    for k, (kind, stats) in enumerate(sorted(result["by_kind"].items())):
        points = [(f, stats["overlap"][f"{f:g}"]) for f in fractions if stats["overlap"][f"{f:g}"] is not None]
        path = " ".join(f"{20 + f * (size - 40):.1f},{size - 20 - j * (size - 40):.1f}" for f, j in points)
        colour = colours[k % len(colours)]
        lines.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{path}"/>'
                     f'<text x="{size - 24}" y="{20 + 14 * k}" font-size="11" fill="{colour}" '
                     f'text-anchor="end">{_esc(kind)}</text>')
    return (f'<svg width="{size}" height="{size}" role="img" aria-label="kept-set overlap by fraction kept">'
            f'{"".join(lines)}<text x="{size / 2}" y="{size - 4}" font-size="11" text-anchor="middle">fraction '
            f'kept</text><text x="10" y="{size / 2}" font-size="11" transform="rotate(-90 10 {size / 2})" '
            f'text-anchor="middle">overlap (Jaccard, 0 to 1)</text></svg>')


def _esc(text) -> str:
    import html

    return html.escape(str(text))


def _stats_table(title: str, groups: dict, fractions: list[float]) -> str:
    head = "".join(f"<th>overlap at {f:g}</th>" for f in fractions)
    rows = "".join(
        f"<tr><td class=t>{_esc(name)}</td><td>{s['n']}</td><td>{_num(s['spearman'])}</td><td>{_num(s['kendall'])}"
        f"</td><td>{_num(s['mean_a'])}</td><td>{_num(s['mean_b'])}</td>"
        + "".join(f"<td>{_num(s['overlap'][f'{f:g}'])}</td>" for f in fractions) + "</tr>"
        for name, s in groups.items())
    return (f"<h2>{_esc(title)}</h2><table><tr><th></th><th>samples</th><th>Spearman</th><th>Kendall</th>"
            f"<th>mean A</th><th>mean B</th>{head}</tr>{rows}</table>")


def disagreement_examples(matched: Matched, result: dict) -> dict[tuple[str, str], dict]:
    """Text and thumbnails of the samples the two disagree on most, read from their input shards (as the commit
    records name them; a shard that cannot be read shows as such): {(shard, id): {"text", "images"}}."""
    from pipeline.curation.report_data import fetch_examples
    from pipeline.io.samples import SourceOptions

    wanted: dict[str, list[str]] = {}
    for d in result["disagreements"]:
        wanted.setdefault(d["shard"], []).append(d["id"])
    found: dict[tuple[str, str], dict] = {}
    for shard, ids in wanted.items():
        uri, fmt = matched.inputs.get(shard, (None, None))
        if not uri or not fmt:
            continue
        try:
            examples = fetch_examples({"uri": uri, "key": shard}, fmt, ids, SourceOptions().model_dump())
        except Exception:  # noqa: BLE001 - a corpus moved or gone since it was scored: the page says so per sample
            continue
        found.update({(shard, sample_id): data for sample_id, data in examples.items()})
    return found


def _example_cell(data: dict | None) -> str:
    if data is None:
        return "<td class=t><small>(the input shard could not be read)</small></td>"
    from pipeline.curation.report_markup import data_uri

    images = "".join(f'<img src="{data_uri("image/jpeg", t.jpeg)}" alt="" height="64">' for t in data["images"]
                     if t.jpeg is not None)
    return f"<td class=t>{images}<br><small>{_esc(data['text'][:200])}</small></td>"


def render_page(a_uri: str, b_uri: str, result: dict, matched: Matched,
                examples: dict[tuple[str, str], dict] | None = None) -> str:
    a, b = matched.scores()
    counts = "".join(f"<tr><td class=t>{_esc(k)}</td><td>{v}</td></tr>" for k, v in result["counts"].items())
    worst = "".join(
        f"<tr><td class=t>{_esc(d['id'])}</td><td class=t>{_esc(d['shard'])}</td><td class=t>{_esc(d['kind'])}</td>"
        f"<td>{d['score_a']:.3f}</td><td>{d['score_b']:.3f}</td><td>{d['percentile_a']:.3f}</td>"
        f"<td>{d['percentile_b']:.3f}</td>{_example_cell((examples or {}).get((d['shard'], d['id'])))}</tr>"
        for d in result["disagreements"])
    return (f"<!doctype html><html><head><meta charset=utf-8><title>UniFilter: comparing two scorings</title>"
            f"<style>{_STYLE}</style></head><body><h1>Comparing two scorings</h1>"
            f"<p>A: <code>{_esc(a_uri)}</code><br>B: <code>{_esc(b_uri)}</code></p>"
            f"<table>{counts}</table>"
            + _stats_table("All samples", {"all": result["all"]}, result["fractions"])
            + _stats_table("By kind", result["by_kind"], result["fractions"])
            + _stats_table("By source", result["by_source"], result["fractions"])
            + f"<h2>Score A against score B</h2>{_scatter(a, b)}"
            + f"<h2>How much of the kept set the two share</h2>{_overlap_curve(result)}"
            + "<h2>Where they disagree most</h2><p>The samples whose percentile within their kind moves most "
              "between A and B.</p><table><tr><th>id</th><th>shard</th><th>kind</th><th>score A</th><th>score B"
              f"</th><th>percentile A</th><th>percentile B</th><th>the sample</th></tr>{worst}</table></body></html>")


def write_comparison(a_uri: str, b_uri: str, output: str, fractions: list[float]) -> dict:
    """Match, compare, and write `output/compare.json` and `output/index.html`; returns compare.json's content."""
    from pipeline.io.publish import write_bytes, write_json

    matched = match(a_uri, b_uri)
    result = {"a": a_uri, "b": b_uri, **compare(matched, fractions)}
    fs, path = filesystem_for(join(output, "index.html"))
    page = render_page(a_uri, b_uri, result, matched, disagreement_examples(matched, result))
    write_bytes(fs, path, page.encode("utf-8"),
                content_type="text/html; charset=utf-8")
    write_json(join(output, "compare.json"), result)
    return result


def summary_text(result: dict) -> str:
    """What the command prints: the counts, then per kind the agreement and the overlap at each fraction."""
    c = result["counts"]
    lines = [f"compare: {c.get('matched', 0)} samples scored by both, in {c.get('shards_matched', 0)} shards "
             f"({c.get('only_in_a', 0)} only in A, {c.get('only_in_b', 0)} only in B; error records: "
             f"{c.get('errors_a', 0)} in A, {c.get('errors_b', 0)} in B; shards only in A: "
             f"{c.get('shards_only_in_a', 0)}, only in B: {c.get('shards_only_in_b', 0)})"]
    for name, stats in [("all", result["all"]), *sorted(result["by_kind"].items())]:
        overlap = ", ".join(f"{f} {_num(v, 2)}" for f, v in stats["overlap"].items())
        lines.append(f"  {name:12} n={stats['n']:<8} spearman {_num(stats['spearman'])}  kendall "
                     f"{_num(stats['kendall'])}  kept-set overlap at {overlap}")
    return "\n".join(lines)
