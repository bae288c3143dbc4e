"""Comparing two scorings of one corpus (`jobs.compare`): samples matched by shard and id, agreement as pandas and
the textbook define it, different corpora refused, bad flags refused before anything is written."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest

from jobs.compare import main as compare_main
from pipeline.curation import compare
from tests.support.curation import fake_scores, random_records
from tests.support.jobs import run_main
from tests.support.shards import write_shards


def brute_kendall_tau_b(x, y) -> float:
    concordant = discordant = x_only = y_only = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        sign = np.sign(x[i] - x[j]) * np.sign(y[i] - y[j])
        concordant += sign > 0
        discordant += sign < 0
        x_only += x[i] == x[j] and y[i] != y[j]
        y_only += y[i] == y[j] and x[i] != x[j]
    pairs = concordant + discordant
    return (concordant - discordant) / math.sqrt((pairs + x_only) * (pairs + y_only))


@pytest.fixture
def two_scorings(tmp_path):
    """A and B over the same two shards: B's scores are A's plus noise, its records in another order; one sample
    is an error record in B, one id is only in A."""
    rng = np.random.default_rng(3)
    shards_a, shards_b = {}, {}
    for k, kind in enumerate(["caption", "document"]):
        records = random_records(60, kind, seed=k, prefix=f"s{k}-")
        shards_a[f"part{k}/0000{k}.tar"] = records
        noisy = [{**r, "score": float(np.float32(round(r["score"] + rng.normal(0, 0.6), 2)))} for r in records]
        noisy.reverse()
        shards_b[f"part{k}/0000{k}.tar"] = noisy
    shards_b["part0/00000.tar"][0] = {**shards_b["part0/00000.tar"][0], "score": None, "label": None,
                                      "error": "decode: truncated"}
    shards_b["part1/00001.tar"] = shards_b["part1/00001.tar"][:-1] + [{**shards_b["part1/00001.tar"][-1],
                                                                       "id": "only-in-b"}]
    fake_scores(str(tmp_path / "a"), shards_a)
    fake_scores(str(tmp_path / "b"), shards_b)
    return tmp_path / "a", tmp_path / "b", shards_a, shards_b


def reference(shards_a, shards_b) -> pd.DataFrame:
    rows = []
    for shard, records in shards_a.items():
        b = {r["id"]: r for r in shards_b[shard] if r["error"] is None}
        rows += [{"id": r["id"], "kind": r["kind"], "a": r["score"], "b": b[r["id"]]["score"]}
                 for r in records if r["id"] in b]
    return pd.DataFrame(rows)


def test_the_agreement_is_spearmans_and_kendalls_over_the_samples_both_scored(two_scorings):
    a, b, shards_a, shards_b = two_scorings
    result = compare.compare(compare.match(str(a), str(b)), [0.3])
    ref = reference(shards_a, shards_b)
    assert result["counts"]["matched"] == len(ref) == 118
    assert result["counts"]["errors_b"] == 1 and result["counts"]["only_in_a"] == 2
    assert result["counts"]["only_in_b"] == 1
    for kind, group in ref.groupby("kind"):
        ours = result["by_kind"][kind]
        assert ours["n"] == len(group)
        assert ours["spearman"] == pytest.approx(group[["a", "b"]].corr(method="spearman").loc["a", "b"], abs=1e-12)
        assert ours["kendall"] == pytest.approx(brute_kendall_tau_b(group["a"].to_numpy(), group["b"].to_numpy()),
                                                abs=1e-12)
    assert set(result["by_source"]) == {"part0", "part1"}


def test_the_kept_set_overlap_is_the_jaccard_of_each_sides_best_fraction(two_scorings):
    a, b, shards_a, shards_b = two_scorings
    result = compare.compare(compare.match(str(a), str(b)), [0.3])
    group = reference(shards_a, shards_b).query("kind == 'caption'")
    k = math.ceil(0.3 * len(group))
    top_a = set(group.sort_values("a", ascending=False, kind="stable")["id"][:k])
    top_b = set(group.sort_values("b", ascending=False, kind="stable")["id"][:k])
    assert result["by_kind"]["caption"]["overlap"]["0.3"] == pytest.approx(len(top_a & top_b) / len(top_a | top_b))


def test_inversions_and_kendall_match_their_definitions_with_ties():
    rng = np.random.default_rng(0)
    for n in (2, 3, 7, 33, 90):
        v = rng.integers(0, max(1, n // 3), n)
        assert compare.inversions(v) == sum(v[i] > v[j] for i, j in itertools.combinations(range(n), 2))
        x = rng.integers(0, 5, n).astype(float)
        y = x + rng.integers(0, 3, n)
        if len(set(x)) > 1 and len(set(y)) > 1:
            assert compare.kendall_tau_b(x, y) == pytest.approx(brute_kendall_tau_b(x, y), abs=1e-12)


def test_the_command_writes_compare_json_and_a_page_naming_the_samples_they_disagree_on(two_scorings, tmp_path,
                                                                                    capsys):
    a, b, _, _ = two_scorings
    code, out, err = run_main(compare_main, [str(a), str(b), "--output", str(tmp_path / "cmp"), "--sweep",
                                               "0.1,0.5"], capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert result["fractions"] == [0.1, 0.5] and set(result["by_kind"]["caption"]["overlap"]) == {"0.1", "0.5"}
    page = (tmp_path / "cmp" / "index.html").read_text()
    assert result["disagreements"] and all(d["id"] in page for d in result["disagreements"])
    assert "compare: 118 samples scored by both" in out


def test_two_scorings_of_different_corpora_are_refused_naming_why(tmp_path, capsys):
    fake_scores(str(tmp_path / "a"), {"00000.tar": random_records(5, "caption", 0, "x")})
    fake_scores(str(tmp_path / "b"), {"00000.tar": random_records(6, "caption", 0, "x")})
    fake_scores(str(tmp_path / "c"), {"other.tar": random_records(5, "caption", 0, "x")})
    code, _, err = run_main(compare_main, [str(tmp_path / "a"), str(tmp_path / "b"), "--output",
                                             str(tmp_path / "cmp")], capsys)
    assert code == 2 and "field 'b': the two outputs scored different corpora: shard 00000.tar had 5 samples" in err
    code, _, err = run_main(compare_main, [str(tmp_path / "a"), str(tmp_path / "c"), "--dry-run"], capsys)
    assert code == 2 and "share no shard" in err
    assert not (tmp_path / "cmp").exists()


@pytest.mark.parametrize("flags, said", [
    (["--sweep", "0.2,1.5"], "field 'sweep'"),
    (["--keep-fraction", "0.2", "--sweep", "0.3"], "field 'keep_fraction' and field 'sweep'"),
    (["--keep-fraction", "0"], "field 'keep_fraction'"),
])
def test_bad_values_are_refused_naming_the_flag_before_anything_is_written(two_scorings, tmp_path, flags, said,
                                                                           capsys):
    a, b, _, _ = two_scorings
    code, _, err = run_main(compare_main, [str(a), str(b), "--output", str(tmp_path / "cmp"), *flags], capsys)
    assert code == 2 and said in err, err
    assert not (tmp_path / "cmp").exists()


def test_a_folder_that_is_no_scoring_output_is_refused_naming_it(tmp_path, two_scorings, capsys):
    a, _, _, _ = two_scorings
    (tmp_path / "empty").mkdir()
    code, _, err = run_main(compare_main, [str(a), str(tmp_path / "empty"), "--dry-run"], capsys)
    assert code == 2 and "field 'b':" in err and "not a scoring job's output" in err


def test_the_page_shows_the_samples_they_disagree_on_read_from_the_corpus(tmp_path, capsys):
    keys = write_shards(tmp_path / "in", 1, 12, name="{k:05d}")
    inputs = {"00000.tar": str(tmp_path / "in" / "00000.tar")}
    for name, order in (("a", keys), ("b", keys[::-1])):  # B ranks the shard in the opposite order
        records = [{"id": key, "kind": "caption", "score": float(order.index(key)) / 4, "label": 1, "error": None}
                   for key in keys]
        fake_scores(str(tmp_path / name), {"00000.tar": records}, inputs=inputs, fmt="webdataset")
    code, _, err = run_main(compare_main, [tmp_path / "a", tmp_path / "b", "--output", tmp_path / "cmp"], capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert result["all"]["spearman"] == pytest.approx(-1.0)
    rows = (tmp_path / "cmp" / "index.html").read_text().split("Where they disagree most")[1].split("<tr>")[2:]
    assert len(rows) == len(result["disagreements"]) > 0
    assert all('<img src="data:image/jpeg;base64,' in row for row in rows)  # each with its thumbnail
