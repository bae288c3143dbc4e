"""Where the tiny offline tokenizer used to live; it is in `model.tokenization` now (the tiny config is
`model/configs/tiny.json`). Kept so existing imports work."""

from model.tokenization import TINY_VOCAB, tiny_tokenizer

__all__ = ["TINY_VOCAB", "tiny_tokenizer"]
