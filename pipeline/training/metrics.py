"""Validation metrics of a training run: accuracy per kind and level, MAE, Spearman, the confusion matrix."""

from __future__ import annotations

import math

import numpy as np

from model.config import NUM_LEVELS


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0  # ties share their average rank
        i = j + 1
    return ranks


def spearman(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 2:
        return float("nan")
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denom) if denom else float("nan")


def validation_metrics(scores, predicted, labels, kinds) -> dict:
    """Accuracy overall, per kind and per level; MAE of the score; Spearman of score vs level; confusion matrix
    (rows: true level, columns: predicted level)."""
    scores, predicted, labels = np.asarray(scores, float), np.asarray(predicted, int), np.asarray(labels, int)
    kinds = np.asarray(kinds)
    metrics = {"val_samples": int(len(labels))}
    if not len(labels):
        return {**metrics, "val_accuracy": -1.0}
    correct = predicted == labels
    metrics["val_accuracy"] = float(correct.mean())
    for kind in ("caption", "interleaved"):
        mask = kinds == kind
        metrics[f"val_accuracy_{kind}"] = float(correct[mask].mean()) if mask.any() else None
        metrics[f"val_spearman_{kind}"] = spearman(scores[mask], labels[mask]) if mask.sum() > 1 else None
    for level in range(NUM_LEVELS):
        mask = labels == level
        metrics[f"val_accuracy_level_{level}"] = float(correct[mask].mean()) if mask.any() else None
    metrics["val_mae"] = float(np.abs(scores - labels).mean())
    metrics["val_spearman"] = spearman(scores, labels)
    confusion = np.zeros((NUM_LEVELS, NUM_LEVELS), dtype=int)
    np.add.at(confusion, (labels.clip(0, NUM_LEVELS - 1), predicted.clip(0, NUM_LEVELS - 1)), 1)
    metrics["val_confusion"] = confusion.tolist()
    return metrics


def format_epoch(m: dict) -> str:
    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"

    return (f"[train] epoch {m['epoch']}/{m['epochs']} · step {m['step']} · train loss {m['train_loss']:.4f} · "
            f"train acc {pct(m['train_accuracy'])} · val acc {pct(m['val_accuracy'])} (caption "
            f"{pct(m.get('val_accuracy_caption'))}, interleaved {pct(m.get('val_accuracy_interleaved'))}) · "
            f"MAE {m.get('val_mae', float('nan')):.3f} · Spearman {m.get('val_spearman', float('nan')):.3f} · "
            f"{m['samples_per_s']:.1f} samples/s")
