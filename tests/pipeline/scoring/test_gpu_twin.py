"""The compiled scoring path in the GPU machine's twin (its Python 3.12, torch 2.11 and transformers 5.17, with only
the wheels that travel there; `tests/support/gpu_twin.py`): there transformers builds an explicit (B, 1, L, L)
mask when the language model is compiled, and ours has none; every micro-batch size reuses the warm-up's graphs
and scores as eager does. Skipped, saying why, where the twin is absent."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.support.gpu_twin import REPO_ROOT, twin_or_skip


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    return twin_or_skip(tmp_path_factory.mktemp("twin-site"))


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


def test_in_the_twin_the_compiled_language_model_has_no_mask_where_transformers_would_build_one(twin):
    traced = in_twin(twin, TINY + """
from pipeline.scoring.compiled import traced_attention
net, processor = tiny()
batch = processor.collate(captions(processor, 3))
control = traced_attention(net, batch, causal_sdpa=False)
ours = traced_attention(tiny()[0], batch)
print(json.dumps({"control": control, "ours": ours, "rows": 3}))
""")
    control, ours = traced["control"], traced["ours"]
    length = control["length"]
    assert [3, 1, length, length] in control["square_tensors"]  # transformers' own: an explicit causal mask
    assert control["causal_without_mask"] < control["sdpa_calls"]
    assert ours["sdpa_calls"] == control["sdpa_calls"] == ours["causal_without_mask"]
    assert ours["square_tensors"] == []


def test_in_the_twin_every_micro_batch_size_reuses_the_warm_ups_graphs_and_scores_as_eager(twin):
    swept = in_twin(twin, TINY + """
from pipeline.scoring.compiled import compile_scorer
from pipeline.scoring.scorer import BatchScorer
net, processor = tiny()
encoded = {"caption": captions(processor, 16), "interleaved": documents(processor, 6)}
scorer = BatchScorer(net, processor, token_budget=16 * max(e.n_tokens for e in encoded["caption"]), max_batch=16,
                     overlap=False)
compiled = compile_scorer(scorer, backend="aot_eager")
worst = 0.0
for kind, largest in (("caption", 16), ("interleaved", 6)):
    for size in range(1, largest + 1):
        batch = processor.collate(encoded[kind][:size])
        got = compiled(**batch)["score"]
        worst = max(worst, float((got - net.score(**batch)["score"]).abs().max()))
print(json.dumps({"warm": compiled.warm_graphs, "recompiles": compiled.recompiles, "worst": worst,
                  "torch": torch.__version__}))
""")
    assert swept["torch"].startswith("2.11.0")
    assert swept["warm"] >= 3 and swept["recompiles"] == 0
    assert swept["worst"] < 1e-5
