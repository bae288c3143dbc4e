"""`python -m jobs.synth` as users run it: configuration errors (its command line in this process), and a resume
on Ray after a kill that never pays twice."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections import Counter

from jobs.synth import main
from pipeline.commit.manifest import read_manifest
from pipeline.synth import RequestCache, SynthConfig
from tests.support.jobs import job_env, paused_job, run_main, wait_for
from tests.support.llm_servers import FakeOpenAI
from tests.support.synth import fake_caption_corpus, pairs_of


def test_unknown_generator_fails_fast_naming_the_field(tmp_path, capsys):
    code, _, err = run_main(main, ["--input", tmp_path, "--format", "webdataset", "--output", tmp_path,
                                   "--generator", "claude"], capsys)
    assert code == 2 and "field 'generator'" in err


def test_openai_without_endpoint_fails_fast_naming_the_field(tmp_path, capsys):
    code, _, err = run_main(main, ["--input", tmp_path, "--format", "webdataset", "--output", tmp_path,
                                   "--generator", "openai", "--llm", "m"], capsys)
    assert code == 2 and "field 'endpoint' is required" in err


def test_invalid_level_count_fails_fast_naming_the_field(tmp_path, capsys):
    cfg = tmp_path / "synth.yaml"
    cfg.write_text(f"input: {tmp_path}\nformat: webdataset\noutput: {tmp_path}/o\nlevels: [0, 1, 2, 3, 4]\n")
    code, _, err = run_main(main, ["--config", cfg], capsys)
    assert code == 2 and "field 'levels'" in err


def test_a_killed_run_resumes_without_repeating_cached_requests(tmp_path, ray_cluster, capsys):
    origins = fake_caption_corpus(tmp_path / "in", n_shards=6, per_shard=4)
    out = tmp_path / "out"
    with FakeOpenAI(lambda key, attempt, prompt: "ok", delay_s=0.15) as server:
        args = ["--input", tmp_path / "in", "--format", "webdataset", "--output", out,
                "--generator", "openai", "--endpoint", server.url + "/v1", "--llm", "test-vlm",
                "--concurrency", "1", "--threads-per-actor", "2", "--origins-per-block", "2"]
        marker = tmp_path / "paused"
        first = paused_job("jobs.synth", args, marker, job_env(RAY_ADDRESS=ray_cluster), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        wait_for(marker, first)  # its first shard committed; the actor goes on with the next ones meanwhile
        time.sleep(0.5)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
        assert first.returncode == -signal.SIGKILL
        time.sleep(2)  # let the killed job's actors go
        config = SynthConfig(input=str(tmp_path / "in"), format="webdataset", output=str(out),
                             generator="openai", endpoint=server.url + "/v1", llm="test-vlm")
        cache = RequestCache(str(out), config.generator_name())
        keys = [f"{k}.tar#{o}:L{lv}" for k in range(6) for o in origins if o.startswith(f"o{k}-")
                for lv in range(4)]
        cached_before = {k for k in keys if cache.get(k.rsplit(":L", 1)[0], int(k[-1])) is not None}
        requests_before = Counter(k for k, _ in server.log)
        committed = set(read_manifest(str(out)))
        assert 10 <= len(cached_before) < len(keys)

        code, _, err = run_main(main, [*args, "--executor", "local"], capsys)  # the same command, resumed
        assert code == 0, err[-3000:]
        requests_after = Counter(k for k, _ in server.log) - requests_before
    assert not (set(requests_after) & cached_before), "a cached (origin, level) was requested again"
    assert set(requests_after) | cached_before >= set(keys)
    pairs, errors = pairs_of(out)
    assert not errors and sorted(p["id"] for p in pairs) == sorted(f"{o}:L{lv}" for o in origins for lv in range(4))
    summary = json.loads((out / "summary.json").read_text())
    # every cached request of a shard that still had to be done came from the cache
    assert summary["synth"]["cache_hits"] == sum(1 for k in cached_before if k.split("#")[0] not in committed)
    assert summary["synth"]["requests_sent"] == sum(requests_after.values())
    print(f"resume: {len(cached_before)} requests cached before the kill, {sum(requests_after.values())} sent by "
          f"the rerun, {summary['synth']['cache_hits']} cache hits, "
          f"{summary['shards']['already_committed']} shards committed")
