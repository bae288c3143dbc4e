"""Connecting a job to Ray: the cluster in RAY_ADDRESS, or a local instance of the job's own bound to loopback,
quiet unless asked (Ray's progress bars and logs off; the job's own progress line and summary instead)."""

from __future__ import annotations

import logging
import os
import sys


def connect(verbose: bool = False, job: str = "job") -> None:
    import ray

    from pipeline.runner.ray_compat import loopback_only, quiet_worker_errors

    if ray.is_initialized():
        return
    level = logging.INFO if verbose else logging.WARNING
    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(level)
    if not verbose:
        # Said on every run, asking nothing of the user: that token authentication is on (it is, by default).
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=verbose, logging_level=level)
    else:
        # address="local": always this job's own instance, even when other Ray instances run on this host (which
        # ray.init() would otherwise try to join, or refuse with "Found multiple active Ray instances").
        # Ray Train starts a handful of helper actors beside its workers: on a small machine that is more worker
        # processes than Ray's startup-concurrency heuristic (one per CPU) expects, and the raylet warns of it on
        # every run; let a few more start at once.
        loopback_only()
        ray.init(address="local", include_dashboard=False, dashboard_host="127.0.0.1",
                 _node_ip_address="127.0.0.1", log_to_driver=verbose, logging_level=level,
                 _system_config={"worker_maximum_startup_concurrency": max(4, os.cpu_count() or 1)})
        resources = ray.cluster_resources()
        host = ray.get_runtime_context().gcs_address.rsplit(":", 1)[0]
        print(f"[{job}] started a local Ray instance on {host} ({resources.get('CPU', 0):g} CPUs, "
              f"{resources.get('GPU', 0):g} GPUs; set RAY_ADDRESS to run on a cluster)", file=sys.stderr, flush=True)
    if not verbose:  # a failing worker is one line per cause, not its whole traceback
        quiet_worker_errors(f"[{job}]")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = verbose
    ctx.print_on_execution_start = verbose
    ctx.enable_operator_progress_bars = verbose
    if not verbose:  # Ray Data's console lines, its errors' stack traces too (the session's ray-data.log keeps
        # them; the job's summary says what stopped it, in one line)
        for handler in logging.getLogger("ray.data").handlers:
            if not type(handler).__name__.endswith("FileHandler"):
                handler.setLevel(logging.CRITICAL + 1)
