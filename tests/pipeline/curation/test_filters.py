"""Curation filters beside the score: `--where` over the score records joined with the img2dataset metadata beside
each shard, its shorthands `--drop-truncated` and `--min-images`, intersected and applied before the rule; and the
expression language refusing anything but comparisons of columns (exit 2 naming `where`)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import curate as curate_cli
from pipeline.curation import CurateConfig, where
from pipeline.curation import thresholds as selection
from pipeline.curation.filters import Filters, check_filters, filter_shard
from pipeline.curation.job import score_shards
from pipeline.errors import ConfigFieldError
from tests.support.curation import curate, fake_scores, selected
from tests.support.hostile import or_chain
from tests.support.shards import write_shards

WHERE = "width >= 200 and aspect_ratio <= 3 and similarity >= 0.25"


@pytest.fixture(scope="module")
def corpus_with_metadata(tmp_path_factory):
    """Three webdataset shards with img2dataset sidecars (`<shard>.parquet`, one row per key; one key missing
    from them) and score records with levels, `n_images` and `truncated` set."""
    root = tmp_path_factory.mktemp("meta")
    rng = np.random.default_rng(7)
    keys = write_shards(root / "in", 3, 12, prefix="w", name="{k:05d}")
    scores, meta = {}, []
    for k in range(3):
        shard_keys = keys[12 * k: 12 * k + 12]
        rows = pd.DataFrame({"key": shard_keys, "url": [f"http://example.com/{x}.jpg" for x in shard_keys],
                             "caption": [f"caption {x}" for x in shard_keys], "status": "success",
                             "width": rng.integers(50, 600, 12), "height": rng.integers(50, 400, 12),
                             "similarity": rng.uniform(0.1, 0.4, 12).astype(np.float32)})
        rows = rows.iloc[1:] if k == 2 else rows  # a key the sidecar lacks: no metadata, fails every term
        pq.write_table(pa.Table.from_pandas(rows, preserve_index=False), root / "in" / f"{k:05d}.parquet")
        meta.append(rows)
        scores[f"{k:05d}.tar"] = [{"id": x, "kind": "caption", "score": float(np.float32(round(rng.uniform(0, 3), 2))),
                                   "label": int(rng.integers(0, 4)), "error": None, "n_images": int(rng.integers(0, 3)),
                                   "truncated": bool(rng.uniform() < 0.3)} for x in shard_keys]
    fake_scores(str(root / "scores"), scores)
    records = pd.DataFrame([r for rs in scores.values() for r in rs])
    return root, records, pd.concat(meta)


def _reference(records: pd.DataFrame, meta: pd.DataFrame, keep: pd.Series, fraction: float) -> set[str]:
    """What a person would compute with pandas: the filtered records, then the best `fraction` of them and ties."""
    passing = records[keep]
    cut = selection.sort_threshold(passing["score"].to_numpy(), fraction)
    return set(passing[passing["score"] >= cut]["id"])


def test_where_over_metadata_keeps_what_pandas_keeps(tmp_path, corpus_with_metadata):
    root, records, meta = corpus_with_metadata
    joined = records.merge(meta, left_on="id", right_on="key", how="left")
    joined["aspect_ratio"] = joined["width"] / joined["height"]
    keep = (joined["width"] >= 200) & (joined["aspect_ratio"] <= 3) & (joined["similarity"] >= 0.25)
    summary = curate(tmp_path, root / "scores", keep_fraction=0.5, where=WHERE, input=str(root / "in"),
                     format="webdataset")["curate"]
    assert set(selected(tmp_path / "cur").column("id").to_pylist()) == _reference(joined, meta, keep, 0.5)
    assert summary["filters"]["removed"] == {"width >= 200": int((joined["width"] < 200).sum()) + 1,
                                             "aspect_ratio <= 3": int((~(joined["aspect_ratio"] <= 3)).sum()),
                                             "similarity >= 0.25": int((~(joined["similarity"] >= 0.25)).sum())}
    assert summary["filters"]["removed_in_all"] == int((~keep).sum()) and summary["filters"]["no_metadata"] == 1


def test_drop_truncated_and_min_images_intersect_with_where(tmp_path, corpus_with_metadata):
    root, records, meta = corpus_with_metadata
    joined = records.merge(meta, left_on="id", right_on="key", how="left")
    keep = (joined["width"] >= 200) & ~joined["truncated"] & (joined["n_images"] >= 1)
    summary = curate(tmp_path, root / "scores", keep_fraction=0.4, where="width >= 200", drop_truncated=True,
                     min_images=1, input=str(root / "in"), format="webdataset")["curate"]
    assert set(selected(tmp_path / "cur").column("id").to_pylist()) == _reference(joined, meta, keep, 0.4)
    assert summary["filters"]["removed"] == {"width >= 200": int((~(joined["width"] >= 200)).sum()),
                                             "not truncated": int(joined["truncated"].sum()),
                                             "n_images >= 1": int((joined["n_images"] < 1).sum())}


@pytest.mark.parametrize("expression", ["__import__('os').system('true')", "width.real > 3", "len(caption) > 3",
                                        "score >= 1; import os", "width = 3", "(" * 500 + "score > 1" + ")" * 500,
                                        "not " * 500 + "truncated"])
def test_code_in_where_is_refused_naming_where(expression):
    with pytest.raises(ConfigFieldError, match="field 'where'"):
        where.parse(expression)


@pytest.mark.parametrize("expression,problem", [("no_such_column >= 200", "unknown column 'no_such_column'"),
                                                ("__import__('os')", "calls are not allowed"),
                                                ("width.bit_length() > 3", "attribute access"),
                                                (or_chain(9000), "over the limit of 65,536"),
                                                (or_chain(1001), f"more than {where.MAX_TERMS} comparisons"),
                                                ("n_images > " + "1" * 401, "does not fit 64 bits"),
                                                ("n_images > 100000000000000000000", "does not fit 64 bits")],
                         ids=["unknown-column", "call", "attribute", "9000-ors", "1001-ors", "401-digits", "1e20-int"])
def test_the_command_exits_2_naming_where(expression, problem, corpus_with_metadata, tmp_path, capsys):
    root, _, _ = corpus_with_metadata
    status = curate_cli.main(["--scores", str(root / "scores"), "--output", str(tmp_path / "cur"),
                              "--keep-fraction", "0.5", "--input", str(root / "in"), "--format", "webdataset",
                              "--where", expression])
    err = capsys.readouterr().err
    assert status == 2 and "'where'" in err and problem in err, err
    assert not (tmp_path / "cur").exists() or not any((tmp_path / "cur").iterdir())


def test_the_largest_expression_allowed_evaluates_as_its_terms_say():
    """1,000 `or` terms (a chain that deep crashed PyArrow's evaluation: 9,000 segfaulted a worker) compile to a
    balanced tree and evaluate; so do the deepest nesting and 1,000 `and` terms."""
    table = pa.table({"score": [0.5, 999.0, 1500.0], "n_images": pa.array([1, 2, 3], pa.int32())})
    any_of = " or ".join(f"score == {k}" for k in range(where.MAX_TERMS))
    assert table.filter(where.expression(where.parse(any_of))).column("score").to_pylist() == [999.0]
    all_of = " and ".join(f"score < {k + 1000}" for k in range(where.MAX_TERMS))
    assert table.filter(where.expression(where.parse(all_of))).column("score").to_pylist() == [0.5, 999.0]
    nested = "not " * (where.MAX_DEPTH - 1) + "(score > 1 or n_images == 1)"
    assert table.filter(where.expression(where.parse(nested))).num_rows == 3 - (where.MAX_DEPTH - 1) % 2 * 3


@pytest.mark.parametrize("expression,kept", [("n_images > 1e20", []), ("n_images < 9223372036854775807", [1, 2, 3]),
                                             ("n_images > -9223372036854775808", [1, 2, 3]),
                                             ("score < 1e308", [1, 2, 3]), ("n_images > " + "0" * 5000 + "1", [2, 3])])
def test_numbers_at_the_ends_of_their_range_compare(expression, kept):
    table = pa.table({"score": [0.5, 1.5, 2.5], "n_images": pa.array([1, 2, 3], pa.int32())})
    assert table.filter(where.expression(where.parse(expression))).column("n_images").to_pylist() == kept


@pytest.mark.parametrize("expression,problem", [("score > 1e400", "too large for a 64-bit float"),
                                                ("n_images > -9223372036854775809", "does not fit 64 bits"),
                                                ("n_images > " + "9" * 5000, "does not fit 64 bits")])
def test_numbers_past_their_range_are_refused_naming_where(expression, problem):
    with pytest.raises(ConfigFieldError, match=f"field 'where': .*{problem}"):
        where.parse(expression)


def test_the_expression_compiles_to_arrow_compute():
    table = pa.table({"width": [100, 300, None, 500], "truncated": [False, False, False, True]})
    tree = where.parse("width >= 200 and not truncated")
    assert table.filter(where.expression(tree)).column("width").to_pylist() == [300]


def test_where_reads_a_parquet_shards_own_columns_by_id(tmp_path):
    """A Parquet shard is its own metadata: its rows join the score records by id (issue 27 finding 7: by row, a
    shard rewritten in another order gave each record another row's columns)."""
    from jobs import sample_corpus as corpus
    from tests.support.hostile import reversed_parquet

    items = corpus.caption_samples(8, seed=3)
    similarity = [0.1, 0.5, 0.3, 0.2, 0.9, 0.35, 0.05, 0.4]
    ids = [it["key"] for it in items]
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": ids, "image": [it["image"] for it in items],
                             "caption": [it["caption"] for it in items], "similarity": similarity}),
                   tmp_path / "in" / "0.parquet")
    fake_scores(str(tmp_path / "scores"), {"0.parquet": [{"id": i, "kind": "caption", "score": 1.0 + r, "label": 1,
                                                          "error": None} for r, i in enumerate(ids)]})
    reversed_parquet(tmp_path / "in" / "0.parquet")  # rewritten since it was scored: same rows, reversed
    curate(tmp_path, tmp_path / "scores", min_score=0.0, where="similarity >= 0.3", input=str(tmp_path / "in"),
           format="parquet")
    kept = selected(tmp_path / "cur").to_pylist()
    assert sorted(r["score"] for r in kept) == [1.0 + r for r, s in enumerate(similarity) if s >= 0.3]


def test_where_reads_any_score_column_not_only_those_the_selection_keeps(tmp_path):
    """`n_tokens` is a score record's column the selection does not carry: a filter on it reads it (it once
    failed in the first pass, after the check had named it among the columns)."""
    records = [{"id": f"t{i}", "kind": "caption", "score": float(i), "label": 0, "error": None, "n_tokens": 10 * i}
               for i in range(8)]
    fake_scores(str(tmp_path / "scores"), {"a.tar": records})
    summary = curate(tmp_path, tmp_path / "scores", keep_fraction=1.0, where="n_tokens >= 30")["curate"]
    assert sorted(selected(tmp_path / "cur").column("id").to_pylist()) == [f"t{i}" for i in range(3, 8)]
    assert summary["filters"]["removed"] == {"n_tokens >= 30": 3}


def test_the_filters_are_parsed_once_and_evaluated_on_a_shard_without_parsing_again(tmp_path, monkeypatch):
    records = [{"id": "a0", "kind": "caption", "score": 1.0, "label": 1, "error": None, "n_images": 2,
                "truncated": False},
               {"id": "a1", "kind": "caption", "score": 2.0, "label": 2, "error": None, "n_images": 1,
                "truncated": True}]
    fake_scores(str(tmp_path / "scores"), {"a.tar": records})
    config = CurateConfig(scores=str(tmp_path / "scores"), output=str(tmp_path / "cur"), min_score=0.0,
                          where="score >= 0.5 and not truncated", drop_truncated=True, min_images=1)
    shards = score_shards(config)[0].shards
    filters = check_filters(Filters.of(config), shards)

    def parsed_again(text):
        raise AssertionError(f"--where parsed again: {text}")

    monkeypatch.setattr(where, "parse", parsed_again)
    filtered = filter_shard(shards[0], filters)
    assert filters.terms == ["score >= 0.5", "not truncated", "n_images >= 1"]  # a term given twice is one
    assert filtered.passes.tolist() == [True, False] and filtered.removed == {
        "score >= 0.5": 0, "not truncated": 1, "n_images >= 1": 0}
