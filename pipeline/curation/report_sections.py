"""The curation report's sections for choosing a rule (drawn into the page by `report_html.render_html`): kept
fraction against threshold per kind with the chosen point marked, the chosen rule beside the swept ones, what each
filter removed, the scores outside the levels the head was trained toward, and the input shards by volume with
their level distribution and kept share. Same rules as the rest of the page: every data text through `esc`,
figures as inline PNGs, no script."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

from pipeline.curation.report_markup import KEPT_COLOR, THRESHOLD_COLOR, data_uri, esc, num, pct
from pipeline.curation.thresholds import ALL

SOURCES_SHOWN = 20


@dataclass
class Extras:
    curves: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)  # kind -> (cuts, kept share)
    chosen: dict[str, tuple[float | None, float]] = field(default_factory=dict)  # kind -> (threshold, kept share)
    sweep: list[dict] = field(default_factory=list)  # pipeline.curation.thresholds.Thresholds.sweep
    sweep_unit: str = "fraction"
    rule_value: float | None = None
    filters: dict | None = None  # the summary's: terms, removed per term, removed_in_all, no_metadata
    outliers: dict[str, dict] = field(default_factory=dict)  # kind -> below0, above3, low, high, left_out
    sources: list[dict] = field(default_factory=list)  # {"source", "scored", "kept", "levels": {level: n}}


def curve_png(kind: str, cuts: list[float], kept: list[float], chosen: tuple[float | None, float],
              sweep: list[tuple[float, float]]) -> bytes:
    """Kept share against the threshold (each occupied bin's lowest score), the chosen cut a marked point, the
    swept ones small grey points."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if cuts:
        ax.step(cuts, kept, where="post", color=KEPT_COLOR, linewidth=1.8)
        if sweep:
            ax.scatter([c for c, _ in sweep], [k for _, k in sweep], s=18, color="#6b7680", zorder=3)
        if chosen[0] is not None and math.isfinite(chosen[0]):
            ax.scatter([chosen[0]], [chosen[1]], s=70, color=THRESHOLD_COLOR, zorder=4)
            ax.annotate(f"chosen {chosen[0]:.3f}: {100 * chosen[1]:.1f}% kept", (chosen[0], chosen[1]),
                        xytext=(8, 8), textcoords="offset points", color=THRESHOLD_COLOR, fontsize=9)
    else:
        ax.text(0.5, 0.5, "no scored records", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{kind}: share kept at each threshold", fontsize=10)
    ax.set_xlabel("threshold (records scoring at or above it are kept)")
    ax.set_ylabel("kept share (after filters)")
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _curves(x: Extras) -> str:
    figures = []
    for kind, (cuts, kept) in x.curves.items():
        group_cuts = [(row["thresholds"].get(kind, row["thresholds"].get("all")), row["kept"].get(kind, 0)
                       / max(1, row["scored"].get(kind, 1))) for row in x.sweep]
        png = curve_png(kind, cuts, kept, x.chosen.get(kind, (None, 0.0)),
                        [(c, k) for c, k in group_cuts if c is not None])
        figures.append(f'<figure><img class="curve" src="{data_uri("image/png", png)}" '
                       f'alt="kept share against threshold, {esc(kind)}"></figure>')
    return ('<section id="curves"><h2>Kept share against threshold</h2><div class="hists">' + "".join(figures)
            + "</div>" + _sweep_table(x) + "</section>")


def _sweep_table(x: Extras) -> str:
    if not x.sweep:
        return ""
    kinds = sorted({k for row in x.sweep for k in row["scored"]})
    groups = [g for g in x.sweep[0]["thresholds"] if g == ALL or any(row["scored"].get(g) for row in x.sweep)]
    head = "".join(f"<th>threshold {esc(g)}</th>" for g in groups) + "".join(f"<th>kept {esc(k)}</th>"
                                                                                for k in kinds)
    rows = []
    for row in x.sweep:
        mark = ' class="chosen"' if row["value"] == x.rule_value else ""
        cuts = "".join(f"<td>{'none kept' if row['thresholds'][g] is None else num(row['thresholds'][g], 4)}</td>"
                       for g in groups)
        kept = "".join(f"<td>{row['kept'].get(k, 0):,} ({pct(row['kept'].get(k, 0), row['scored'].get(k, 0))})"
                       "</td>" for k in kinds)
        value = esc(format(row["value"], "g")) + (" (chosen)" if mark else "")
        rows.append(f"<tr{mark}><td>{value}</td>{cuts}{kept}</tr>")
    return ('<div class="scroll"><table class="sweep"><caption>The chosen rule beside the swept ones</caption>'
            f"<tr><th>{esc(x.sweep_unit)}</th>{head}</tr>" + "".join(rows) + "</table></div>")


def _filters(x: Extras) -> str:
    f = x.filters
    if not f:
        return ""
    rows = "".join(f'<tr><td class="l reason">{esc(term)}</td><td>{int(n):,}</td></tr>'
                   for term, n in f["removed"].items())
    return ('<section id="filters"><h2>Filters</h2><div class="scroll"><table class="filters">'
            '<tr><th class="l">term</th><th>scored records failing it</th></tr>' + rows
            + f'<tr class="total"><td class="l">removed before the rule (any term)</td>'
            f'<td>{int(f["removed_in_all"]):,}</td></tr></table></div>'
            + (f'<p class="meta">{int(f["no_metadata"]):,} records had no metadata beside their shard: they fail '
               "every term on a metadata column.</p>" if f.get("no_metadata") else "") + "</section>")


def _outliers(x: Extras) -> str:
    items = []
    for kind, o in x.outliers.items():
        items.append(f"<li><b>{esc(kind)}</b>: scores from {num(o.get('low'))} to {num(o.get('high'))}; "
                     f"{int(o.get('below0', 0)):,} below 0 and {int(o.get('above3', 0)):,} above 3; "
                     f"{int(o.get('left_out', 0)):,} outside the histogram's range (counted, not drawn)</li>")
    return ('<section id="outliers"><h2>Scores outside the levels</h2><p class="meta">The score is a regression '
            "head's output, trained toward the quality levels 0-3; nothing bounds it, so a few records score below "
            "0 or above 3. They are kept or dropped by the same rule. The histograms span the 0.5th to 99.5th "
            "percentile, so one stray score does not squeeze the rest into a few bars.</p><ul>" + "".join(items)
            + "</ul></section>")


def _sources(x: Extras) -> str:
    if not x.sources:
        return ""
    rows = []
    for s in x.sources[:SOURCES_SHOWN]:
        levels = " \u00b7 ".join(f"L{lv} {int(s['levels'].get(str(lv), 0)):,}" for lv in range(4))
        rows.append(f'<tr><td class="l reason">{esc(s["source"], 120)}</td><td>{int(s["scored"]):,}</td>'
                    f'<td>{int(s["kept"]):,}</td><td>{pct(int(s["kept"]), int(s["scored"]))}</td>'
                    f'<td class="l">{levels}</td></tr>')
    return (f'<section id="sources"><h2>Input shards by volume (top {min(len(x.sources), SOURCES_SHOWN)})</h2>'
            '<div class="scroll"><table class="sources"><tr><th class="l">input shard</th><th>scored</th>'
            '<th>kept</th><th>kept share</th><th class="l">predicted levels</th></tr>' + "".join(rows)
            + "</table></div></section>")


def extras_html(x: Extras) -> str:
    return _curves(x) + _filters(x) + _outliers(x) + _sources(x)
