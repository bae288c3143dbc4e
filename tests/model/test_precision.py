"""bf16 scoring keeps what training keeps in fp32: Qwen2's rotary frequencies (long documents) and the score head
(a bf16 regression head has only 65 values between 2 and 3)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import model
from model.checkpoint import build
from model.config import UniFilterConfig, get_config
from model.tokenization import tiny_tokenizer
from tests.support.images import jpeg_bytes

WORDS = "the red circle is next to a blue square in the picture and the text explains why it matters".split()
# Stated tolerances, bf16 model vs the same weights in fp32, on ~2,050-token documents scoring -0.5 to -1 (observed
# on a 2-core x86 CPU: cosine of the pooled states >= 0.9995, |score diff| <= 0.03; with inv_freq rounded to bf16,
# as a plain `.to(bfloat16)` used to do, the cosine falls to 0.88 and score differences reach 0.42).
MIN_COSINE = 0.999
MAX_SCORE_DIFF = 0.08


def rope_config(tokenizer) -> UniFilterConfig:
    """qwen2.5-0.5b's rotary setup (head_dim 64 = 896 / 14, rope_theta 1e6, 32768 positions) in a 2-layer LLM
    narrow enough to run a 2,000-token document in seconds: only the width, depth and vocabulary shrink, and
    rotary frequencies depend on none of them. The tiny config's vision tower."""
    real = get_config("qwen2.5-0.5b").text
    text = {**real, "hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1,
            "intermediate_size": 256, "num_hidden_layers": 2, "vocab_size": 1024}
    assert text["hidden_size"] // text["num_attention_heads"] == real["hidden_size"] // real["num_attention_heads"]
    return UniFilterConfig(name="rope-0.5b", vision=get_config("tiny").vision, text=text, pool_size=3,
                           max_tokens=4096, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def long_document(seed: int, n_images: int = 6, words_per_text: int = 260) -> dict:
    g = torch.Generator().manual_seed(seed)
    texts, images = [], []
    for i in range(n_images):
        picks = torch.randint(len(WORDS), (words_per_text,), generator=g)
        texts += [" ".join(WORDS[int(j)] for j in picks), None]
        images += [None, jpeg_bytes(["red", "blue", "green"][i % 3], (60 + 7 * seed, 80))]
    return {"texts": texts, "images": images, "kind": "interleaved"}


@pytest.fixture(scope="module")
def rope_model():
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    net, processor = build(rope_config(tokenizer), tokenizer)
    # Sharpen attention as training does: at the init std of 0.02 attention is near uniform over 2,000 tokens
    # and positions barely matter, so no rotary error could show.
    with torch.no_grad():
        for layer in net.llm.layers:
            layer.self_attn.q_proj.weight.mul_(10)
            layer.self_attn.k_proj.weight.mul_(10)
    return net, processor


def pooled_and_scores(net, batch) -> tuple[torch.Tensor, torch.Tensor]:
    seen = {}
    hook = net.score_head.register_forward_hook(lambda module, inputs, output: seen.update(pooled=inputs[0]))
    try:
        with torch.no_grad():
            scores = net(**batch)[:, 0]
    finally:
        hook.remove()
    return seen["pooled"], scores


def test_bf16_scores_a_long_document_like_fp32(rope_model):
    net, processor = rope_model
    batch = processor([long_document(seed) for seed in range(4)])
    assert batch["attention_mask"].sum(1).min() > 1800
    pooled32, scores32 = pooled_and_scores(net, batch)
    bf16 = copy.deepcopy(net).to(torch.bfloat16)
    pooled16, scores16 = pooled_and_scores(bf16, batch)

    cosine = F.cosine_similarity(pooled32, pooled16.float())
    print(f"\n[bf16 vs fp32] ~{int(batch['attention_mask'].sum(1).float().mean())} tokens: cosine of pooled "
          f"states {[round(c, 5) for c in cosine.tolist()]}, |score diff| "
          f"{[round(d, 4) for d in (scores32 - scores16).abs().tolist()]}")
    assert pooled16.dtype == torch.float32 and scores16.dtype == torch.float32
    assert cosine.min() >= MIN_COSINE
    assert (scores32 - scores16).abs().max() <= MAX_SCORE_DIFF
    # scores come from an fp32 head: not confined to the bf16 grid
    assert not torch.equal(scores16, scores16.bfloat16().float())

    # The check can fail: rotary frequencies rounded to bf16 (what a plain `.to(bfloat16)` did) move the scores.
    rotary = bf16.llm.rotary_emb
    rotary.inv_freq = rotary.inv_freq.bfloat16().float()
    pooled_rounded, scores_rounded = pooled_and_scores(bf16, batch)
    cosine_rounded = F.cosine_similarity(pooled32, pooled_rounded.float())
    print(f"[bf16, inv_freq rounded to bf16] cosine {[round(c, 5) for c in cosine_rounded.tolist()]}, |score diff| "
          f"{[round(d, 4) for d in (scores32 - scores_rounded).abs().tolist()]}; fp32 scores "
          f"{[round(s, 3) for s in scores32.tolist()]}")
    assert cosine_rounded.min() < 0.99


@pytest.mark.parametrize("cast", ["to", "bfloat16", "half", "to_device_and_dtype"])
def test_casts_keep_rotary_frequencies_and_the_head_exact_fp32(cast, rope_model):
    net, _ = rope_model
    expected = net.llm.rotary_emb.inv_freq.clone()
    head = net.score_head.weight.detach().clone()
    copy_ = copy.deepcopy(net)
    dtype = torch.float16 if cast == "half" else torch.bfloat16
    {"to": lambda m: m.to(torch.bfloat16), "bfloat16": lambda m: m.bfloat16(), "half": lambda m: m.half(),
     "to_device_and_dtype": lambda m: m.to("cpu", torch.bfloat16)}[cast](copy_)
    rotary = copy_.llm.rotary_emb
    assert copy_.dtype == dtype and copy_.llm.layers[0].mlp.up_proj.weight.dtype == dtype
    assert rotary.inv_freq.dtype == rotary.original_inv_freq.dtype == torch.float32
    assert torch.equal(rotary.inv_freq, expected) and torch.equal(rotary.original_inv_freq, expected)
    assert copy_.score_head.weight.dtype == torch.float32 and torch.equal(copy_.score_head.weight, head)
    copy_.float()  # and back: nothing was rounded on the way
    assert torch.equal(copy_.score_head.weight, head)


def test_loading_in_bf16_keeps_rotary_and_head_fp32(tiny_checkpoint):
    net, processor = model.load(tiny_checkpoint, dtype=torch.bfloat16)
    reference, _ = model.load(tiny_checkpoint)
    rotary = net.llm.rotary_emb
    assert net.dtype == torch.bfloat16 and net.vision_tower.embeddings.patch_embedding.weight.dtype == torch.bfloat16
    assert rotary.inv_freq.dtype == rotary.original_inv_freq.dtype == torch.float32
    assert torch.equal(rotary.inv_freq, reference.llm.rotary_emb.inv_freq)
    assert net.score_head.weight.dtype == torch.float32
    assert torch.equal(net.score_head.weight, reference.score_head.weight)  # read as stored, never via bf16


def test_the_head_runs_in_fp32_under_autocast(rope_model):
    net, processor = rope_model
    batch = processor([long_document(seed, n_images=1, words_per_text=20) for seed in range(6)])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = net(**batch)
    assert logits.dtype == torch.float32
    assert not torch.equal(logits, logits.bfloat16().float())
