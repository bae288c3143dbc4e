"""Materializing kept samples from tars the scorer read with tolerance: a tar cut mid-member, member names that
are not UTF-8, a shard cut after it was scored. Every sample the scorer gave a record is written, or reported as
not materializable, and the shard commits; only a shard missing most of its kept samples is a fault."""

from __future__ import annotations

import io
import tarfile

import pyarrow as pa

from jobs import sample_corpus as corpus
from pipeline.curation.materialize import materialize
from pipeline.io.samples import SourceOptions, read_samples


def _kept(shard: str) -> pa.Table:
    """Every sample the scorer reads whole from `shard`, as kept score records (their `id` and `ordinal`)."""
    rows = [r for r in read_samples(shard, "webdataset") if r["error"] is None]
    return pa.table({"id": [r["id"] for r in rows], "ordinal": pa.array([r["ordinal"] for r in rows], pa.int64())})


def _members(path) -> dict[bytes, bytes]:
    """Raw member name -> bytes (names as the tar holds them, UTF-8 or not)."""
    with tarfile.open(path, encoding="utf-8", errors="surrogateescape") as tar:
        return {m.name.encode("utf-8", "surrogateescape"): tar.extractfile(m).read() for m in tar.getmembers()}


def _cut_inside(shard, name: str) -> None:
    """Cut the tar in the middle of member `name`'s bytes."""
    with tarfile.open(shard) as tar:
        member = tar.getmember(name)
    shard.write_bytes(shard.read_bytes()[: member.offset_data + member.size // 2])


def test_a_tar_cut_mid_member_materializes_every_whole_sample(tmp_path):
    shard = tmp_path / "cut.tar"
    items = corpus.caption_samples(6)
    corpus.write_webdataset(str(shard), items)
    whole = _members(shard)
    _cut_inside(shard, f"{items[4]['key']}.jpg")
    kept = _kept(str(shard))
    assert kept.column("id").to_pylist() == [it["key"] for it in items[:4]]
    done = materialize("webdataset", str(shard), kept, str(tmp_path / "out.tar"), SourceOptions())
    assert done.written == kept.num_rows and done.missing == []
    written = _members(tmp_path / "out.tar")
    assert {name.split(b".")[0].decode() for name in written} == set(kept.column("id").to_pylist())
    assert all(whole[name] == data for name, data in written.items())  # byte for byte


def test_member_names_that_are_not_utf8_materialize_under_the_scorers_ids(tmp_path):
    img = corpus.caption_samples(1)[0]["image"]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as tar:
        for name, data in (("caf\udce9.jpg", img), ("caf\udce9.txt", b"a cafe"), ("ok.jpg", img), ("ok.txt", b"ok")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    shard = tmp_path / "latin1.tar"
    shard.write_bytes(buf.getvalue())
    kept = _kept(str(shard))
    assert kept.column("id").to_pylist() == ["caf\\udce9", "ok"]  # the scorer's id rule (backslashreplace)
    done = materialize("webdataset", str(shard), kept, str(tmp_path / "out.tar"), SourceOptions())
    assert done.written == 2 and done.missing == []
    assert _members(tmp_path / "out.tar") == _members(shard)


def test_kept_samples_cut_after_scoring_are_reported_and_the_rest_written(tmp_path):
    shard = tmp_path / "in.tar"
    corpus.write_webdataset(str(shard), corpus.caption_samples(8))
    kept = _kept(str(shard))  # scored whole
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size * 3 // 4])  # then cut
    still_whole = set(_kept(str(shard)).column("id").to_pylist())
    done = materialize("webdataset", str(shard), kept, str(tmp_path / "out.tar"), SourceOptions())
    assert done.missing == sorted(set(kept.column("id").to_pylist()) - still_whole) and done.missing
    assert done.written == len(still_whole)
    assert {n.split(b".")[0].decode() for n in _members(tmp_path / "out.tar")} == still_whole


def test_a_curation_commits_a_shard_with_samples_it_cannot_materialize_and_names_them(tmp_path):
    from pipeline.commit.manifest import read_manifest
    from tests.support.curation import curate, fake_scores

    shard = tmp_path / "in" / "00000.tar"
    corpus.write_webdataset(str(shard), corpus.caption_samples(8))
    scored = [{"id": i, "kind": "caption", "score": 3.0, "label": 3, "error": None}
              for i in _kept(str(shard)).column("id").to_pylist()]
    fake_scores(str(tmp_path / "scores"), {"00000.tar": scored})
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size * 3 // 4])  # cut after it was scored
    missing = sorted({r["id"] for r in scored} - set(_kept(str(shard)).column("id").to_pylist()))
    summary = curate(tmp_path, tmp_path / "scores", min_score=1.0, input=str(tmp_path / "in"), format="webdataset",
                     materialize=True)
    assert summary["shards"]["incomplete"] == [] and summary["curate"]["not_materializable"] == len(missing) > 0
    stats = read_manifest(str(tmp_path / "cur"))["00000.tar"]["stats"]
    assert stats["not_materializable"] == {"count": len(missing), "ids": missing}
    assert len(_members(tmp_path / "cur" / "shards" / "00000.tar")) == 3 * (len(scored) - len(missing))
