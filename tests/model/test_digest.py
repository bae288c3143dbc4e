"""What the weights are: a local checkpoint's digest is its weight files' sha256, and a cached digest is trusted only
while the files are provably the ones hashed (not by size and modification time alone)."""

from __future__ import annotations

import json
import os
import shutil

from model import digest
from model.weights import content_hash
from tests.support.hostile import rewrite_keeping_size_and_mtime


def test_weights_rewritten_in_place_with_the_same_size_and_mtime_are_other_weights(tmp_path, tiny_checkpoint):
    """Issue 27 finding 6: `cp -p`-like rewrites kept the cached digest, and two models' scores mixed."""
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, model_dir)
    weights = model_dir / "model.safetensors"
    before = digest.local_digest(model_dir)  # hashed, and cached beside the weights
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # another last weight: same size, same header
    rewrite_keeping_size_and_mtime(weights, bytes(data))
    after = digest.local_digest(model_dir)
    assert after != before
    cached = json.loads((model_dir / digest.CACHE_NAME).read_text())["files"]["model.safetensors"]
    assert cached["sha256"] == content_hash(weights)


def test_weights_replaced_by_a_file_of_the_same_size_and_mtime_are_other_weights(tmp_path, tiny_checkpoint):
    """A file replaced by another (a new inode) with the old one's size and mtime, as `rsync -t` leaves it."""
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, model_dir)
    weights = model_dir / "model.safetensors"
    before = digest.local_digest(model_dir)
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # outside the partially hashed ends: the inode and ctime tell
    replacement = model_dir / "model.safetensors.new"
    replacement.write_bytes(bytes(data))
    os.utime(replacement, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(replacement, weights)
    assert digest.local_digest(model_dir) != before


def test_an_unchanged_checkpoint_keeps_its_cached_digest(tmp_path, tiny_checkpoint):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, model_dir)
    first = digest.local_digest(model_dir)
    cache = (model_dir / digest.CACHE_NAME).read_text()
    assert digest.local_digest(model_dir) == first
    assert (model_dir / digest.CACHE_NAME).read_text() == cache  # trusted, not hashed and written again
