"""The compiled scoring path in the GPU machine's twin (its Python 3.12, torch 2.11 and transformers 5.17, with only
the wheels that travel there; `tests/support/gpu_twin.py`): there transformers builds an explicit (B, 1, L, L)
mask when the language model is compiled, and ours has none; every micro-batch size reuses the warm-up's graphs
and scores as eager does. One process in the twin traces and sweeps (starting one costs more than either); each
test reads its part. Skipped, saying why, where the twin is absent."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.support.gpu_twin import REPO_ROOT, twin_or_skip


def in_twin(twin, script: str) -> dict:
    python, env = twin
    done = subprocess.run([python, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


TINY = """
import json
import numpy as np
import torch
from model.checkpoint import build, config_and_tokenizer

def tiny():
    torch.manual_seed(0)
    return build(*config_and_tokenizer("tiny"))

def captions(processor, n):
    grey = np.full((3, 98, 98), 127, np.uint8)
    return [processor.encode([None, "a red square beside a blue circle " * (1 + k % 5)], [grey, None], "caption")
            for k in range(n)]

def documents(processor, n):
    grey = np.full((3, 98, 98), 127, np.uint8)
    out = []
    for k in range(n):
        texts, images = [], []
        for p in range(1 + k % 3):
            texts += [f"paragraph {p} " + "about shapes " * (10 + 3 * k), None]
            images += [None, grey]
        out.append(processor.encode(texts, images, "interleaved"))
    return out
"""


# After the warm-up, micro-batch sizes of each class it compiles for: captions of one row, of two rows (the smallest
# dynamic batch), an odd size between and the token budget's largest (16), and documents (several images a row,
# longer rows). With static shapes, or a guard on the size, a size the warm-up did not run compiles again: these
# show none does. Then, on fresh caches (no automatic-dynamic state carried over), transformers' attention and ours.
SWEEP_AND_TRACE = """
from pipeline.scoring.compiled import compile_scorer, traced_attention
from pipeline.scoring.scorer import BatchScorer
net, processor = tiny()
encoded = {"caption": captions(processor, 16), "interleaved": documents(processor, 6)}
scorer = BatchScorer(net, processor, token_budget=16 * max(e.n_tokens for e in encoded["caption"]), max_batch=16,
                     overlap=False)
compiled = compile_scorer(scorer, backend="aot_eager")
worst = 0.0
for kind, sizes in (("caption", (1, 2, 7, 16)), ("interleaved", (6,))):
    for size in sizes:
        batch = processor.collate(encoded[kind][:size])
        got = compiled(**batch)["score"]
        worst = max(worst, float((got - net.score(**batch)["score"]).abs().max()))
sweep = {"warm": compiled.warm_graphs, "recompiles": compiled.recompiles, "worst": worst, "torch": torch.__version__}
torch._dynamo.reset()
net, processor = tiny()
batch = processor.collate(captions(processor, 3))
control = traced_attention(net, batch, causal_sdpa=False)
ours = traced_attention(tiny()[0], batch)
print(json.dumps({**sweep, "control": control, "ours": ours}))
"""


@pytest.fixture(scope="module")
def in_the_twin(tmp_path_factory) -> dict:
    """What one process in the twin found: a sweep of micro-batch sizes through the compiled forward after the
    warm-up, and the compiled language model's attention traced (transformers' own and ours) on 3 captions."""
    return in_twin(twin_or_skip(tmp_path_factory.mktemp("twin-site")), TINY + SWEEP_AND_TRACE)


def test_in_the_twin_the_compiled_language_model_has_no_mask_where_transformers_would_build_one(in_the_twin):
    control, ours = in_the_twin["control"], in_the_twin["ours"]
    length = control["length"]
    assert [3, 1, length, length] in control["square_tensors"]  # transformers' own: an explicit causal mask
    assert control["causal_without_mask"] < control["sdpa_calls"]
    assert ours["sdpa_calls"] == control["sdpa_calls"] == ours["causal_without_mask"]
    assert ours["square_tensors"] == []


def test_in_the_twin_every_micro_batch_size_reuses_the_warm_ups_graphs_and_scores_as_eager(in_the_twin):
    assert in_the_twin["torch"].startswith("2.11.0")
    assert in_the_twin["warm"] >= 3 and in_the_twin["recompiles"] == 0
    assert in_the_twin["worst"] < 1e-5
