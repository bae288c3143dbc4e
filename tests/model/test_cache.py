"""The node-local checkpoint cache: processes that load one s3:// checkpoint at once download it once, later loads
reuse it, a checkpoint rewritten at the same URI is fetched again, and a processor-only load fetches no weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import model
from model import cache
from model.checkpoint import load_processor
from tests.support.jobs import REPO_ROOT
from tests.support.s3_faults import S3FaultProxy

LOAD_AT_THE_SIGNAL = textwrap.dedent("""
    import json, os, sys, time
    import model
    from model import cache

    uri, ready, go = sys.argv[1], sys.argv[2], sys.argv[3]
    open(ready, "w").close()
    while not os.path.exists(go):  # start together: every process reaches the cache at the same moment
        time.sleep(0.005)
    net, processor = model.load(uri)
    print(json.dumps({"model_id": net.model_id, "entry": str(cache.fetch(uri)), "pid": os.getpid()}))
""")


def fetches(cache_dir: Path) -> list[dict]:
    log = cache_dir / cache.FETCH_LOG
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.fixture()
def s3_checkpoint(tiny_checkpoint, s3_bucket):
    uri = f"s3://{s3_bucket}/models/tiny"
    net, processor = model.load(tiny_checkpoint)
    model.save(net, processor.tokenizer, uri)
    return uri


def test_four_processes_loading_at_once_download_once(s3_checkpoint, s3_endpoint, checkpoint_cache, tmp_path,
                                                     monkeypatch):
    """Counted twice: by the cache's own log and by the GET requests for the weights that reach S3 (through a
    counting proxy), compared with what one download on an empty cache takes."""
    weights_key = s3_checkpoint.removeprefix("s3://") + "/model.safetensors"
    with S3FaultProxy(s3_endpoint) as proxy:
        env = {**os.environ, "PYTHONPATH": REPO_ROOT, "AWS_ENDPOINT_URL": proxy.url}  # this test's cache dir
        procs = [subprocess.Popen([sys.executable, "-c", LOAD_AT_THE_SIGNAL, s3_checkpoint,
                                   str(tmp_path / f"ready{i}"), str(tmp_path / "go")], env=env, cwd=REPO_ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(4)]
        deadline = time.time() + 240
        while not all((tmp_path / f"ready{i}").exists() for i in range(4)) and time.time() < deadline:
            time.sleep(0.05)
        (tmp_path / "go").touch()
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=240)
            assert proc.returncode == 0, err[-3000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
        gets_by_four = proxy.count("GET", weights_key)

        monkeypatch.setenv(cache.CACHE_DIR_ENV, str(tmp_path / "empty-cache"))
        with proxy.environ():
            cache.fetch(s3_checkpoint)
        gets_by_one = proxy.count("GET", weights_key) - gets_by_four
    monkeypatch.setenv(cache.CACHE_DIR_ENV, str(checkpoint_cache))

    log = fetches(checkpoint_cache)
    print(f"\n[cache] 4 processes loaded {s3_checkpoint}: {len(log)} download(s) in the cache's log; "
          f"{gets_by_four} GET(s) of the weights reached S3 (one download takes {gets_by_one})")
    assert len(log) == 1 and log[0]["pid"] in {r["pid"] for r in results}
    assert gets_by_one >= 1 and gets_by_four == gets_by_one
    assert len({r["entry"] for r in results}) == 1 and len({r["model_id"] for r in results}) == 1
    assert not list(checkpoint_cache.rglob(".tmp-*"))

    # a later job on the node reuses the entry
    net, _ = model.load(s3_checkpoint)
    assert net.model_id == results[0]["model_id"] and len(fetches(checkpoint_cache)) == 1


def test_a_changed_checkpoint_at_the_same_uri_is_fetched_again(s3_checkpoint, tiny_checkpoint_4way, checkpoint_cache):
    first, _ = model.load(s3_checkpoint)
    model.load(s3_checkpoint)
    assert len(fetches(checkpoint_cache)) == 1
    net, processor = model.load(tiny_checkpoint_4way)
    model.save(net, processor.tokenizer, s3_checkpoint)  # a new checkpoint under the same prefix
    second, _ = model.load(s3_checkpoint)
    log = fetches(checkpoint_cache)
    assert len(log) == 2 and log[0]["version"] != log[1]["version"]
    assert second.config.num_labels == 4 and second.model_id != first.model_id


def test_the_version_follows_names_sizes_and_modification_times():
    files = [cache.RemoteFile("config.json", 10, 1_000), cache.RemoteFile("model.safetensors", 99, 1_000)]
    same = [cache.RemoteFile(f.name, f.size, f.mtime_ns) for f in files]
    touched = [files[0], cache.RemoteFile("model.safetensors", 99, 2_000)]
    resized = [files[0], cache.RemoteFile("model.safetensors", 98, 1_000)]
    assert cache.listing_version(files) == cache.listing_version(same)
    assert len({cache.listing_version(v) for v in (files, touched, resized)}) == 3


def test_a_processor_only_load_fetches_no_weights_and_a_full_load_then_does(s3_checkpoint, checkpoint_cache):
    processor, model_id = load_processor(s3_checkpoint)
    log = fetches(checkpoint_cache)
    assert len(log) == 1 and log[0]["entry"].endswith(cache.CONFIG_ONLY_SUFFIX)
    assert not list(checkpoint_cache.rglob("*.safetensors"))
    net, _ = model.load(s3_checkpoint)
    assert net.model_id == model_id and len(fetches(checkpoint_cache)) == 2
    load_processor(s3_checkpoint)  # the full entry serves processor-only loads too
    assert len(fetches(checkpoint_cache)) == 2


def test_an_interrupted_download_leaves_nothing_behind(s3_checkpoint, checkpoint_cache, monkeypatch):
    copy_files = cache.pafs.copy_files

    def fail_on_weights(src, dst, **kwargs):
        if src.endswith(".safetensors"):
            raise OSError("connection reset")
        return copy_files(src, dst, **kwargs)

    monkeypatch.setattr(cache.pafs, "copy_files", fail_on_weights)
    with pytest.raises(OSError, match="connection reset"):
        model.load(s3_checkpoint)
    assert not fetches(checkpoint_cache) and not list(checkpoint_cache.rglob(".tmp-*"))
    assert not list(checkpoint_cache.rglob(cache.COMPLETE_MARKER))
    monkeypatch.setattr(cache.pafs, "copy_files", copy_files)
    net, _ = model.load(s3_checkpoint)
    assert len(fetches(checkpoint_cache)) == 1 and torch.isfinite(net.score_head.weight).all()


def test_local_checkpoints_are_used_in_place(tiny_checkpoint, checkpoint_cache):
    model.load(tiny_checkpoint)
    load_processor(tiny_checkpoint)
    assert not any(checkpoint_cache.iterdir())


def test_the_cache_directory_defaults_to_the_home_cache(monkeypatch):
    monkeypatch.delenv(cache.CACHE_DIR_ENV)
    assert cache.cache_dir() == Path("~/.cache/unifilter/checkpoints").expanduser()
