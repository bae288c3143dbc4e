"""UniFilter model library: the model, its processor, checkpoints. No Ray in here."""

from model.checkpoint import load, save
from model.config import IMAGE_TOKEN_ID, UniFilterConfig, get_config, named_configs
from model.errors import CheckpointError, SampleError
from model.modeling import UniFilter, scores_from_logits
from model.processing import EncodedSample, UniFilterProcessor, decode_image, prepare_image

__all__ = [
    "IMAGE_TOKEN_ID", "CheckpointError", "EncodedSample", "SampleError", "UniFilter", "UniFilterConfig",
    "UniFilterProcessor", "decode_image", "get_config", "load", "named_configs", "prepare_image", "save",
    "scores_from_logits",
]
