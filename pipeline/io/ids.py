"""Sample ids, unique within their shard by construction: what every reader names its samples by, and what
curation matches kept records back to their samples by (never their position).

An id is the shard's own name for a sample (a tar key, a Parquet id column's value, else `<stem>:<row>`) as text
Arrow can hold (`arrow_text`). Names that two samples share (a key repeated in a tar, a Parquet id on two rows, or
two tar keys that read the same once their bytes that are not UTF-8 are escaped) belong to neither: those samples
are `duplicate` error records, each under an id of its own (`name#2`, ...) that no sample's name takes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable


def arrow_text(text: str | None) -> str | None:
    """Text Arrow can hold: lone surrogates (from a JSON escape, or a tar member name that is not UTF-8) written out
    as backslash escapes (`\\udcff`)."""
    if text is None:
        return None
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


class UniqueIds:
    """The ids of one shard's records: every name's id is reserved up front; `shared(name)` says whether another
    sample has it too (then it is a duplicate); `claim(name)` gives the name itself the first time, then the first
    `name#n` that no name of the shard and no earlier record holds."""

    def __init__(self, names: Iterable[str]):
        self._count = Counter(arrow_text(name) for name in names)
        self._used: set[str] = set()

    def shared(self, name: str) -> bool:
        return self._count[arrow_text(name)] > 1

    def claim(self, name: str) -> str:
        wanted = arrow_text(name)
        sample_id, n = wanted, 1
        while sample_id in self._used or (sample_id != wanted and sample_id in self._count):
            n += 1
            sample_id = f"{wanted}#{n}"
        self._used.add(sample_id)
        return sample_id
