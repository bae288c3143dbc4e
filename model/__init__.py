"""UniFilter model library: the model, its processor, checkpoints. No Ray in here.

Names are imported on first use, so `model.errors` or `model.storage` never pull in torch and transformers (a
job's command line and a CPU worker start seconds faster)."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "load": "model.checkpoint", "save": "model.checkpoint",
    "IMAGE_TOKEN_ID": "model.config", "UniFilterConfig": "model.config", "get_config": "model.config",
    "named_configs": "model.config",
    "CheckpointError": "model.errors", "SampleError": "model.errors", "ImageDecoding": "model.limits",
    "UniFilter": "model.modeling", "scores_from_logits": "model.modeling",
    "EncodedSample": "model.processing", "UniFilterProcessor": "model.processing", "decode_image": "model.processing",
    "prepare_image": "model.processing",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'model' has no attribute {name!r}")
