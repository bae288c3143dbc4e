"""Small configs and an offline tokenizer for tests and the demo: seconds on a CPU, no downloads."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from model.tokenization import QWEN25_SPECIAL_TOKENS, wrap

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

