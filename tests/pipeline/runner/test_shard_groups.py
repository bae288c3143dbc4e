"""Packing shards into the first stage's calls (`pipeline.runner.executors.shard_groups`): every shard in exactly one
call, in listing order; small shards share a call, yet each worker gets at least four calls where there are enough
shards; no call over `CALL_SHARDS` shards; a shard of unknown size counts as a whole call."""

from __future__ import annotations

from pipeline.io.listing import Shard
from pipeline.runner.executors import CALL_BYTES, CALL_SHARDS, shard_groups

MB = 2**20


def shards(*sizes: int | None) -> list[Shard]:
    return [Shard(f"/in/{k:05d}.tar", f"{k:05d}.tar", size=size) for k, size in enumerate(sizes)]


def keys(groups: list[list[Shard]]) -> list[list[str]]:
    return [[s.key for s in group] for group in groups]


def test_no_shards_make_no_calls():
    assert shard_groups([], workers=4) == []


def test_every_shard_is_in_exactly_one_call_in_listing_order():
    listed = shards(*[k * MB for k in (5, 1, 300, 2, 2, 9, 700, 1, 1, 40)], None, 3 * MB)
    groups = shard_groups(listed, workers=2)
    assert [s for group in groups for s in group] == listed


def test_small_shards_share_calls_yet_each_worker_gets_at_least_four():
    groups = shard_groups(shards(*[MB] * 100), workers=2)
    assert 8 <= len(groups) < 100
    assert all(sum(s.size for s in group) <= 100 * MB // 8 for group in groups)


def test_shards_of_a_few_bytes_are_never_more_than_call_shards_to_a_call():
    groups = shard_groups(shards(*[10] * 1000), workers=1)
    assert max(len(group) for group in groups) == CALL_SHARDS


def test_empty_shards_share_calls_of_call_shards_each():
    groups = shard_groups(shards(*[0] * (CALL_SHARDS + 6)), workers=1)
    assert [len(group) for group in groups] == [CALL_SHARDS, 6]


def test_a_call_never_packs_more_than_call_bytes():
    groups = shard_groups(shards(*[CALL_BYTES // 3] * 40), workers=1)
    assert [len(group) for group in groups] == [3] * 13 + [1]


def test_a_shard_larger_than_a_call_is_a_call_of_its_own():
    groups = shard_groups(shards(MB, MB, 2 * CALL_BYTES, MB), workers=1)
    assert keys(groups) == [["00000.tar", "00001.tar"], ["00002.tar"], ["00003.tar"]]


def test_shards_of_unknown_size_are_each_a_call_of_their_own():
    groups = shard_groups(shards(None, None, None), workers=1)
    assert keys(groups) == [["00000.tar"], ["00001.tar"], ["00002.tar"]]


def test_where_any_size_is_unknown_small_shards_are_packed_up_to_call_bytes():
    groups = shard_groups(shards(*[MB] * 10, None, MB, MB), workers=4)
    assert [len(group) for group in groups] == [10, 1, 2]
