"""Configuration at the edge and the one way a job's command ends: a YAML file (`--config FILE.yaml`) overlaid with
flags, validated by a pydantic model. Every field is a flag (`--gpus-per-actor`) and a YAML key of the same name
with underscores (`gpus_per_actor:`); nested fields too (`--source-image-column`, `source_image_column:`; the nested
form `source: {image_column: ...}` is accepted as well). `--help` shows each field's real default. Unknown or
invalid fields fail fast with a message naming the field. `entry` prints errors (only here) and maps them to exit
statuses: 2 for configuration, 1 for a run that did not finish."""

from __future__ import annotations

import argparse
import difflib
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticUndefined

from pipeline.errors import ConfigError, ConfigFieldError, UniFilterError


@dataclass
class Invocation:
    """A parsed command line: the validated config, where each field's value came from, and the run-only flags."""

    config: BaseModel
    sources: dict[str, str] = field(default_factory=dict)  # "gpus_per_actor" -> "flag" | "config file" | "default"
    dry_run: bool = False
    verbose: bool = False


@dataclass(frozen=True)
class Command:
    """How a job's command line names and describes itself: `module` (jobs.score), its docstring (the first
    paragraph is the description) and what its `--dry-run` does."""

    module: str
    doc: str
    dry_run: str

    @property
    def prog(self) -> str:
        """The name the user typed: a console script's own (unifilter-score), else `python -m jobs.score`."""
        script = os.path.basename(sys.argv[0] if sys.argv else "")
        return script if script.startswith("unifilter-") else f"python -m {self.module}"

    @property
    def description(self) -> str:
        return " ".join(self.doc.split("\n\n")[0].split())


class _Parser(argparse.ArgumentParser):
    """Refuses a bad command line in two lines, with the flag an unknown one resembles, not the whole usage."""

    def error(self, message: str):
        unknown = message.removeprefix("unrecognized arguments: ").split() if message.startswith("unrecognized") \
            else []
        flags = [f for f in self._option_string_actions if f.startswith("--")]
        hints = [f"{word} -> {close[0]}" for word in unknown
                 if (close := difflib.get_close_matches(word.split("=", 1)[0], flags, n=1, cutoff=0.6))]
        hint = f" (did you mean: {', '.join(hints)}?)" if hints else ""
        self.exit(2, f"{self.prog}: error: {message}{hint}\n{self.prog} --help lists every flag\n")


def _flag_fields(model: type[BaseModel], prefix: tuple[str, ...] = ()):
    for name, info in model.model_fields.items():
        name = info.alias or name  # e.g. `model_config`, a name pydantic reserves for itself
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _flag_fields(annotation, (*prefix, name))
        else:
            yield (*prefix, name), info


def default_of(info) -> Any:
    """A field's real default (its factory's value too); PydanticUndefined for a required field."""
    if info.default_factory is not None:
        return info.default_factory()
    return info.default


def _help(info) -> str:
    text = info.description or ""
    default = default_of(info)
    if default is PydanticUndefined:
        return f"{text} (required)".strip()
    if default is None:
        # a None default means "decided at run time": the description says how; say so when it does not
        return text if "default" in text.lower() else f"{text} (default: none)".strip()
    shown = str(default).lower() if isinstance(default, bool) else default
    return f"{text} (default: {shown})".strip()


_URI_FIELDS = {"input", "output", "model", "scores", "train", "val", "init", "storage", "report", "endpoint"}


def _metavar(name: str, annotation, choices) -> str | None:
    if choices:
        return "|".join(map(str, choices))
    if name in _URI_FIELDS:
        return "URI"
    args = [a for a in (annotation, *get_args(annotation)) if a is not type(None)]
    if int in args:
        return "N"
    if float in args:
        return "X"
    if list in [get_origin(a) for a in args]:
        return "A,B,..."
    return "VALUE"


def build_parser(model: type[BaseModel], prog: str, description: str, dry_run: str | None = None):
    """The job's parser: `--config`, `--dry-run` (when the job has one: `dry_run` says what it does), `--verbose` and
    one flag per field."""
    parser = _Parser(prog=prog, description=description)
    paths = [path for path, _ in _flag_fields(model)]
    example = next((p for p in paths if len(p) > 1), None) or next(p for p in paths if "_" in p[-1])
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file with any of the fields below, each keyed "
                                                              "by its flag's name with underscores "
                                                              f"({'_'.join(example)}: for --"
                                                              f"{'-'.join(example).replace('_', '-')}); flags "
                                                              "override it")
    if dry_run:
        parser.add_argument("--dry-run", action="store_true", help=dry_run)
    parser.add_argument("--verbose", action="store_true", help="show Ray's own progress and logs")
    dests = {}
    for path, info in _flag_fields(model):
        flag = "--" + "-".join(p.replace("_", "-") for p in path)
        dest = "__".join(path)
        dests[dest] = path
        annotation = info.annotation
        if annotation is bool or annotation == (bool | None):
            parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None,
                                help=_help(info))
            continue
        literal = [a for a in (annotation, *get_args(annotation)) if get_origin(a) is Literal]
        choices = get_args(literal[0]) if literal else None
        as_int = bool(choices) and all(isinstance(c, int) for c in choices)  # e.g. num_labels: 1 | 4
        is_list = list in [get_origin(a) for a in (annotation, *get_args(annotation))]
        # a list's flag may be repeated, each adding its comma-separated values (`--exclude a --exclude b`)
        parser.add_argument(flag, dest=dest, default=None, help=_help(info), action="extend" if is_list else None,
                            type=(int if as_int else (lambda v: v.split(",")) if is_list else None),
                            metavar=_metavar(path[-1], annotation, choices))
    return parser, dests


def parse(model: type[BaseModel], argv: list[str] | None, command: Command) -> Invocation:
    parser, dests = build_parser(model, command.prog, command.description, command.dry_run)
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
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
        values, sources = _config_file_values(args.config, loaded, list(dests.values()))
    for dest, path in dests.items():
        value = getattr(args, dest)
        if value is None:
            continue
        target = values
        for part in path[:-1]:
            target = target.setdefault(part, {})
        target[path[-1]] = value
        sources[".".join(path)] = "flag"
    try:
        config = model.model_validate(values)
    except ValidationError as err:
        problems = []
        flat = {path: "_".join(path) for path in dests.values()}
        for e in err.errors():
            name = flat.get(tuple(e["loc"])) or ".".join(str(p) for p in e["loc"]) or "(config)"
            if e["type"] == "extra_forbidden":
                close = difflib.get_close_matches(name, list(flat.values()), n=1)
                problems.append(f"field '{name}': unknown field" + (f" (did you mean {close[0]}?)" if close else ""))
            elif e["type"] == "missing":
                problems.append(f"field '{name}': required (set it in the YAML file or as a flag)")
            elif name == "(config)":
                problems.append(e["msg"].removeprefix("Value error, "))
            else:
                problems.append(f"field '{name}': {e['msg']} (got {e.get('input')!r})")
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None
    return Invocation(config, sources, getattr(args, "dry_run", False), args.verbose)


def _config_file_values(file: str, loaded: dict, paths: list[tuple[str, ...]]) -> tuple[dict, dict[str, str]]:
    """A config file's keys placed where the model holds them: a flag's name with underscores
    (`source_image_column:`), or nested (`source: {image_column: ...}`); the same field set both ways is refused
    naming the flat key. Returns the values and, per field set, "config file"."""
    flat = {"_".join(path): path for path in paths if len(path) > 1}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    nested = {k: v for k, v in loaded.items() if k not in flat}
    for key, value in nested.items():
        values[key] = dict(value) if isinstance(value, dict) else value
        sources[key] = "config file"
        if isinstance(value, dict):
            sources.update({f"{key}.{inner}": "config file" for inner in value})
    for key, value in loaded.items():
        path = flat.get(key)
        if path is None:
            continue
        target = values
        for part in path[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"invalid configuration: field '{key}': {file} also sets '{part}' to a value "
                                  f"that is not a mapping; write {key}: alone")
        if path[-1] in target:
            raise ConfigError(f"invalid configuration: field '{key}': {file} sets it twice, as {key}: and nested "
                              f"under {'.'.join(path[:-1])}:; keep {key}:")
        target[path[-1]] = value
        sources[".".join(path)] = "config file"
    return values, sources


def entry(run: Callable[[], int], argv: list[str] | None = None) -> int:
    """Run a job's main; errors are printed here, one line each (after their traceback with `--verbose` in
    `argv`, the command line by default): 2 for configuration (a state file of the output that cannot be read
    too), 1 for a failed run."""
    verbose = "--verbose" in (sys.argv[1:] if argv is None else argv)
    try:
        return run()
    except (ConfigError, ConfigFieldError) as err:
        _report(err, verbose)
        return 2
    except UniFilterError as err:
        _report(err, verbose)
        return 1
    except KeyboardInterrupt as err:  # before the run started, or while it was ending: nothing half-committed
        # on a line of its own (the terminal shows ^C where the cursor was), with what it means for the output
        print("\n" + (str(err) or "interrupted (Ctrl-C) before the run started or while it ended: nothing "
                                   "half-written; the same command starts again"), file=sys.stderr)
        return 130


def _report(err: Exception, verbose: bool) -> None:
    if verbose:
        traceback.print_exception(err, file=sys.stderr)
    print(f"error: {err}", file=sys.stderr)


def run_command(config_class: type[BaseModel], make_job: Callable, argv: list[str] | None, command: Command,
                report: Callable | None = None, check: Callable[[Invocation], None] | None = None) -> int:
    """A shard job's whole command line: parse its config (before the job's modules load, so a bad flag is said at
    once), `check` what the config alone cannot (a setting that only means something in a dry run), say what a dry
    run would do, or run it (connecting to Ray only when there is work) and print its summary; the exit status
    says how it ended. `report(job, summary)` may print more lines after the summary."""
    import time

    started = time.time()
    invocation = parse(config_class, argv, command)
    if check is not None:
        check(invocation)
    from pipeline.runner import dry_run, exit_status, format_summary, run_job

    job = make_job(invocation.config, invocation.sources)
    if invocation.dry_run:
        print(dry_run(job))
        return 0
    summary = run_job(job, verbose=invocation.verbose, started=started)
    print(format_summary(job, summary))
    if report is not None:
        report(job, summary)
    return exit_status(summary)
