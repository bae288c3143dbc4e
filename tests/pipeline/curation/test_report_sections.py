"""The report's sections for choosing a rule, from a real curation (filters, keep-fraction, a stray score above 3)
opened in headless Chromium: the kept-share curve per kind with the chosen point, the chosen rule beside the swept
ones, what each filter removed, the scores outside 0-3 explained and the histogram clipped, the input shards by
volume, random samples of kept and dropped records, and `truncated` / `n_images` on the cards."""

from __future__ import annotations

import re

import pytest

from pipeline.curation import CurateConfig, curate
from pipeline.curation.report_sections import Extras, _sweep_table
from pipeline.curation.summary import sweep_lines
from tests.support.browser import Browser, find_or_install_chromium
from tests.support.curation import fake_scores
from tests.support.shards import write_shards


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("sections")
    keys = write_shards(root / "in", 3, 10, prefix="p", name="{k:05d}")
    shards = {f"{k:05d}.tar": [{"id": key, "kind": "caption", "score": 0.1 * i + 0.3 * k, "label": min(3, i // 3),
                                "error": None, "n_images": 1, "truncated": i % 4 == 0}
                               for i, key in enumerate(keys[10 * k: 10 * k + 10])] for k in range(3)}
    shards["00002.tar"][-1]["score"] = 41.5  # a stray score far above the levels
    shards["00001.tar"][0] = {**shards["00001.tar"][0], "score": None, "label": None, "error": "decode: bad jpeg"}
    fake_scores(str(root / "scores"), shards)
    config = CurateConfig(scores=str(root / "scores"), output=str(root / "cur"), keep_fraction=0.4,
                          drop_truncated=True, input=str(root / "in"), format="webdataset",
                          report=str(root / "report"), examples=4, executor="local")
    summary = curate(config, progress=False)  # the run writes the report
    return Browser(find_or_install_chromium()).load(str(root / "report" / "index.html"), window=(1280, 4000)), summary


def _section(dom: str, name: str) -> str:
    found = re.search(rf'<section id="{name}">(.*?)</section>', dom, re.S)
    assert found, f"no section {name}"
    return found.group(1)


def test_the_page_loads_cleanly_with_every_new_section(report):
    page, _ = report
    assert page.problems == [] and page.requests == []
    for name in ("curves", "filters", "outliers", "sources"):
        _section(page.dom, name)
    assert len(re.findall(r'<img class="curve" src="data:image/png;base64,', page.dom)) == 1


def test_the_chosen_rule_is_marked_beside_the_swept_ones(report):
    page, summary = report
    curves = _section(page.dom, "curves")
    chosen = re.findall(r'<tr class="chosen"><td>([^<]*)</td><td>([^<]*)</td>', curves)
    assert chosen == [("0.4 (chosen)", f"{summary['curate']['thresholds']['all']:.4f}")]
    assert curves.count("<tr") >= 1 + 7  # a header and the standard fractions


def test_filters_outliers_and_sources_are_counted(report):
    page, summary = report
    filters = _section(page.dom, "filters")
    assert "not truncated" in filters and f"<td>{summary['curate']['filters']['removed']['not truncated']}</td>" \
        in filters
    outliers = _section(page.dom, "outliers")
    assert "0 below 0 and 1 above 3" in outliers and "outside the histogram" in outliers
    sources = _section(page.dom, "sources")
    assert sources.count('<td class="l reason">') == 3 and "00002.tar" in sources


def test_random_samples_and_flags_on_the_cards(report):
    page, _ = report
    headings = re.findall(r'<section class="examples" id="section-\d+"><h2>([^<]*)', page.dom)
    assert "A random sample of the kept records " in headings and "A random sample of the dropped records " in headings
    # each card says what the selection did with its record, and the rule that decided
    assert '<div class="flags">dropped: truncated (--drop-truncated) \u00b7 1 image \u00b7 truncated</div>' in page.dom
    assert '<div class="flags">kept \u00b7 1 image</div>' in page.dom
    assert '<div class="flags">dropped: below the threshold \u00b7 1 image</div>' in page.dom
    assert '<div class="flags">kept \u00b7 1 image \u00b7 truncated</div>' not in page.dom  # truncated ones dropped


def test_a_kind_the_corpus_lacks_has_no_column_in_the_sweep_tables():
    rule = CurateConfig(scores="s", output="o", keep_fraction=0.5, per_kind=True).rule
    rows = [{"value": v, "thresholds": {"caption": 1.5, "interleaved": None}, "scored": {"caption": 10},
             "kept": {"caption": int(10 * v)}} for v in (0.5, 0.9)]
    table = "\n".join(sweep_lines(rule, rows))
    assert "threshold caption" in table and "interleaved" not in table and "none kept" not in table
    page = _sweep_table(Extras(sweep=rows, rule_value=0.5))
    assert "threshold caption" in page and "interleaved" not in page
