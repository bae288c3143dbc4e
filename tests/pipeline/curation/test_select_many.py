"""Selecting many times from one scoring: exclusion lists (`--exclude`, by id, key, URL or img2dataset's image
sha256), the dropped records written with the first rule that removed each (`--write-dropped`), and the exports of
what was kept (`--export-ids`: kept_ids.parquet, and DataComp's uids.npy where the metadata has `uid`)."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import curate as curate_cli
from pipeline.commit.manifest import read_manifest
from pipeline.curation import thresholds as selection
from tests.support.curation import curate, dropped, fake_scores, selected
from tests.support.jobs import job_env, paused_job, run_main, wait_for
from tests.support.shards import write_shards

SHARDS, PER_SHARD = 3, 10


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three webdataset shards with img2dataset sidecars holding `sha256` and DataComp's `uid` (one key missing
    from the last sidecar), and score records (one error record per shard, some truncated)."""
    root = tmp_path_factory.mktemp("many")
    rng = np.random.default_rng(11)
    keys = write_shards(root / "in", SHARDS, PER_SHARD, prefix="m", name="{k:05d}")
    scores, meta = {}, []
    for k in range(SHARDS):
        shard_keys = keys[PER_SHARD * k: PER_SHARD * (k + 1)]
        rows = pd.DataFrame({"key": shard_keys, "url": [f"http://img.example/{x}.jpg" for x in shard_keys],
                             "sha256": [hashlib.sha256(x.encode()).hexdigest() for x in shard_keys],
                             "uid": [f"{int(rng.integers(0, 2**62)):016x}{int(rng.integers(0, 2**62)):016x}"
                                     for _ in shard_keys]})
        rows = rows.iloc[:-1] if k == SHARDS - 1 else rows  # a key the sidecar lacks: no sha256, no uid
        pq.write_table(pa.Table.from_pandas(rows, preserve_index=False), root / "in" / f"{k:05d}.parquet")
        meta.append(rows)
        scores[f"{k:05d}.tar"] = [{"id": x, "kind": "caption", "key": x, "url": f"http://img.example/{x}.jpg",
                                   "score": float(np.float32(round(rng.uniform(0, 3), 2))), "label": 1,
                                   "error": "decode: broken" if i == 0 else None, "truncated": i % 4 == 1}
                                  for i, x in enumerate(shard_keys)]
    fake_scores(str(root / "scores"), scores)
    records = pd.DataFrame([r for rs in scores.values() for r in rs])
    joined = records.merge(pd.concat(meta).drop(columns="url"), on="key", how="left")
    return root, joined


def _curate(tmp_path, root, name="cur", **kw) -> dict:
    return curate(tmp_path, root / "scores", name, input=str(root / "in"), format="webdataset", **kw)


def _best(records: pd.DataFrame, fraction: float) -> set[str]:
    """What a person would compute with pandas: the best `fraction` of the scored records given, and ties."""
    scored = records[records["error"].isna()]
    cut = selection.sort_threshold(scored["score"].to_numpy(), fraction)
    return set(scored[scored["score"] >= cut]["id"])


def _text_list(path, header: str | None, values) -> str:
    path.write_text("\n".join(([header] if header else []) + list(values)) + "\n")
    return str(path)


def test_exclude_by_sha256_from_the_img2dataset_metadata_removes_exactly_those_samples(tmp_path, corpus):
    root, joined = corpus
    listed = joined.sample(8, random_state=1)["sha256"].dropna()
    hashes = _text_list(tmp_path / "takedown.txt", "sha256", [*listed, "0" * 64])  # and one the corpus lacks
    summary = _curate(tmp_path, root, keep_fraction=0.5, exclude=[hashes])["curate"]
    remaining = joined[~joined["sha256"].isin(set(listed))]
    assert set(selected(tmp_path / "cur").column("id").to_pylist()) == _best(remaining, 0.5)
    scored_listed = joined[joined["sha256"].isin(set(listed)) & joined["error"].isna()]
    assert summary["filters"]["removed"] == {f"exclude:{hashes}": len(scored_listed)}


def test_each_exclude_list_is_counted_on_its_own_whatever_it_matches(tmp_path, corpus):
    """A Parquet list of ids and a text list of URLs (its column given by --exclude-column, no header)."""
    root, joined = corpus
    ids = joined["id"].iloc[[1, 2, 3]].tolist()
    pq.write_table(pa.table({"id": ids}), tmp_path / "ids.parquet")
    urls = _text_list(tmp_path / "urls.txt", None, joined["url"].iloc[[3, 4, 11]])
    summary = _curate(tmp_path, root, keep_fraction=1.0, exclude=[str(tmp_path / "ids.parquet")])["curate"]
    assert summary["filters"]["removed"][f"exclude:{tmp_path / 'ids.parquet'}"] == 3
    summary = _curate(tmp_path, root, name="by-url", keep_fraction=1.0, exclude=[urls], exclude_column="url")["curate"]
    assert summary["filters"]["removed"] == {f"exclude:{urls}": 3}
    kept = set(selected(tmp_path / "by-url").column("id").to_pylist())
    assert kept == set(joined[joined["error"].isna()]["id"]) - set(joined["id"].iloc[[3, 4, 11]])


def test_a_rerun_with_another_exclude_list_under_the_same_name_is_refused(tmp_path, corpus, capsys):
    root, joined = corpus
    listed = _text_list(tmp_path / "list.txt", "id", joined["id"].iloc[[1]])
    argv = ["--scores", root / "scores", "--output", tmp_path / "cur", "--keep-fraction", "0.5", "--executor",
            "local", "--exclude", listed]
    assert run_main(curate_cli.main, argv, capsys)[0] == 0
    _text_list(tmp_path / "list.txt", "id", joined["id"].iloc[[1, 2]])
    code, _, err = run_main(curate_cli.main, argv, capsys)
    assert code == 2 and "exclude" in err, err


@pytest.mark.parametrize("problem,flags,message", [
    ("missing", ["--exclude", "{tmp}/nowhere.txt"], "field 'exclude': no list at"),
    ("no header", ["--exclude", "{tmp}/headless.txt"], "field 'exclude': "),
    ("two columns", ["--exclude", "{tmp}/two.parquet"], "field 'exclude_column': "),
    ("unknown column", ["--exclude", "{tmp}/headless.txt", "--exclude-column", "nope"], "field 'exclude': "),
    ("numbers", ["--exclude", "{tmp}/numbers.parquet"], "field 'exclude': "),
    ("column alone", ["--exclude-column", "sha256"], "field 'exclude_column': "),
    ("bad column name", ["--exclude", "{tmp}/headless.txt", "--exclude-column", "a b"], "field 'exclude_column'"),
], ids=["missing", "no-header", "two-columns", "unknown-column", "numbers", "column-alone", "bad-column-name"])
def test_a_bad_exclude_exits_2_naming_the_flag_before_anything_is_written(tmp_path, corpus, capsys, problem, flags,
                                                                            message):
    root, _ = corpus
    (tmp_path / "headless.txt").write_text("0a1b2c3d\n")
    pq.write_table(pa.table({"id": ["a"], "url": ["b"]}), tmp_path / "two.parquet")
    pq.write_table(pa.table({"id": [1, 2]}), tmp_path / "numbers.parquet")
    argv = ["--scores", root / "scores", "--output", tmp_path / "cur", "--keep-fraction", "0.5", "--executor",
            "local", "--input", root / "in", "--format", "webdataset",
            *(f.format(tmp=tmp_path) for f in flags)]
    code, _, err = run_main(curate_cli.main, argv, capsys)
    assert code == 2 and message in err, err
    assert not (tmp_path / "cur").exists()


def test_the_dry_run_says_how_many_each_list_would_remove(tmp_path, corpus, capsys):
    root, joined = corpus
    listed = _text_list(tmp_path / "list.txt", "key", joined["key"].iloc[[1, 2, 5]])
    argv = ["--scores", root / "scores", "--output", tmp_path / "cur", "--keep-fraction", "0.5", "--executor",
            "local", "--exclude", listed, "--dry-run"]
    code, out, err = run_main(curate_cli.main, argv, capsys)
    assert code == 0 and f"'exclude:{listed}' 3" in out + err, out + err
    assert not (tmp_path / "cur").exists()


def test_every_record_is_selected_or_dropped_once_with_the_first_rule_that_removed_it(tmp_path, corpus):
    root, joined = corpus
    listed = _text_list(tmp_path / "list.txt", "id", joined["id"].iloc[[2, 5, 6]])
    _curate(tmp_path, root, keep_fraction=0.5, where="score >= 0.3", drop_truncated=True, exclude=[listed],
            write_dropped=True)
    kept = selected(tmp_path / "cur").to_pandas()
    gone = dropped(tmp_path / "cur").to_pandas()
    assert sorted([*kept["id"], *gone["id"]]) == sorted(joined["id"])
    rule = pd.Series("", index=joined.index)
    rule[joined["truncated"]] = "truncated"
    rule[joined["id"].isin(joined["id"].iloc[[2, 5, 6]])] = f"exclude:{listed}"
    rule[joined["score"] < 0.3] = "where"
    rule[joined["error"].notna()] = "error"
    passing = joined[rule == ""]
    best = _best(passing, 0.5)
    rule[(rule == "") & ~joined["id"].isin(best)] = "threshold"
    expected = dict(zip(joined["id"], rule))
    assert set(kept["id"]) == best
    assert dict(zip(gone["id"], gone["dropped_by"])) == {i: r for i, r in expected.items() if r}


def test_the_dropped_records_are_committed_with_their_shard(tmp_path, corpus):
    root, _ = corpus
    _curate(tmp_path, root, keep_fraction=0.5, write_dropped=True)
    files = sorted(f for e in read_manifest(str(tmp_path / "cur")).values() for f in e["files"])
    assert [f for f in files if f.startswith("dropped/")] == [f"dropped/{k:05d}.tar.parquet" for k in range(SHARDS)]
    before = dropped(tmp_path / "cur")
    summary = _curate(tmp_path, root, keep_fraction=0.5, write_dropped=True)  # a rerun: nothing left, nothing new
    assert summary["records"]["this_run"] == 0 and dropped(tmp_path / "cur").equals(before)


def test_export_ids_writes_the_kept_ids_and_datacomps_uids(tmp_path, corpus):
    root, joined = corpus
    summary = _curate(tmp_path, root, keep_fraction=0.5, export_ids=True)["curate"]
    kept = selected(tmp_path / "cur").to_pandas()
    ids = pq.read_table(tmp_path / "cur" / "kept_ids.parquet")
    assert ids.column_names == ["id", "key", "url", "score"]
    assert sorted(ids.column("id").to_pylist()) == sorted(kept["id"])
    uids = np.load(tmp_path / "cur" / "uids.npy", allow_pickle=False)
    with_uid = joined[joined["id"].isin(kept["id"]) & joined["uid"].notna()]
    expected = np.array([(int(u[:16], 16), int(u[16:], 16)) for u in with_uid["uid"]], np.dtype("u8,u8"))
    expected.sort()  # DataComp's subset file: sorted, one-dimensional, (high, low) 64-bit halves
    assert uids.dtype == np.dtype("u8,u8") and uids.ndim == 1 and np.array_equal(uids, expected)
    assert summary["exported"]["without_uid"] == len(kept) - len(with_uid)


def test_without_a_uid_column_only_the_kept_ids_are_exported(tmp_path):
    fake_scores(str(tmp_path / "scores"), {"a.tar": [{"id": "x", "kind": "caption", "score": 1.0, "label": 1,
                                                      "error": None}]})
    summary = curate(tmp_path, tmp_path / "scores", keep_fraction=1.0, export_ids=True)["curate"]
    assert (tmp_path / "cur" / "kept_ids.parquet").exists() and not (tmp_path / "cur" / "uids.npy").exists()
    assert summary["exported"]["kept"] == 1


def test_a_list_flag_may_be_repeated(tmp_path, corpus, capsys):
    root, joined = corpus
    first = _text_list(tmp_path / "a.txt", "id", joined["id"].iloc[[1]])
    second = _text_list(tmp_path / "b.txt", "id", joined["id"].iloc[[2]])
    argv = ["--scores", root / "scores", "--output", tmp_path / "cur", "--keep-fraction", "1", "--executor",
            "local", "--exclude", first, "--exclude", second]
    assert run_main(curate_cli.main, argv, capsys)[0] == 0
    summary = json.loads((tmp_path / "cur" / "summary.json").read_text())["curate"]
    assert summary["filters"]["removed"] == {f"exclude:{first}": 1, f"exclude:{second}": 1}


def test_the_report_says_how_many_each_list_removed(tmp_path, corpus):
    root, joined = corpus
    listed = _text_list(tmp_path / "list.txt", "id", joined["id"].iloc[[1, 2, 3, 4]])
    _curate(tmp_path, root, keep_fraction=0.5, exclude=[listed], report=str(tmp_path / "report"))
    html = (tmp_path / "report" / "index.html").read_text()
    assert f"exclude:{listed}</td><td>4</td>" in html.replace("\n", "")


# -- --rank-by: a fused value, ranked with the exact two-pass threshold -----------------------------------------------
FUSED = "0.7*pct(score) + 0.3*pct(similarity)"


@pytest.fixture(scope="module")
def ranked_corpus(tmp_path_factory):
    """Two webdataset shards of captions and documents with a `similarity` in their sidecars; scores and
    similarities rounded so that many tie."""
    root = tmp_path_factory.mktemp("ranked")
    rng = np.random.default_rng(5)
    keys = write_shards(root / "in", 2, 40, prefix="r", name="{k:05d}")
    scores, meta = {}, []
    for k in range(2):
        shard_keys = keys[40 * k: 40 * (k + 1)]
        rows = pd.DataFrame({"key": shard_keys, "similarity": np.round(rng.uniform(0, 0.4, 40), 1)})
        pq.write_table(pa.Table.from_pandas(rows, preserve_index=False), root / "in" / f"{k:05d}.parquet")
        meta.append(rows)
        scores[f"{k:05d}.tar"] = [{"id": x, "key": x, "kind": "caption" if i % 3 else "interleaved",
                                   "score": float(np.float32(round(rng.uniform(0, 3), 1))), "label": 1,
                                   "error": "decode: broken" if i == 7 else None} for i, x in enumerate(shard_keys)]
    fake_scores(str(root / "scores"), scores)
    records = pd.DataFrame([{**r, "source": shard} for shard, rs in scores.items() for r in rs])
    return root, records.merge(pd.concat(meta), on="key", how="left")


def _fused(records: pd.DataFrame) -> pd.Series:
    """The fused value as pandas computes it: each column's rank within its kind's scored records, ties sharing the
    highest (method="max"), as a fraction of them; then as float32, as it is ranked."""
    scored = records[records["error"].isna()].copy()
    pct = {c: scored.groupby("kind")[c].rank(method="max", pct=True) for c in ("score", "similarity")}
    return (0.7 * pct["score"] + 0.3 * pct["similarity"]).astype(np.float32)


@pytest.mark.parametrize("per_kind", [False, True], ids=["over-all", "per-kind"])
def test_rank_by_keeps_exactly_the_top_fraction_of_the_fused_value(tmp_path, ranked_corpus, per_kind):
    root, records = ranked_corpus
    summary = _curate(tmp_path, root, keep_fraction=0.3, rank_by=FUSED, per_kind=per_kind, export_ids=True)["curate"]
    fused = _fused(records)
    scored = records[records["error"].isna()].assign(rank_value=fused)
    groups = [g for _, g in scored.groupby("kind")] if per_kind else [scored]
    expected = set()
    for group in groups:  # the score's own rule, ties at the threshold kept, over the fused value
        cut = selection.sort_threshold(group["rank_value"].to_numpy(), 0.3)
        expected |= set(group[group["rank_value"] >= cut]["id"])
    kept = selected(tmp_path / "cur", ranked=True)
    assert set(kept.column("id").to_pylist()) == expected
    assert summary["rule"] == f"keep-fraction 0.3{' per kind' if per_kind else ''} by {FUSED}"
    written = dict(zip(kept.column("id").to_pylist(), kept.column("rank_value").to_pylist()))
    exported = pq.read_table(tmp_path / "cur" / "kept_ids.parquet")
    assert dict(zip(exported.column("id").to_pylist(), exported.column("rank_value").to_pylist())) == written
    assert written == {i: pytest.approx(float(v)) for i, v in zip(scored["id"], scored["rank_value"]) if i in written}


def test_the_dry_run_sweeps_over_the_fused_value(tmp_path, ranked_corpus, capsys):
    root, records = ranked_corpus
    argv = ["--scores", root / "scores", "--output", tmp_path / "cur", "--keep-fraction", "0.3", "--executor",
            "local", "--input", root / "in", "--format", "webdataset", "--rank-by", FUSED, "--dry-run",
            "--sweep", "0.5"]
    code, out, err = run_main(curate_cli.main, argv, capsys)
    scored = records[records["error"].isna()].assign(fused=_fused(records))
    cut = selection.sort_threshold(scored["fused"].to_numpy(), 0.5)
    assert code == 0 and f"{cut:.4f}" in out, out + err
    for _, group in scored.groupby("kind"):  # the sweep's row: what the cut keeps of each kind
        assert f"{(group['fused'] >= cut).sum()} of {len(group)}" in out, out
    assert not (tmp_path / "cur").exists()


@pytest.mark.parametrize("expression,problem", [
    ("__import__('os')", "unexpected"), ("pct(score", "expected ')'"), ("len(score)", "the only function is pct"),
    ("score +", "unexpected"), ("pct(caption) + 1", "unknown column 'caption'"), ("pct(kind)", "not a number"),
    ("+".join(["score"] * 65), "more than 64 columns"), ("", "empty"),
], ids=["call", "unclosed", "other-function", "dangling", "unknown-column", "string-column", "too-long", "empty"])
def test_a_bad_rank_by_exits_2_naming_it_before_anything_is_written(tmp_path, ranked_corpus, capsys, expression,
                                                                     problem):
    root, _ = ranked_corpus
    argv = ["--scores", root / "scores", "--output", tmp_path / "cur", "--keep-fraction", "0.3", "--executor",
            "local", "--input", root / "in", "--format", "webdataset", "--rank-by", expression]
    code, _, err = run_main(curate_cli.main, argv, capsys)
    assert code == 2 and "field 'rank_by'" in err and problem in err, err
    assert not (tmp_path / "cur").exists()


def test_rank_by_with_a_minimum_score_is_refused_naming_it(tmp_path, ranked_corpus, capsys):
    root, _ = ranked_corpus
    argv = ["--scores", root / "scores", "--output", tmp_path / "cur", "--min-score", "1", "--executor", "local",
            "--rank-by", "pct(score)"]
    code, _, err = run_main(curate_cli.main, argv, capsys)
    assert code == 2 and "field 'rank_by'" in err, err


# -- --balance-by COLUMN --max-per-group N: a cap per value, the best of each group kept ------------------------------
def _balanced_reference(records: pd.DataFrame, fraction: float, column: str, most: int) -> set[str]:
    """With pandas: the rule's kept records, then per value of `column` the best `most` by score (ties broken by
    id, then source, as the job documents)."""
    kept = records[records["id"].isin(_best(records, fraction))]
    ordered = kept.assign(neg=-kept["score"]).sort_values(["neg", "id", "source"])
    return set(ordered.groupby(column, dropna=False).head(most)["id"])


@pytest.mark.parametrize("column,most", [("similarity", 2), ("source", 3)])
def test_balance_by_keeps_at_most_n_per_group_the_best_of_each(tmp_path, ranked_corpus, column, most):
    root, records = ranked_corpus
    summary = _curate(tmp_path, root, keep_fraction=0.6, balance_by=column, max_per_group=most)["curate"]
    kept = set(selected(tmp_path / "cur").column("id").to_pylist())
    assert kept == _balanced_reference(records, 0.6, column, most)
    assert records[records["id"].isin(kept)].groupby(column).size().max() <= most
    assert summary["balance"]["removed"] == len(_best(records, 0.6)) - len(kept)


def test_the_dropped_records_name_balance_when_the_cap_removed_them(tmp_path, ranked_corpus):
    root, records = ranked_corpus
    _curate(tmp_path, root, keep_fraction=0.6, balance_by="similarity", max_per_group=2, write_dropped=True)
    gone = dropped(tmp_path / "cur").to_pandas()
    capped = _best(records, 0.6) - set(selected(tmp_path / "cur").column("id").to_pylist())
    assert set(gone[gone["dropped_by"] == "balance"]["id"]) == capped and capped


def test_the_dry_run_says_what_the_cap_would_drop(tmp_path, ranked_corpus, capsys):
    root, records = ranked_corpus
    argv = ["--scores", root / "scores", "--output", tmp_path / "cur", "--keep-fraction", "0.6", "--executor",
            "local", "--input", root / "in", "--format", "webdataset", "--balance-by", "similarity",
            "--max-per-group", "2", "--dry-run"]
    code, out, err = run_main(curate_cli.main, argv, capsys)
    removed = len(_best(records, 0.6)) - len(_balanced_reference(records, 0.6, "similarity", 2))
    assert code == 0 and f"{removed} records kept by the rule dropped by the cap" in out + err, out + err
    assert not (tmp_path / "cur").exists()


@pytest.mark.parametrize("flags,field", [(["--balance-by", "similarity"], "max_per_group"),
                                         (["--max-per-group", "2"], "balance_by"),
                                         (["--balance-by", "similarity", "--max-per-group", "0"], "max_per_group"),
                                         (["--balance-by", "nope", "--max-per-group", "2"], "balance_by")],
                         ids=["no-max", "no-column", "zero", "unknown-column"])
def test_a_bad_balance_exits_2_naming_the_flag_before_anything_is_written(tmp_path, ranked_corpus, capsys, flags,
                                                                          field):
    root, _ = ranked_corpus
    argv = ["--scores", root / "scores", "--output", tmp_path / "cur", "--keep-fraction", "0.6", "--executor",
            "local", "--input", root / "in", "--format", "webdataset", *flags]
    code, _, err = run_main(curate_cli.main, argv, capsys)
    assert code == 2 and f"field '{field}'" in err, err
    assert not (tmp_path / "cur").exists()


def test_a_balanced_curation_killed_after_its_first_commit_finishes_identically(tmp_path, ranked_corpus):
    """Killed (SIGKILL) right after its first shard's commit; the rerun keeps exactly what one whole run keeps."""
    root, _ = ranked_corpus
    flags = {"keep_fraction": 0.6, "balance_by": "similarity", "max_per_group": 2, "write_dropped": True}
    _curate(tmp_path, root, name="whole", **flags)
    argv = ["--scores", root / "scores", "--output", tmp_path / "cur", "--keep-fraction", "0.6", "--input",
            root / "in", "--format", "webdataset", "--balance-by", "similarity", "--max-per-group", "2",
            "--write-dropped", "--executor", "local", "--workers", "1"]
    marker = tmp_path / "paused"
    first = paused_job("jobs.curate", argv, marker, job_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(marker, first)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    assert len(read_manifest(str(tmp_path / "cur"))) == 1
    summary = _curate(tmp_path, root, **flags)  # the same, resumed
    assert summary["shards"]["already_committed"] == 1
    for read in (selected, dropped):
        assert read(tmp_path / "cur").sort_by("id").equals(read(tmp_path / "whole").sort_by("id"))


def test_ranking_balance_and_exclusion_on_ray_keep_what_the_local_executor_keeps(tmp_path, ranked_corpus, ray_cluster):
    """The distributions, the thresholds and the caps computed by Ray Data tasks, the selection by its actors."""
    root, records = ranked_corpus
    listed = _text_list(tmp_path / "list.txt", "id", records["id"].iloc[[3, 4, 5]])
    flags = {"keep_fraction": 0.5, "rank_by": FUSED, "balance_by": "similarity", "max_per_group": 4,
             "exclude": [listed], "write_dropped": True}
    local = _curate(tmp_path, root, name="local", **flags)["curate"]
    on_ray = _curate(tmp_path, root, name="ray", executor="ray", **flags)["curate"]
    for read in (selected, dropped):
        assert read(tmp_path / "ray").sort_by("id").equals(read(tmp_path / "local").sort_by("id"))
    assert on_ray["balance"] == local["balance"] and on_ray["thresholds"] == local["thresholds"]
    assert local["kept"] > 0 and local["balance"]["removed"] > 0
