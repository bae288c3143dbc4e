"""Run by `test_placement.py` in its own process: a two-node Ray cluster on 127.0.0.1 (`ray.cluster_utils`), one
node advertising `reader_node`, the other `stand_in_gpu` (the resource a GPU scoring actor asks for); a scoring
job whose read stage asks for the first and whose scoring stage asks for the second. Each stage's actors write
down the node they run on. Prints one JSON line: the nodes, where each stage ran, and the job's summary.

    python -m tests.pipeline.scoring.two_nodes INPUT OUTPUT MODEL WHERE_DIR
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def _noted(stage_class, where: str):
    """`stage_class` whose actors write their node id into `where` at set-up."""

    class Noted(stage_class):
        def setup(self):
            import ray

            super().setup()
            node = ray.get_runtime_context().get_node_id()
            Path(where, f"{stage_class.__name__}-{os.getpid()}").write_text(node)

    Noted.__name__ = stage_class.__name__
    return Noted


def main(input_uri: str, output: str, model: str, where: str) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from pipeline.runner import run_job
    from pipeline.scoring import ScoreConfig, ScoringJob

    class PinnedScoring(ScoringJob):
        def resources(self, view):
            plan = super().resources(view)
            read, score = plan.stages["read"], plan.stages["score"]
            return replace(plan, stages={"read": replace(read, num_cpus=0.5, custom={"reader_node": 1}),
                                         "score": replace(score, num_cpus=1, custom={"stand_in_gpu": 1})})

        def stages(self, plan):
            stages = super().stages(plan)
            for stage in stages:
                stage.__class__ = _noted(type(stage), where)
            return stages

    node = {"node_ip_address": "127.0.0.1", "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"reader_node": 4}, **node})
    try:
        scorer_node = cluster.add_node(num_cpus=2, resources={"stand_in_gpu": 1}, **node)
        ray.init(address=cluster.address, log_to_driver=False)
        nodes = {"head": cluster.head_node.node_id, "scorer": scorer_node.node_id}
        job = PinnedScoring(ScoreConfig(input=input_uri, format="webdataset", output=output, model=model,
                                        gpus_per_actor=0))
        summary = run_job(job, progress=False)
        ran = {f.name: f.read_text() for f in Path(where).iterdir()}
        print(json.dumps({"nodes": nodes, "ran": ran, "summary": summary}))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:5])
