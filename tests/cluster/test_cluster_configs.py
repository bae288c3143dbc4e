"""Cluster configuration: the launcher YAML against Ray's own schema, the KubeRay manifests against the fields
KubeRay requires (no CRD schema is available offline; the list below is KubeRay v1's required fields), every
`ray start` they cause against `ray start`'s own parser, the token wiring, and the example job configs against the
job's own config model."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from pipeline.curation import CurateConfig
from pipeline.scoring import ScoreConfig

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"


def ray_version() -> str:
    text = (CLUSTER.parent / "constraints.txt").read_text()
    return re.search(r"^ray==([\d.]+)", text, flags=re.M).group(1)


def test_aws_launcher_config_validates_against_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    # What `ray up` does before it talks to the cloud: merge the provider's defaults, then validate against
    # ray-schema.json (raises on any violation). Neither step makes a network call.
    validate_config(prepare_config(config))


def test_aws_launcher_config_wiring():
    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}  # the head runs no tasks
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert {"cpu_worker", "gpu_l40s", "gpu_h100", "gpu_h200"} <= set(workers)
    for name, node in workers.items():
        assert node["min_workers"] == 0 and node["max_workers"] > 0, name
    for name, node in types.items():
        assert node["node_config"]["IamInstanceProfile"], f"{name} has no instance profile"
    assert workers["cpu_worker"]["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert config["provider"]["use_internal_ips"] is True
    assert config["docker"]["image"].endswith(":0.1.0")
    assert f"rayproject/ray:{ray_version()}" in (CLUSTER / "Dockerfile").read_text()


def test_no_secrets_in_cluster_files():
    pattern = re.compile(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|aws_access_key_id|BEGIN (RSA )?PRIVATE KEY", re.I)
    for path in CLUSTER.rglob("*"):
        if path.is_file():
            assert not pattern.search(path.read_text()), f"{path} looks like it holds a credential"


# KubeRay v1 (ray.io/v1): the fields its CRDs mark required, plus what an autoscaling setup needs.
def check_ray_cluster_spec(spec: dict, where: str) -> None:
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict), where
    assert head["rayStartParams"].get("num-cpus") == "0", f"{where}: the head must run no tasks"
    head_containers = head["template"]["spec"]["containers"]
    assert head_containers and all(c.get("name") and c.get("image") for c in head_containers), where
    assert spec.get("enableInTreeAutoscaling") is True, where
    assert spec.get("rayVersion") == ray_version(), where
    groups = spec["workerGroupSpecs"]
    assert {g["groupName"] for g in groups} >= {"cpu-workers", "gpu-workers"}, where
    for group in groups:
        assert isinstance(group["rayStartParams"], dict)
        assert 0 == group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
        containers = group["template"]["spec"]["containers"]
        assert containers and all(c.get("name") and c.get("image") for c in containers)
    gpu = next(g for g in groups if g["groupName"] == "gpu-workers")
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"


def load_all(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / "kuberay" / name).read_text()) if d]


def test_kuberay_raycluster():
    (cluster,) = load_all("raycluster.yaml")
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    assert cluster["metadata"]["name"]
    check_ray_cluster_spec(cluster["spec"], "raycluster.yaml")
    assert cluster["spec"]["headGroupSpec"]["serviceType"] == "ClusterIP"  # the dashboard stays in-cluster


def test_kuberay_rayjob_runs_the_scoring_job_with_a_valid_config():
    config_map, job = load_all("rayjob-score.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["spec"]["entrypoint"].startswith("python -m jobs.score --config ")
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    check_ray_cluster_spec(job["spec"]["rayClusterSpec"], "rayjob-score.yaml")
    assert config_map["kind"] == "ConfigMap"
    ScoreConfig.model_validate(yaml.safe_load(config_map["data"]["score.yaml"]))


def test_scheduled_run_is_a_cronjob_that_submits_the_job_without_overlap():
    (cron,) = load_all("cronjob-score.yaml")
    assert cron["apiVersion"] == "batch/v1" and cron["kind"] == "CronJob"
    assert len(cron["spec"]["schedule"].split()) == 5
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    command = " ".join(pod["containers"][0]["args"])
    assert "ray job submit" in command and "python -m jobs.score --config" in command
    assert command.index("python -m jobs.score") < command.index("python -m jobs.curate --config")  # then curate
    token = next(e for e in pod["containers"][0]["env"] if e["name"] == "RAY_AUTH_TOKEN")
    assert "secretKeyRef" in token["valueFrom"]


def test_example_job_configs_are_valid():
    config = ScoreConfig.model_validate(yaml.safe_load((CLUSTER / "score-job.yaml").read_text()))
    assert config.min_actors <= config.concurrency and config.no_progress_timeout_s >= 600
    curate = CurateConfig.model_validate(yaml.safe_load((CLUSTER / "curate-job.yaml").read_text()))
    assert curate.min_score is not None and curate.keep_fraction is None  # incremental nightly runs need a fixed cut


def test_the_schema_check_rejects_a_broken_launcher_config():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    config["available_node_types"]["gpu_l40s"]["max_workers"] = "lots"
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        validate_config(prepare_config(config))


# -- every `ray start` the cluster files cause, parsed by `ray start` itself ------------------------------------------
# KubeRay writes `rayStartParams` as flags (its convertParamMap): "true" -> a bare `--key`, "false" -> nothing (both
# only for options outside this list, which take an explicit value), anything else -> `--key=value`.
KUBERAY_EXPLICIT_BOOLEAN_OPTIONS = {"log-color", "include-dashboard", "include-log-monitor"}


def kuberay_start_flags(params: dict[str, str]) -> list[str]:
    flags = []
    for key, value in sorted(params.items()):
        if value.lower() in ("true", "false") and key not in KUBERAY_EXPLICIT_BOOLEAN_OPTIONS:
            flags += [f"--{key}"] if value.lower() == "true" else []
        else:
            flags.append(f"--{key}={value}")
    return flags


def ray_start_params_in(node, where: str):
    """(where, rayStartParams) for every group of every manifest, however deeply the spec nests it."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "rayStartParams":
                yield where, value
            else:
                yield from ray_start_params_in(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from ray_start_params_in(item, f"{where}[{i}]")


def ray_start_commands(command: str) -> list[list[str]]:
    """The arguments of each `ray start` in a shell command line (`a; b && ray start ...`)."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True  # split at blanks and operators only: `$RAY_HEAD_IP:6379` stays one word
    words, found = list(lexer), []
    for i in range(len(words) - 1):
        if words[i:i + 2] == ["ray", "start"]:
            args = []
            for word in words[i + 2:]:
                if set(word) <= set(";&|"):
                    break
                args.append(word)
            found.append(args)
    return found


def test_every_ray_start_the_cluster_files_cause_parses_with_ray_starts_own_options():
    import click
    from ray.scripts.scripts import start

    invocations = []
    for path in sorted((CLUSTER / "kuberay").glob("*.yaml")):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            for where, params in ray_start_params_in(doc, f"{path.name}[{i}]"):
                invocations.append((where, kuberay_start_flags(params)))
    launcher = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for command in launcher[key]:
            invocations += [(f"aws.yaml {key}", args) for args in ray_start_commands(command)]
    assert sum(w.startswith("aws.yaml") for w, _ in invocations) == 2 and len(invocations) >= 8
    for where, args in invocations:
        try:
            start.make_context("ray start", list(args))
        except click.UsageError as e:
            pytest.fail(f"{where}: `ray start {' '.join(args)}` is refused: {e.format_message()}")


# -- token authentication: one Secret for every KubeRay cluster and client; the launcher's file on every node ------
TOKEN_SECRET = {"name": "unifilter-ray-token", "key": "auth_token"}  # KubeRay reads the key `auth_token`


def ray_cluster_specs() -> list[tuple[str, dict]]:
    (cluster,) = load_all("raycluster.yaml")
    _, job = load_all("rayjob-score.yaml")
    return [("raycluster.yaml", cluster["spec"]), ("rayjob-score.yaml", job["spec"]["rayClusterSpec"])]


def test_every_kuberay_cluster_and_the_cronjob_use_the_one_token_secret():
    for where, spec in ray_cluster_specs():
        assert spec.get("authOptions") == {"mode": "token", "secretName": TOKEN_SECRET["name"]}, where
    (cron,) = load_all("cronjob-score.yaml")
    env = {e["name"]: e for e in cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"  # without it the client sends no token at all
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == TOKEN_SECRET


def test_the_launcher_runs_every_node_in_token_mode_with_the_token_file():
    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    # The container's environment reaches every process in it: ray start on the head and on every worker, the
    # autoscaler, the jobs' drivers.
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"  # node <- the `ray up` machine
