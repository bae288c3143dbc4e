"""Configuration at the edge: a YAML file (`--config FILE.yaml`) overlaid with flags, validated by a pydantic
model. Every field is a flag (`--gpus-per-actor`); nested fields use a dash (`--source-image-column`). Unknown or
invalid fields fail fast with a message naming the field."""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError


class ConfigError(SystemExit):
    def __init__(self, message: str):
        print(f"error: {message}", file=sys.stderr)
        super().__init__(2)


@contextmanager
def input_errors_exit_2():
    """An input that turns out unusable once the job looks at it (nothing at a URI, no shards, no checkpoint) ends
    the job like a bad flag: one line naming the field and exit status 2, not a traceback."""
    from model.errors import ConfigFieldError

    try:
        yield
    except ConfigFieldError as err:
        raise ConfigError(str(err)) from None


def _flag_fields(model: type[BaseModel], prefix: tuple[str, ...] = ()):
    for name, field in model.model_fields.items():
        name = field.alias or name  # e.g. `model_config`, a name pydantic reserves for itself
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _flag_fields(annotation, (*prefix, name))
        else:
            yield (*prefix, name), field


def parse_config(model: type[BaseModel], argv: list[str] | None, prog: str, description: str) -> BaseModel:
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", help="YAML file with any of the fields below (flags override it)")
    dests = {}
    for path, field in _flag_fields(model):
        flag = "--" + "-".join(p.replace("_", "-") for p in path)
        dest = "__".join(path)
        dests[dest] = path
        annotation = field.annotation
        if annotation is bool or annotation == (bool | None):
            parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None,
                                help=field.description)
        else:
            literal = [a for a in (annotation, *get_args(annotation)) if get_origin(a) is Literal]
            choices = get_args(literal[0]) if literal else None
            as_int = bool(choices) and all(isinstance(c, int) for c in choices)  # e.g. num_labels: 1 | 4
            parser.add_argument(flag, dest=dest, default=None, help=field.description, type=int if as_int else None,
                                metavar=("|".join(map(str, choices)) if choices else None))
    args = parser.parse_args(argv)

    values: dict[str, Any] = {}
    if args.config:
        try:
            with open(args.config) as f:
                loaded = yaml.safe_load(f) or {}
        except OSError as err:
            raise ConfigError(f"cannot read config file {args.config}: {err.strerror}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {args.config} is not valid YAML: {err}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {args.config} must hold a mapping of fields")
        values.update(loaded)
    for dest, path in dests.items():
        value = getattr(args, dest)
        if value is None:
            continue
        target = values
        for part in path[:-1]:
            target = target.setdefault(part, {})
        target[path[-1]] = value
    try:
        return model.model_validate(values)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            field = ".".join(str(p) for p in e["loc"]) or "(config)"
            if e["type"] == "extra_forbidden":
                problems.append(f"field '{field}': unknown field")
            elif e["type"] == "missing":
                problems.append(f"field '{field}': required (set it in the YAML file or as a flag)")
            else:
                problems.append(f"field '{field}': {e['msg']} (got {e.get('input')!r})")
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None


def connect_ray() -> None:
    """The cluster in RAY_ADDRESS, or a local instance bound to loopback (no dashboard)."""
    import os

    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        # address="local": always this job's own instance, even when other Ray instances run on this host (which
        # ray.init() would otherwise try to join, or refuse with "Found multiple active Ray instances").
        ray.init(address="local", include_dashboard=False, dashboard_host="127.0.0.1",
                 _node_ip_address="127.0.0.1", log_to_driver=True)
