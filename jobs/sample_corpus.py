"""A procedurally drawn sample corpus (no downloads): scenes of coloured shapes whose captions name their colours,
shapes, counts and positions, and interleaved documents about them, written in every input format. The demo,
the tests and the benchmarks use it."""

from __future__ import annotations

import base64
import io
import json
import random
import tarfile
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from pipeline.io.uris import filesystem_for, join

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
          "purple": (140, 60, 170), "orange": (245, 140, 30), "black": (20, 20, 20), "white": (245, 245, 245)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.22), "bottom": (0.5, 0.78),
             "center": (0.5, 0.5)}
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}


@dataclass
class Scene:
    shape: str
    color: str
    count: int
    position: str
    background: str

    def caption(self) -> str:
        noun = self.shape + ("s" if self.count > 1 else "")
        where = "in the center" if self.position == "center" else f"at the {self.position}"
        return f"{COUNT_WORDS[self.count]} {self.color} {noun} {where} on a {self.background} background"


def random_scene(rng: random.Random) -> Scene:
    color, background = rng.sample([c for c in COLORS], 2)
    return Scene(rng.choice(SHAPES), color, rng.randint(1, 3), rng.choice(list(POSITIONS)), background)


def draw(scene: Scene, size: int = 128, fmt: str = "JPEG", rng: random.Random | None = None) -> bytes:
    rng = rng or random.Random(0)
    width, height = size + rng.randint(-16, 16), size + rng.randint(-16, 16)
    img = Image.new("RGB", (width, height), COLORS[scene.background])
    pen = ImageDraw.Draw(img)
    cx, cy = POSITIONS[scene.position]
    r = size // 10
    for k in range(scene.count):
        x = int((cx + (k - (scene.count - 1) / 2) * 0.16) * width)
        y = int(cy * height)
        box = (x - r, y - r, x + r, y + r)
        if scene.shape == "circle":
            pen.ellipse(box, fill=COLORS[scene.color])
        elif scene.shape == "square":
            pen.rectangle(box, fill=COLORS[scene.color])
        else:
            pen.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=COLORS[scene.color])
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def caption_samples(n: int, seed: int = 0, prefix: str = "cap") -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        scene = random_scene(rng)
        out.append({"key": f"{prefix}{i:06d}", "image": draw(scene, rng=rng), "caption": scene.caption(),
                    "meta": {"width": 128, "scene": scene.__dict__}})
    return out


def documents(n: int, seed: int = 0, prefix: str = "doc") -> list[dict]:
    """Interleaved documents: a title, then 1-3 (paragraph, image) sections about drawn scenes."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        texts, images = [f"Lesson {i}: shapes and colours"], [None]
        for _ in range(rng.randint(1, 3)):
            scene = random_scene(rng)
            texts += [f"The next picture shows {scene.caption()}. Count the {scene.shape}s and name their colour.",
                      None]
            images += [None, draw(scene, rng=rng)]
        out.append({"key": f"{prefix}{i:06d}", "texts": texts, "images": images, "meta": {"url": f"doc://{i}"}})
    return out


# -- writers, one per input format -------------------------------------------------------------------------------
def _write_bytes(uri: str, data: bytes) -> None:
    fs, path = filesystem_for(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_webdataset(uri: str, samples: list[dict]) -> None:
    members = []
    for s in samples:
        if s.get("image") is not None:
            members.append((f"{s['key']}.{s.get('ext', 'jpg')}", s["image"]))
        if s.get("caption") is not None:
            caption = s["caption"] if isinstance(s["caption"], bytes) else s["caption"].encode()
            members.append((f"{s['key']}.txt", caption))
        members.append((f"{s['key']}.json", json.dumps(s.get("meta") or {}).encode()))
    _write_bytes(uri, _tar(members))


def write_interleaved_wds(uri: str, docs: list[dict]) -> None:
    members = []
    for d in docs:
        infos = [None if img is None else {"image_base64": base64.b64encode(img).decode()} for img in d["images"]]
        payload = {"texts": d["texts"], "image_info": infos, **(d.get("meta") or {})}
        members.append((f"{d['key']}.json", json.dumps(payload).encode()))
    _write_bytes(uri, _tar(members))


def write_caption_parquet(uri: str, samples: list[dict]) -> None:
    table = pa.table({"id": [s["key"] for s in samples],
                      "image": pa.array([s.get("image") for s in samples], pa.binary()),
                      "caption": pa.array([s.get("caption") for s in samples], pa.string())})
    fs, path = filesystem_for(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(table, path, filesystem=fs, row_group_size=64)


def write_obelics(uri: str, docs: list[dict]) -> None:
    table = pa.table({"id": [d["key"] for d in docs],
                      "texts": pa.array([d["texts"] for d in docs], pa.list_(pa.string())),
                      "images": pa.array([d["images"] for d in docs], pa.list_(pa.binary()))})
    fs, path = filesystem_for(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(table, path, filesystem=fs, row_group_size=32)


def write_sample_corpus(root: str, n_captions: int = 240, n_documents: int = 80, per_shard: int = 40,
                        seed: int = 0) -> dict[str, str]:
    """The demo corpus: captions as webdataset tars and interleaved documents as OBELICS Parquet under `root`.
    Returns {format: input URI}."""
    caps = caption_samples(n_captions, seed)
    docs = documents(n_documents, seed + 1)
    for k in range(0, len(caps), per_shard):
        write_webdataset(join(root, "captions", f"{k // per_shard:05d}.tar"), caps[k:k + per_shard])
    for k in range(0, len(docs), per_shard):
        write_obelics(join(root, "documents", f"{k // per_shard:05d}.parquet"), docs[k:k + per_shard])
    return {"webdataset": join(root, "captions"), "obelics": join(root, "documents")}


def write_held_out_corpus(root: str, pairs, per_shard: int = 40) -> dict[str, str]:
    """Synthetic pairs (a pyarrow table: id, kind, texts, images) written as a corpus to score: captions as
    webdataset tars, documents as OBELICS Parquet, keyed by the pair id (whose true level the pairs table holds).
    Returns {format: input URI}."""
    rows = pairs.to_pylist()
    captions = [{"key": r["id"], "image": next(i for i in r["images"] if i is not None),
                 "caption": next(t for t in r["texts"] if t is not None), "meta": {"pair": r["id"]}}
                for r in rows if r["kind"] == "caption"]
    docs = [{"key": r["id"], "texts": r["texts"], "images": r["images"]}
            for r in rows if r["kind"] == "interleaved"]
    for k in range(0, len(captions), per_shard):
        write_webdataset(join(root, "captions", f"{k // per_shard:05d}.tar"), captions[k:k + per_shard])
    for k in range(0, len(docs), per_shard):
        write_obelics(join(root, "documents", f"{k // per_shard:05d}.parquet"), docs[k:k + per_shard])
    return {"webdataset": join(root, "captions"), "obelics": join(root, "documents")}
