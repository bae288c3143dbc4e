"""The one-screen summary `python -m jobs.train` prints at the end."""

from __future__ import annotations

import json

from model.config import NUM_LEVELS


def format_summary(summary: dict) -> str:
    m = summary["best_metrics"]
    lines = [
        f"UniFilter training: {summary['train']} -> {summary['best']}",
        f"  pairs      {summary['train_pairs']} training · {summary['epochs']} epochs · {summary['total_steps']} steps"
        f" · {summary['elapsed_s']} s",
        f"  best       epoch {m.get('epoch')} · val acc {m.get('val_accuracy'):.3f} · MAE {m.get('val_mae', float('nan')):.3f}"
        f" · Spearman {m.get('val_spearman', float('nan')):.3f}",
    ]
    for kind in ("caption", "interleaved"):
        if m.get(f"val_accuracy_{kind}") is not None:
            lines.append(f"  {kind:10s} val acc {m[f'val_accuracy_{kind}']:.3f} · Spearman "
                         f"{m.get(f'val_spearman_{kind}') or float('nan'):.3f}")
    levels = [m.get(f"val_accuracy_level_{lv}") for lv in range(NUM_LEVELS)]
    lines.append("  per level  " + " · ".join(f"L{lv} {'n/a' if a is None else f'{a:.3f}'}" for lv, a in enumerate(levels)))
    if m.get("val_confusion"):
        lines.append("  confusion  (rows: true level, columns: predicted) " + json.dumps(m["val_confusion"]))
    lines.append(f"  score it:  python -m jobs.score --model {summary['best']} ...")
    return "\n".join(lines)
