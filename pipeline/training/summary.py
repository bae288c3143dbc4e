"""The one-screen summary `python -m jobs.train` prints at the end."""

from __future__ import annotations

import json

from model.config import NUM_LEVELS
from pipeline.training.config import TrainConfig


def format_summary(summary: dict) -> str:
    m = summary["best_metrics"]
    lines = [
        f"UniFilter training: {summary['train']} -> {summary['best']}",
        f"  pairs      {summary['train_pairs']} training · {plural(summary['epochs'], 'epoch')} · "
        f"{plural(summary['total_steps'], 'step')}"
        f" · {summary['elapsed_s']} s",
        f"  best       epoch {m.get('epoch')} · val acc {m.get('val_accuracy'):.3f}"
        f" · MAE {m.get('val_mae', float('nan')):.3f}"
        f" · Spearman {m.get('val_spearman', float('nan')):.3f}",
    ]
    for kind in ("caption", "interleaved"):
        if m.get(f"val_accuracy_{kind}") is not None:
            lines.append(f"  {kind:10s} val acc {m[f'val_accuracy_{kind}']:.3f} · Spearman "
                         f"{m.get(f'val_spearman_{kind}') or float('nan'):.3f}")
    levels = [m.get(f"val_accuracy_level_{lv}") for lv in range(NUM_LEVELS)]
    lines.append("  per level  " + " · ".join(f"L{lv} {'n/a' if a is None else f'{a:.3f}'}"
                                              for lv, a in enumerate(levels)))
    if m.get("val_confusion"):
        lines.append("  confusion  (rows: true level, columns: predicted) " + json.dumps(m["val_confusion"]))
    lines.append(f"  score it:  python -m jobs.score --model {summary['best']} ...")
    return "\n".join(lines)


def dry_run_plan(config: TrainConfig) -> str:
    """What a run would do: pairs, steps, the base model, resources, the resume point. Starts nothing; refuses what
    the run would refuse before Ray starts (`preflight`)."""
    import math
    import os

    from pipeline.training.driver import fit_workers
    from pipeline.training.preflight import check_before_start

    checked = check_before_start(config)
    counts, found = checked.pairs, checked.resume
    per_step = config.batch_size * config.workers * config.grad_accum
    steps = config.epochs * math.ceil((counts["train"] or 0) / per_step)
    if config.max_steps:
        steps = min(steps, config.max_steps)
    local = not os.environ.get("RAY_ADDRESS")
    cpus = fit_workers(config, float(os.cpu_count() or 1), local) if local else config.cpus_per_worker or 1.0
    base = config.init or f"a new {config.architecture} model (written to OUTPUT/_base)"
    resume = ("finished: a run does nothing (another --name trains again)" if checked.finished else
              f"from step {found[1]['step']} ({found[0]})" if found else "nothing to resume")
    return "\n".join([
        f"UniFilter training, dry run (nothing started, nothing written): {config.train} -> {config.output}",
        f"  pairs      {counts['train']} training · {counts['val']} validation",
        f"  steps      {steps} ({plural(config.epochs, 'epoch')} of {per_step} pairs a step)",
        f"  model      {base} · head of {config.num_labels or 1} output(s)",
        f"  workers    {config.workers} x {cpus:g} CPUs{' (fitted to this machine)' if local else ''}"
        f"{' + GPU' if config.use_gpu else ''}",
        f"  resume     {resume} · storage {config.storage_uri}, run name {config.name!r}",
    ])


def finished_lines(summary: dict) -> str:
    """What a rerun of a finished run says, at once: that it finished, and its summary."""
    return "\n".join([f"UniFilter training: run {summary['name']!r} in {summary['storage']} already finished "
                      f"({plural(summary['epochs'], 'epoch')}); nothing to do (another --name, or more --epochs, "
                      "trains again)", format_summary(summary)])


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
