"""Tar layouts: `webdataset` (img2dataset: `KEY.jpg|png|webp`, `KEY.txt`, `KEY.json`) and `interleaved-wds`
(`KEY.json` with `texts` and `image_info[].image_base64`).

Members are grouped by key (the path up to the first dot of the file name) wherever they lie in the tar, not
only when contiguous; samples come out in the order their keys first appear. Every member belongs to a sample,
whatever its name: nothing is dropped silently. A key that repeats a member (two `a.jpg`) is a duplicate: each of
its occurrences becomes an error record of its own. A cut or corrupt tar keeps the samples it holds whole; the
sample at the cut, or the shard itself when nothing in it is readable, becomes an error record.

A sample's id is its key, unique within the shard by construction (`pipeline.io.ids`): two keys that read the same
once written as text (`b"\xff"` and a name that is literally `\udcff`) are both duplicates, never two samples
under one id.
"""

from __future__ import annotations

import base64
import binascii
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field

from pipeline.errors import Category, SampleError
from pipeline.io.ids import UniqueIds, arrow_text

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
MAX_MEMBER_BYTES = 2 * 2**30  # a member declaring more is an error record, never an allocation (SourceOptions)


@dataclass
class TarSample:
    """One key's members as the tar holds them: `members` (each header and its bytes) for a whole sample, or the
    `error` that makes it an error record. `key` is the sample's id: unique in the shard, text Arrow can hold."""

    key: str
    members: list[tuple[tarfile.TarInfo, bytes]] | None = None
    error: SampleError | None = None

    @property
    def files(self) -> dict[str, bytes] | None:
        return None if self.members is None else {_extension(m.name): data for m, data in self.members}


@dataclass
class _Group:
    key: str
    members: list[tarfile.TarInfo] = field(default_factory=list)


def tar_samples(file, stem: str, max_member_bytes: int = MAX_MEMBER_BYTES
                ) -> Iterator[tuple[str, dict[str, bytes] | None, SampleError | None]]:
    """(id, {extension: bytes}, None) per sample, or (id, None, error) for one that cannot be read."""
    for sample in tar_members(file, stem, max_member_bytes):
        yield sample.key, sample.files, sample.error


def tar_members(file, stem: str, max_member_bytes: int = MAX_MEMBER_BYTES) -> Iterator[TarSample]:
    """Every key of the tar once (duplicates: once per occurrence), in the order keys first appear."""
    try:
        tar = tarfile.open(fileobj=file, mode="r:")
    except tarfile.TarError as err:
        yield TarSample(f"{stem}:unreadable", error=SampleError(Category.DECODE, f"not a readable tar shard ({err})"))
        return
    members, cut = _scan(tar, file)
    end = file.seek(0, 2)
    groups = _groups(members)
    ids = UniqueIds(groups)
    n_complete, reported = 0, False
    for group in groups.values():
        extensions = [_extension(m.name) for m in group.members]
        if len(set(extensions)) < len(extensions) or ids.shared(group.key):
            yield from _duplicates(group, extensions, ids)
            continue
        sample_id = ids.claim(group.key)
        error = _not_files(group)
        if error:
            yield TarSample(sample_id, error=error)
            continue
        try:
            data = [_read_member(tar, m, end, max_member_bytes) for m in group.members]
        except SampleError as err:
            yield TarSample(sample_id, error=err)
            continue
        except (tarfile.TarError, EOFError, ValueError) as err:
            cut, reported = cut or f"{type(err).__name__}: {err}", True
            yield TarSample(sample_id, error=SampleError(
                Category.DECODE, f"truncated or corrupt tar shard after {n_complete} samples ({cut})"))
            continue
        n_complete += 1
        yield TarSample(sample_id, list(zip(group.members, data)))
    if cut and not reported:  # cut between two samples: what followed is gone, and the shard says so
        yield TarSample(ids.claim(f"{stem}:{'truncated' if members else 'unreadable'}"), error=SampleError(
            Category.DECODE, f"truncated or corrupt tar shard after {n_complete} samples ({cut})"))


def _scan(tar: tarfile.TarFile, file) -> tuple[list[tarfile.TarInfo], str | None]:
    """Every member header, and why the shard ends early (None: it ends with its end-of-archive marker)."""
    members: list[tarfile.TarInfo] = []
    try:
        for member in tar:
            members.append(member)
        if not _ends_with_marker(file, tar.offset):
            return members, "shard ends without an end-of-archive marker"
    except (tarfile.TarError, EOFError) as err:
        return members, f"{type(err).__name__}: {err}"
    return members, None


def _groups(members: list[tarfile.TarInfo]) -> dict[str, _Group]:
    """Members by key. A directory entry that holds other members is the tar's structure, not a sample."""
    parents = {m.name.rsplit("/", i)[0] for m in members for i in range(1, m.name.count("/") + 1)}
    groups: dict[str, _Group] = {}
    for member in members:
        if member.isdir() and member.name.rstrip("/") in parents:
            continue
        key = _key(member.name)
        groups.setdefault(key, _Group(key)).members.append(member)
    return groups


def _not_files(group: _Group) -> SampleError | None:
    """Links (symbolic or hard), directories and devices are never followed or read: their sample is an error."""
    others = [m for m in group.members if not m.isreg()]
    if not others:
        return None
    names = ", ".join(f"{m.name} ({_TYPE_NAMES.get(m.type, 'special entry')})" for m in others[:4])
    if len(others) == len(group.members):
        return SampleError(Category.EMPTY, f"the sample's members are links or special entries, not files ({names})")
    return SampleError(Category.MALFORMED, f"the sample holds members that are not files ({names}); links are "
                                           "not followed")


_TYPE_NAMES = {tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hard link", tarfile.DIRTYPE: "directory",
               tarfile.CHRTYPE: "device", tarfile.BLKTYPE: "device", tarfile.FIFOTYPE: "fifo"}


def _ends_with_marker(file, offset: int) -> bool:
    """tarfile stops silently when a shard is cut at a header: demand the end-of-archive (zero) block."""
    file.seek(offset)
    block = file.read(tarfile.BLOCKSIZE)
    return len(block) == tarfile.BLOCKSIZE and not block.strip(b"\0")


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo, end: int, limit: int) -> bytes:
    """A member's bytes, its declared size checked first: over `limit` it is the sample's error; running past the
    end of the shard it is a cut. Nothing is allocated for a size the shard cannot hold. A GNU sparse member
    stores only its data's extents, so its size (what reading it allocates, holes filled with zeros) is checked
    against the shard's bytes after it, like any other's: a 10 KB tar cannot make the reader allocate 500 MB."""
    if member.size > limit:
        raise SampleError(Category.DECODE, f"tar member {member.name} declares {member.size} bytes, over the limit "
                                           f"of {limit} (source.max_member_bytes)")
    if member.offset_data + member.size > end:
        if member.issparse():  # the shard is whole: the sample's own member declares more than it could hold
            raise SampleError(Category.DECODE, f"tar member {member.name} is sparse and expands to {member.size} "
                                               f"bytes, more than the {end - member.offset_data} bytes of the shard "
                                               "after it")
        raise tarfile.ReadError(f"member {member.name} declares {member.size} bytes, past the end of the shard")
    data = tar.extractfile(member).read()
    if len(data) != member.size:
        raise tarfile.ReadError(f"member {member.name} is cut short")
    return data


def _key(name: str) -> str:
    directory, _, base = name.rpartition("/")
    stem = base.partition(".")[0]
    return f"{directory}/{stem}" if directory else stem


def _extension(name: str) -> str:
    return name.rpartition("/")[2].partition(".")[2].lower()


def _duplicates(group: _Group, extensions: list[str], ids: UniqueIds) -> Iterator[TarSample]:
    """Each occurrence of a repeated key (the n-th member of each extension), or each key whose id another key
    shares once written as text, as an error record of its own."""
    occurrences = max(extensions.count(e) for e in set(extensions))
    names = ", ".join(arrow_text(m.name) for m in group.members[:6])
    key = arrow_text(group.key)
    if occurrences > 1:
        reason = f"key {key!r} occurs {occurrences} times in the shard ({names})"
    else:
        reason = (f"key {key!r} and another key of the shard read the same once bytes that are not UTF-8 are "
                  f"written as backslash escapes ({names})")
    for _ in range(occurrences):
        yield TarSample(ids.claim(key), error=SampleError(Category.DUPLICATE, reason))


# -- the two layouts ---------------------------------------------------------------------------------------------
def webdataset_row(key: str, files: dict[str, bytes]) -> dict:
    meta = webdataset_meta(files)
    image = next((files[e] for e in IMAGE_EXTENSIONS if e in files), None)
    if image is None:
        raise SampleError(Category.EMPTY, f"sample has no image file (found {sorted(files) or 'nothing'})")
    if "txt" not in files:
        raise SampleError(Category.EMPTY, "sample has no caption (.txt) file")
    try:
        caption = files["txt"].decode("utf-8")
    except UnicodeDecodeError as err:
        raise SampleError(Category.DECODE, f"caption is not valid UTF-8 ({err.reason} at byte {err.start})") from None
    return {"id": key, "meta": meta, "texts": [None, caption], "images": [image, None]}


def webdataset_meta(files: dict[str, bytes] | None) -> str | None:
    meta = (files or {}).get("json")
    return meta.decode("utf-8", errors="replace") if meta is not None else None


def interleaved_row(key: str, files: dict[str, bytes]) -> dict:
    if "json" not in files:
        raise SampleError(Category.EMPTY, f"sample has no .json document (found {sorted(files)})")
    try:
        doc = json.loads(files["json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SampleError(Category.DECODE, f"document JSON does not parse ({err})") from None
    if not isinstance(doc, dict):
        raise SampleError(Category.MALFORMED, "document JSON is not an object")
    return {"id": key, **_interleaved_from_json(doc), "meta": _doc_meta(doc)}


def _interleaved_from_json(doc: dict) -> dict:
    """`texts` plus parallel `image_info` (image_base64 at image positions) -> parallel texts/images lists.
    Positions with neither (an image that failed to download) are skipped, as the original scripts do."""
    texts = doc.get("texts")
    infos = doc.get("image_info") or []
    if not isinstance(texts, list):
        raise SampleError(Category.MALFORMED, "document has no `texts` list")
    if len(infos) not in (0, len(texts)):
        raise SampleError(Category.MALFORMED, f"`image_info` has {len(infos)} entries for {len(texts)} positions")
    out_texts, out_images = [], []
    for i, text in enumerate(texts):
        info = infos[i] if infos else None
        if text is not None:
            if not isinstance(text, str):
                raise SampleError(Category.MALFORMED, f"text at position {i} is {type(text).__name__}, not a string")
            out_texts.append(text)
            out_images.append(None)
        elif isinstance(info, dict) and info.get("image_base64"):
            try:
                out_images.append(base64.b64decode(info["image_base64"], validate=True))
            except (binascii.Error, ValueError, TypeError):
                raise SampleError(Category.MALFORMED, f"image at position {i} is not valid base64") from None
            out_texts.append(None)
    return {"texts": out_texts, "images": out_images}


def _doc_meta(doc: dict) -> str | None:
    meta = {k: v for k, v in doc.items() if k not in ("texts", "image_info", "images")}
    return json.dumps(meta) if meta else None
