"""What jobs ask of the cluster, as a function of (cluster reached or local, resources now, flags): sized from what
an autoscaling cluster can scale to, never from the nodes that happen to be up."""

from __future__ import annotations

import pytest

from pipeline.errors import InputError
from pipeline.runner.resources import ClusterView, cpus_per_actor, gpus_per_actor, read_workers, use_gpu

LOCAL_2_CPU = ClusterView(remote=False, cpus=2, gpus=0)
REMOTE_GPUS_SCALED_TO_ZERO = ClusterView(remote=True, cpus=0, gpus=0, max_gpus=64)  # head with CPU: 0, workers at 0
REMOTE_GPUS_UP = ClusterView(remote=True, cpus=96, gpus=8, max_gpus=64)
REMOTE_NO_GPU_AT_ALL = ClusterView(remote=True, cpus=2, gpus=0, max_gpus=None)


def test_a_local_two_cpu_machine_scores_on_cpu_sized_to_the_machine():
    gpus = gpus_per_actor(None, "default", LOCAL_2_CPU)
    assert gpus.value == 0 and "no GPU here" in gpus.why
    assert cpus_per_actor(None, "default", LOCAL_2_CPU, gpus=0).value == 1
    readers = read_workers(None, "default", LOCAL_2_CPU, actors=1, gpus=0)
    assert readers.value == 1 and "this machine" in readers.why
    assert use_gpu(None, "default", LOCAL_2_CPU).value is False


def test_a_cluster_with_its_gpu_nodes_scaled_to_zero_still_asks_for_gpus():
    gpus = gpus_per_actor(None, "default", REMOTE_GPUS_SCALED_TO_ZERO)
    assert gpus.value == 1 and "the autoscaler can start 64" in gpus.why
    # each GPU actor holds the CPUs that decode its images, and the readers scale with the actors, not with the
    # CPUs up now (zero)
    assert cpus_per_actor(None, "default", REMOTE_GPUS_SCALED_TO_ZERO, gpus=1).value == 6
    assert read_workers(None, "default", REMOTE_GPUS_SCALED_TO_ZERO, actors=8, gpus=1).value == 2
    assert use_gpu(None, "default", REMOTE_GPUS_SCALED_TO_ZERO).value is True


def test_a_cluster_with_gpu_nodes_up():
    assert gpus_per_actor(None, "default", REMOTE_GPUS_UP).value == 1
    assert read_workers(None, "default", REMOTE_GPUS_UP, actors=4, gpus=1).value == 1
    assert read_workers(None, "default", REMOTE_GPUS_UP, actors=5, gpus=1).value == 2  # rounded up


def test_a_local_gpu_decodes_with_the_cpus_the_machine_has():
    local_gpu = ClusterView(remote=False, cpus=4, gpus=1)
    decode = cpus_per_actor(None, "default", local_gpu, gpus=1)
    assert decode.value == 3 and "this machine's 4 CPUs" in decode.why  # one left for the reader and the driver


def test_a_cluster_that_cannot_have_a_gpu_fails_naming_the_field():
    with pytest.raises(InputError, match="field 'gpus_per_actor': .*set gpus_per_actor: 0"):
        gpus_per_actor(None, "default", REMOTE_NO_GPU_AT_ALL)
    with pytest.raises(InputError, match="field 'use_gpu'"):
        use_gpu(None, "default", REMOTE_NO_GPU_AT_ALL)


@pytest.mark.parametrize("view", [LOCAL_2_CPU, REMOTE_GPUS_SCALED_TO_ZERO, REMOTE_GPUS_UP, REMOTE_NO_GPU_AT_ALL])
def test_explicit_settings_always_win(view):
    assert gpus_per_actor(0.5, "flag", view).value == 0.5 and gpus_per_actor(0.0, "config file", view).why == \
        "config file"
    assert read_workers(7, "flag", view, actors=3, gpus=1).value == 7
    assert cpus_per_actor(2.5, "config file", view, gpus=1).value == 2.5
    assert use_gpu(False, "flag", view).value is False


def test_auto_precision_is_made_definite_before_the_job_so_the_identity_names_it(monkeypatch):
    """A CPU run and a GPU run of `dtype: auto` compute scores in different precisions: their identities differ,
    so one output never mixes the two, and the actors are handed the same resolved precision."""
    from pipeline.runner import Plan, Resources
    from pipeline.scoring import ScoreConfig, ScoringJob

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    base = {"input": "in", "format": "webdataset", "output": "out", "model": "m"}
    assert ScoreConfig(**base).identity("m@1")["dtype"] == "float32"  # no GPU on this machine
    assert ScoreConfig(**base, gpus_per_actor=1).identity("m@1")["dtype"] == "bfloat16"
    assert ScoreConfig(**base, dtype="float16", gpus_per_actor=0).identity("m@1")["dtype"] == "float16"
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")  # a cluster job gets GPUs unless told otherwise
    config = ScoreConfig(**base)
    assert config.identity("m@1")["dtype"] == "bfloat16"
    plan = Plan(stages={"read": Resources(max_actors=1), "score": Resources(num_gpus=1.0)})
    assert ScoringJob(config).stages(plan)[1].settings.dtype == "bfloat16"
