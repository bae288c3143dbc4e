"""What a job asks of the cluster, and why: sized from what the cluster can scale to, not from the nodes that
happen to be up when the job is submitted.

- The local embedded instance (no RAY_ADDRESS) is this machine: scoring actors get a GPU if it has one, and the
  CPUs not reserved for them decode.
- A cluster reached through RAY_ADDRESS autoscales from zero: scoring actors want one GPU each unless told
  otherwise, and the CPUs their decoding needs beside it (`DECODE_CPUS_PER_GPU_ACTOR`); the shard readers scale
  with them (`READERS_PER_GPU_ACTOR`). When the cluster has no GPU now and no GPU worker type it can start, the job
  fails naming `gpus_per_actor` rather than quietly scoring at CPU speed.
- A field set by flag or config file always wins.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from pipeline.errors import InputError

# CPUs a GPU scoring actor holds for its decode threads: the goal is 620 captions/s per H200 (0.5B model), and one
# core decodes, pads and resizes 140-330 web images/s (1 MP photos with draft decoding to 512 px ones,
# benchmarks/preprocess_throughput.py): 2-5 cores, and one for the actor's own thread. Set cpus_per_actor to size
# it from your own images.
DECODE_CPUS_PER_GPU_ACTOR = 6
# Shard readers per GPU scoring actor: a reader only parses tars and Parquet (tens of thousands of samples/s), and
# a GPU takes several hundred.
READERS_PER_GPU_ACTOR = 0.25


@dataclass(frozen=True)
class ClusterView:
    remote: bool  # reached through RAY_ADDRESS (a cluster that may autoscale), else this job's own local instance
    cpus: float  # CPUs of the nodes up now
    gpus: float  # GPUs of the nodes up now
    max_gpus: float | None = None  # GPUs the autoscaler can provide (None: no autoscaler config to tell)


def current_view() -> ClusterView:
    """The cluster this process is connected to."""
    import ray

    from pipeline.runner.ray_compat import autoscaler_max_resources

    resources = ray.cluster_resources()
    scalable = autoscaler_max_resources()
    max_gpus = float(scalable.get("GPU", 0)) if scalable is not None else None
    return ClusterView(bool(os.environ.get("RAY_ADDRESS")), resources.get("CPU", 0), resources.get("GPU", 0),
                       max_gpus)


@dataclass(frozen=True)
class Choice:
    value: float | int
    why: str  # "flag", "config file", or "default: <reason>"


def expects_gpu(gpus_per_actor_set: float | None, on_ray: bool = True) -> bool:
    """Before Ray starts: will the scoring actors hold GPUs? The rule `gpus_per_actor` applies once connected (a
    job reached through RAY_ADDRESS gets GPUs unless told otherwise; a local one, or one run in this process
    without Ray, when this machine has one)."""
    if gpus_per_actor_set is not None:
        return gpus_per_actor_set > 0
    if on_ray and os.environ.get("RAY_ADDRESS"):
        return True
    import torch

    return torch.cuda.is_available()


def gpus_per_actor(set_value: float | None, source: str, view: ClusterView) -> Choice:
    if set_value is not None:
        return Choice(set_value, source)
    if not view.remote:
        return Choice(1.0 if view.gpus > 0 else 0.0,
                      f"default: this machine has {view.gpus:g} GPUs" if view.gpus else "default: no GPU here")
    if view.gpus > 0:
        return Choice(1.0, f"default for a cluster job: one GPU per scoring actor ({view.gpus:g} GPUs up now)")
    if view.max_gpus:
        return Choice(1.0, f"default for a cluster job: one GPU per scoring actor (none up now; the autoscaler "
                           f"can start {view.max_gpus:g})")
    raise InputError("gpus_per_actor", "the cluster at RAY_ADDRESS has no GPU now and no GPU worker type the "
                                       "autoscaler can start; set gpus_per_actor: 0 to score on CPUs, or add GPU "
                                       "workers to the cluster")


def cpus_per_actor(set_value: float | None, source: str, view: ClusterView, gpus: float) -> Choice:
    if set_value is not None:
        return Choice(set_value, source)
    if gpus <= 0:
        return Choice(1.0, "default for scoring on CPUs")
    if not view.remote:
        n = max(1.0, min(DECODE_CPUS_PER_GPU_ACTOR, view.cpus - 1))
        return Choice(n, f"default: {n:g} of this machine's {view.cpus:g} CPUs decode beside its GPU")
    return Choice(float(DECODE_CPUS_PER_GPU_ACTOR), f"default for a GPU actor: {DECODE_CPUS_PER_GPU_ACTOR} CPUs "
                                                    "decode beside each GPU")


def read_workers(set_value: int | None, source: str, view: ClusterView, actors: int, gpus: float) -> Choice:
    if set_value is not None:
        return Choice(set_value, source)
    if not view.remote or gpus <= 0:
        return Choice(1, "default: one shard reader" + ("" if view.remote else " on this machine"))
    n = max(1, -(-actors * READERS_PER_GPU_ACTOR // 1))
    return Choice(int(n), f"default for a cluster job: one reader per {round(1 / READERS_PER_GPU_ACTOR)} GPU "
                          f"scoring actors x {actors} actors")


def use_gpu(set_value: bool | None, source: str, view: ClusterView) -> Choice:
    """Training workers: one GPU each on a cluster (unless told otherwise), none on the local instance unless
    this machine has GPUs."""
    if set_value is not None:
        return Choice(set_value, source)
    if not view.remote:
        return Choice(view.gpus > 0, f"default: this machine has {view.gpus:g} GPUs")
    if view.gpus > 0 or view.max_gpus:
        return Choice(True, "default for a cluster job: one GPU per training worker")
    raise InputError("use_gpu", "the cluster at RAY_ADDRESS has no GPU now and no GPU worker type the autoscaler "
                                "can start; set use_gpu: false to train on CPUs, or add GPU workers")


def gpus_the_cluster_can_give(num_gpus: float, field: str, view: ClusterView) -> float:
    """`num_gpus` per actor when the cluster has GPUs or an autoscaler that can start some; else InputError naming
    `field` (Ray would wait for them forever, saying only "No available node types can fulfill")."""
    if num_gpus <= 0 or view.gpus > 0 or view.max_gpus:
        return num_gpus
    where = "the cluster at RAY_ADDRESS" if view.remote else "this machine's Ray instance"
    raise InputError(field, f"{where} has no GPU and no GPU worker type an autoscaler can start: actors asking for "
                            f"{num_gpus:g} would wait forever; set {field}=0 to score on CPUs")
