"""Readers: every format yields the one sample schema with stable ids, and bad data becomes error rows."""

from __future__ import annotations

import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import sample_corpus as corpus
from pipeline.errors import InputError, ShardFault
from pipeline.io import parquet
from pipeline.io.listing import list_shards, output_name
from pipeline.io.samples import SAMPLE_SCHEMA, SourceOptions, read_samples
from tests.support import hostile
from tests.support.shards import WRITERS, write_shards


def rows_of(shard, fmt, options: SourceOptions | None = None):
    """Every row of a shard read whole; their positions are 0..n-1 (what the shard's end marker counts)."""
    rows = list(read_samples(shard, fmt, options))
    assert [r["ordinal"] for r in rows] == list(range(len(rows)))
    return rows


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_each_format_yields_the_sample_schema(fmt, tmp_path):
    write, make, suffix = WRITERS[fmt]
    items = make(5)
    shard = str(tmp_path / f"shard{suffix}")
    write(shard, items)
    rows = rows_of(shard, fmt)
    assert pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA).num_rows == 5  # conforms to the one sample schema
    assert [r["id"] for r in rows] == [i["key"] for i in items]
    assert [r["ordinal"] for r in rows] == list(range(5))
    for row, item in zip(rows, items):
        assert row["source"] == f"shard{suffix}" and row["error"] is None
        assert len(row["texts"]) == len(row["images"])
        assert all((t is None) != (m is None) for t, m in zip(row["texts"], row["images"]))
        if fmt in ("webdataset", "parquet"):
            assert row["kind"] == "caption"
            assert row["texts"] == [None, item["caption"]] and row["images"] == [item["image"], None]
        else:
            assert row["kind"] == "interleaved"
            assert row["texts"] == item["texts"] and row["images"] == item["images"]


def test_truncated_tar_keeps_complete_samples_and_reports_the_cut(tmp_path):
    shard = tmp_path / "cut.tar"
    corpus.write_webdataset(str(shard), corpus.caption_samples(6))
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) * 2 // 3])
    rows = rows_of(str(shard), "webdataset")
    good = [r for r in rows if not r["error"]]
    bad = [r for r in rows if r["error"]]
    assert len(good) >= 2 and len(bad) == 1
    assert bad[0]["error"].startswith("decode: truncated or corrupt tar shard after")
    assert [r["id"] for r in good] == [f"cap{i:06d}" for i in range(len(good))]


def test_truncated_parquet_is_one_error_row(tmp_path):
    shard = tmp_path / "cut.parquet"
    corpus.write_caption_parquet(str(shard), corpus.caption_samples(4))
    shard.write_bytes(shard.read_bytes()[:500])
    rows = rows_of(str(shard), "parquet")
    assert len(rows) == 1 and rows[0]["error"].startswith("decode: unreadable Parquet shard")
    assert rows[0]["id"] == "cut:unreadable"


def test_webdataset_sample_problems_become_error_rows(tmp_path):
    samples = corpus.caption_samples(3)
    samples[0]["caption"] = None
    samples[1]["image"] = None
    samples[2]["caption"] = b"caf\xe9 latte"
    shard = str(tmp_path / "bad.tar")
    corpus.write_webdataset(shard, samples)
    errors = [r["error"] for r in rows_of(shard, "webdataset")]
    assert errors[0] == "empty: sample has no caption (.txt) file"
    assert errors[1].startswith("empty: sample has no image file")
    assert errors[2].startswith("decode: caption is not valid UTF-8")


def test_list_shards_accepts_directories_globs_and_list_files(tmp_path):
    write_shards(tmp_path / "in", 3, 1)
    (tmp_path / "in" / "_tmp.tar").write_bytes(b"")  # underscore paths are metadata, never shards
    expected = [str(tmp_path / "in" / f"{k:03d}.tar") for k in range(3)]
    def uris(listing):
        return [s.uri for s in listing.shards]

    assert uris(list_shards(str(tmp_path / "in"), "webdataset")) == expected
    assert uris(list_shards(str(tmp_path / "in" / "00[02].tar"), "webdataset")) == [expected[0], expected[2]]
    listing = tmp_path / "shards.txt"
    listing.write_text("\n".join(expected[:2]) + "\n# a comment\n")
    assert uris(list_shards(str(listing), "webdataset")) == expected[:2]
    with pytest.raises(InputError, match="field 'input': .*missing does not exist"):
        list_shards(str(tmp_path / "missing"), "webdataset")
    with pytest.raises(InputError, match="field 'input': no parquet shards"):
        list_shards(str(tmp_path / "in"), "parquet")
    with pytest.raises(InputError, match="field 'input': list file .* does not exist"):
        list_shards(str(tmp_path / "nothing.txt"), "webdataset")
    assert len({output_name(s) for s in expected}) == 3


def test_s3_prefix_is_listed_and_read(s3_bucket):
    uri = f"s3://{s3_bucket}/corpus/part-0.tar"
    corpus.write_webdataset(uri, corpus.caption_samples(2))
    shards = list_shards(f"s3://{s3_bucket}/corpus", "webdataset")
    assert [s.uri for s in shards.shards] == [uri] and shards.shards[0].key == "part-0.tar"
    assert [r["id"] for r in rows_of(uri, "webdataset")] == ["cap000000", "cap000001"]


def _tar_of(tmp_path, members) -> str:
    shard = tmp_path / "layout.tar"
    shard.write_bytes(corpus._tar(members))
    return str(shard)


def test_tar_members_are_grouped_by_key_wherever_they_lie(tmp_path):
    img = corpus.caption_samples(1)[0]["image"]
    shard = _tar_of(tmp_path, [("p.jpg", img), ("q.jpg", img), ("p.txt", b"a p"), ("q.txt", b"a q"),
                               ("p.json", b'{"key": "p", "url": "http://x/p.jpg"}')])
    rows = rows_of(shard, "webdataset")
    assert [(r["id"], r["error"]) for r in rows] == [("p", None), ("q", None)]
    assert rows[0]["texts"] == [None, "a p"] and rows[1]["texts"] == [None, "a q"]
    assert rows[0]["key"] == "p" and rows[0]["url"] == "http://x/p.jpg"


def test_every_member_belongs_to_a_record_and_duplicate_keys_are_errors_of_their_own(tmp_path):
    img = corpus.caption_samples(1)[0]["image"]
    members = []
    for key in ("a", "b", "_c", "__d"):  # `_` keys are samples like any other
        members += [(f"{key}.jpg", img), (f"{key}.txt", f"caption {key}".encode())]
    members += [("dup.jpg", img), ("dup.txt", b"first"), ("dup.jpg", img), ("dup.txt", b"second"),
                ("README", b"no extension")]
    rows = rows_of(_tar_of(tmp_path, members), "webdataset")
    by_id = {r["id"]: r for r in rows}
    assert len(rows) == len(by_id) == 7  # a, b, _c, __d, dup, dup#2, README: nothing dropped, ids unique
    assert all(by_id[k]["error"] is None for k in ("a", "b", "_c", "__d"))
    for dup in ("dup", "dup#2"):
        assert by_id[dup]["error"].startswith("duplicate: key 'dup' occurs 2 times")
        assert by_id[dup]["error_category"] == "duplicate"
    assert by_id["README"]["error"].startswith("empty: sample has no image file")


def test_listed_spellings_of_one_shard_are_one_shard(tmp_path):
    corpus.write_webdataset(str(tmp_path / "D" / "00000.tar"), corpus.caption_samples(1))
    d = tmp_path / "D"
    listing = tmp_path / "list.txt"
    listing.write_text(f"{d}/00000.tar\n{d}/../D/00000.tar\nfile://{d}/00000.tar\n{d}/./00000.tar\n00000.tar\n")
    (tmp_path / "00000.tar").write_bytes((d / "00000.tar").read_bytes())  # a relative entry: beside the list
    shards = list_shards(str(listing), "webdataset")
    assert [s.uri for s in shards.shards] == [str(tmp_path / "00000.tar"), str(d / "00000.tar")]
    assert shards.duplicates == 3
    assert [s.key for s in shards.shards] == ["00000.tar", "D/00000.tar"]


def test_brace_ranges_name_shard_sets(tmp_path):
    write_shards(tmp_path / "in", 3, 1, name="{k:05d}")
    write_shards(tmp_path / "in", 1, 1, name="{k:05d}", first=10)
    shards = list_shards(str(tmp_path / "in" / "{00000..00002}.tar"), "webdataset")
    assert [s.key for s in shards.shards] == ["00000.tar", "00001.tar", "00002.tar"]
    assert shards.root == str(tmp_path / "in")


def test_a_shard_that_cannot_be_read_is_a_fault_not_a_record(tmp_path):
    rows = read_samples(str(tmp_path / "gone.tar"), "webdataset", SourceOptions(read_attempts=3, read_backoff_s=0))
    with pytest.raises(ShardFault) as fault:
        next(rows)
    assert fault.value.category.value == "io"
    assert "shard does not exist (gave up after 3 attempts)" in str(fault.value)


# -- shards that change under the reader ---------------------------------------------------------------------------
def _fault(rows) -> ShardFault:
    """The fault reading the rest of `rows` raises (no row of such a shard is ever committed)."""
    with pytest.raises(ShardFault) as fault:
        list(rows)
    return fault.value


@pytest.mark.parametrize("change", ["shrunk", "rewritten"])
def test_a_local_shard_that_changed_after_listing_is_a_fault_not_a_short_commit(change, tmp_path):
    import os

    shard = tmp_path / "in" / "00000.tar"
    corpus.write_webdataset(str(shard), corpus.caption_samples(8))
    listed = list_shards(str(tmp_path / "in"), "webdataset").shards[0]
    if change == "shrunk":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    else:  # same size, newer content
        os.utime(shard, ns=(listed.mtime_ns + 10**9, listed.mtime_ns + 10**9))
    failed = _fault(read_samples(listed, "webdataset", SourceOptions(read_attempts=3, read_backoff_s=0)))
    assert failed.category.value == "io" and "changed since it was listed" in str(failed)
    assert ("size " if change == "shrunk" else "modified at") in str(failed)
    assert "gave up after" not in str(failed)  # not retried: a rerun lists it again


def test_a_local_shard_cut_while_it_is_read_is_never_committed(tmp_path):
    shard = tmp_path / "in" / "00000.tar"
    corpus.write_webdataset(str(shard), corpus.caption_samples(8))
    listed = list_shards(str(tmp_path / "in"), "webdataset").shards[0]
    rows = read_samples(listed, "webdataset")
    next(rows)  # the reader has the file open and has read its headers
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    failed = _fault(rows)
    assert failed.category.value == "io" and "changed while it was read: size" in str(failed)


def test_an_s3_shard_replaced_after_listing_is_a_fault_named_as_such(s3_bucket):
    uri = f"s3://{s3_bucket}/in/00000.tar"
    corpus.write_webdataset(uri, corpus.caption_samples(8))
    listed = list_shards(f"s3://{s3_bucket}/in", "webdataset").shards[0]
    corpus.write_webdataset(uri, corpus.caption_samples(3))
    failed = _fault(read_samples(listed, "webdataset", SourceOptions(read_attempts=3, read_backoff_s=0)))
    # S3 times are whole seconds: a replacement within the listing's second is told by its size, a later one by
    # its time (checked first)
    assert failed.category.value == "io"
    assert re.search(r"changed since it was listed: (size \d+ -> \d+ bytes|modified at )", str(failed)), failed


# -- tar members: sizes, links ------------------------------------------------------------------------------------
def _huge_member_tar(good: list[tuple[str, bytes]], name: str, declared: int, kind: bytes = b"0") -> bytes:
    """Whole members, then a header declaring `declared` bytes followed by a little data."""
    import io
    import tarfile

    whole = corpus._tar(good)
    with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
        tar.getmembers()
        end_of_members = tar.offset  # where the end-of-archive marker begins
    info = tarfile.TarInfo(name)
    info.size, info.type = declared, kind
    return whole[:end_of_members] + info.tobuf(tarfile.GNU_FORMAT) + b"x" * 4096


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_member_declaring_a_terabyte_is_an_error_record_not_a_fault(where, tmp_path, request):
    img = corpus.caption_samples(1)[0]["image"]
    data = _huge_member_tar([("a.jpg", img), ("a.txt", b"a caption")], "b.jpg", 2**40)
    if where == "local":
        uri = str(tmp_path / "huge.tar")
    else:
        uri = f"s3://{request.getfixturevalue('s3_bucket')}/huge.tar"
    corpus._write_bytes(uri, data)
    rows = rows_of(uri, "webdataset")
    assert [r["id"] for r in rows][:2] == ["a", "b"] and rows[0]["error"] is None
    assert rows[1]["error"].startswith(f"decode: tar member b.jpg declares {2**40} bytes, over the limit")


@pytest.mark.parametrize("header", ["pax", "gnu-longname"])
def test_an_extended_header_declaring_a_terabyte_is_a_cut_not_a_fault(header, tmp_path):
    import tarfile

    img = corpus.caption_samples(1)[0]["image"]
    kind = tarfile.XHDTYPE if header == "pax" else tarfile.GNUTYPE_LONGNAME
    data = _huge_member_tar([("a.jpg", img), ("a.txt", b"a caption")], "././@header", 2**40, kind)
    (tmp_path / "ext.tar").write_bytes(data)
    rows = rows_of(str(tmp_path / "ext.tar"), "webdataset")
    assert [r["id"] for r in rows] == ["a", "ext:truncated"] and rows[0]["error"] is None
    assert rows[1]["error"].startswith("decode: truncated or corrupt tar shard after 1 samples")


def test_a_member_over_the_limit_is_its_samples_error_and_the_rest_is_read(tmp_path):
    img = corpus.caption_samples(1)[0]["image"]
    members = [("a.jpg", img), ("a.txt", b"a"), ("big.jpg", img + b"\0" * 5000), ("big.txt", b"big"),
               ("c.jpg", img), ("c.txt", b"c")]
    rows = rows_of(_tar_of(tmp_path, members), "webdataset", SourceOptions(max_member_bytes=len(img) + 100))
    assert [(r["id"], r["error"] is None) for r in rows] == [("a", True), ("big", False), ("c", True)]
    assert "tar member big.jpg declares" in rows[1]["error"]


def test_a_sample_whose_members_are_links_is_an_error_record(tmp_path):
    import io
    import tarfile

    img = corpus.caption_samples(1)[0]["image"]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        directory = tarfile.TarInfo("part")
        directory.type = tarfile.DIRTYPE
        tar.addfile(directory)  # a folder holding samples: the tar's structure, not a sample
        for name, data in (("part/a.jpg", img), ("part/a.txt", b"a caption")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, kind in (("part/b.jpg", tarfile.SYMTYPE), ("part/b.txt", tarfile.LNKTYPE)):
            link = tarfile.TarInfo(name)
            link.type, link.linkname = kind, "part/a" + name[-4:]
            tar.addfile(link)
    shard = tmp_path / "links.tar"
    shard.write_bytes(buf.getvalue())
    rows = rows_of(str(shard), "webdataset")
    assert [r["id"] for r in rows] == ["part/a", "part/b"] and rows[0]["error"] is None
    assert rows[1]["error"].startswith("empty: the sample's members are links or special entries, not files")


# -- what a shard can make the reader hold: bounded by its own bytes ----------------------------------------------
def test_a_sparse_member_expanding_past_the_shard_is_its_samples_error(tmp_path):
    """A 3 KB tar whose sparse member declares 50 MB (500 MB once took the reader 2.2 GB): checked like any other
    member, before anything is allocated."""
    hostile.sparse_member_tar(str(tmp_path / "sparse.tar"), 50_000_000)
    rows = rows_of(str(tmp_path / "sparse.tar"), "webdataset")
    assert [r["id"] for r in rows] == ["s"]
    assert rows[0]["error"] == ("decode: tar member s.jpg is sparse and expands to 50000000 bytes, more than the "
                                "2560 bytes of the shard after it")


def test_a_sparse_member_within_the_shard_is_read_like_any_other(tmp_path):
    hostile.sparse_member_tar(str(tmp_path / "sparse.tar"), 1024)
    rows = rows_of(str(tmp_path / "sparse.tar"), "webdataset")
    assert rows[0]["error"] is None and rows[0]["images"][0] == b"\0" * 512 + b"\xff" * 512


def test_a_parquet_decompression_bomb_is_an_error_record_per_row(tmp_path, monkeypatch):
    """100 rows of 10 MB of zeros are a 33 KB shard that once took the reader 4.2 GB; here 20 rows of 200 KB against
    a 1 MiB slice: refused from the footer, each row its error record, the next row group read."""
    monkeypatch.setattr(parquet, "SLICE_BYTES", 2**20)
    shard = tmp_path / "zeros.parquet"
    hostile.zero_cells_parquet(str(shard), 20, 200_000)
    good = corpus.caption_samples(4)
    table = pq.read_table(shard)
    pq.write_table(pa.concat_tables([table, pa.table({"id": [s["key"] for s in good],
                                                      "image": [s["image"] for s in good],
                                                      "caption": [s["caption"] for s in good]})]),
                   shard, compression="zstd", use_dictionary=False, row_group_size=20)
    rows = rows_of(str(shard), "parquet")
    # the id column is small and intact: each error record carries its sample's own id
    assert [r["id"] for r in rows] == [f"z{i}" for i in range(20)] + [s["key"] for s in good]
    assert all(r["error"].startswith("decode: Parquet row group 0: column 'image' expands from ") and
               "(a decompression bomb: over 100x)" in r["error"] for r in rows[:20])
    assert [r["images"][0] for r in rows[20:]] == [s["image"] for s in good]


def test_rows_repeating_one_large_value_are_read_whole(tmp_path, monkeypatch):
    """One 300 KB value stored once and referenced by 10 rows (a dictionary page): read in spans of rows that hold
    at most a slice's bytes, every row with its value."""
    monkeypatch.setattr(parquet, "SLICE_BYTES", 2**20)
    hostile.repeated_cells_parquet(str(tmp_path / "rep.parquet"), 10, 300_000)
    rows = rows_of(str(tmp_path / "rep.parquet"), "parquet")
    assert [(r["id"], r["error"], r["texts"][1]) for r in rows] == [(f"d{i}", None, f"repeated {i}") for i in range(10)]
    assert all(r["images"][0] == b"\0" * 300_000 for r in rows)


@pytest.mark.parametrize("fmt", ["parquet", "obelics"])
def test_a_parquet_value_over_the_limit_is_its_samples_error_and_the_rest_is_read(fmt, tmp_path):
    write, make, _ = WRITERS[fmt]
    items = make(3)
    big = items[1]["image"] + b"\0" * 5000 if fmt == "parquet" else None
    if fmt == "parquet":
        items[1]["image"] = big
    else:
        position = next(k for k, m in enumerate(items[1]["images"]) if m is not None)
        big = items[1]["images"][position] + b"\0" * 5000
        items[1]["images"][position] = big
    write(str(tmp_path / "s.parquet"), items)
    rows = rows_of(str(tmp_path / "s.parquet"), fmt, SourceOptions(max_member_bytes=len(big) - 1))
    assert [(r["id"], r["error"] is None) for r in rows] == [(i["key"], k != 1) for k, i in enumerate(items)]
    assert rows[1]["error"] == (f"decode: a value of {len(big)} bytes, over the limit of {len(big) - 1} "
                                "(source.max_member_bytes)")
    assert rows[1]["key"] is None and rows[1]["images"] is None


def test_a_corrupt_row_group_is_one_error_record_per_row_and_the_others_are_read(tmp_path):
    items = corpus.caption_samples(8)
    shard = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": [i["key"] for i in items], "image": [i["image"] for i in items],
                             "caption": [i["caption"] for i in items]}), shard, row_group_size=4, use_dictionary=False)
    chunk = pq.ParquetFile(shard).metadata.row_group(1).column(1)  # the second row group's images
    data = bytearray(shard.read_bytes())
    data[chunk.data_page_offset:chunk.data_page_offset + 8] = b"\xa5" * 8  # its page header
    shard.write_bytes(bytes(data))
    rows = rows_of(str(shard), "parquet")
    assert [r["id"] for r in rows] == [i["key"] for i in items]  # the ids are read apart from the broken images
    assert all(r["error"] is None for r in rows[:4])
    assert all(r["error"].startswith("decode: corrupt Parquet row group 1") for r in rows[4:])


# -- input that cannot be listed ----------------------------------------------------------------------------------
def test_a_missing_bucket_is_named_as_such(s3_endpoint):
    with pytest.raises(InputError, match="field 'input': bucket no-such-bucket-here does not exist"):
        list_shards("s3://no-such-bucket-here/x", "webdataset")


def test_an_unreachable_endpoint_is_an_input_error_naming_it(s3_endpoint, monkeypatch):
    from tests.support.ports import free_port

    closed = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", closed)
    with pytest.raises(InputError, match=f"field 'input': cannot list s3://b-x/corpus at endpoint {closed}"):
        list_shards("s3://b-x/corpus", "webdataset")


def test_an_unreachable_endpoint_ends_a_job_with_exit_2_and_no_traceback(tmp_path, tiny_checkpoint):
    import subprocess
    import sys

    from tests.support.jobs import job_env
    from tests.support.ports import free_port

    closed = f"http://127.0.0.1:{free_port()}"
    done = subprocess.run([sys.executable, "-m", "jobs.score", "--input", "s3://b-x/corpus", "--format", "webdataset",
                           "--output", str(tmp_path / "out"), "--model", tiny_checkpoint],
                          env=job_env(AWS_ENDPOINT_URL=closed), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"field 'input': cannot list s3://b-x/corpus at endpoint {closed}" in done.stderr
    assert "Traceback" not in done.stderr
