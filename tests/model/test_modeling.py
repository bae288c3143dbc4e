"""The model: forward and score() for both sample kinds and both heads, exactness of the image splice,
batch invariance, and the image/slot contract."""

from __future__ import annotations

import pytest
import torch

import model
from model.config import IMAGE_TOKEN_ID
from tests.support.images import jpeg_bytes


def caption(color="red", text="a red circle in the middle"):
    return {"texts": [None, text], "images": [jpeg_bytes(color), None], "kind": "caption"}


def document(n_images=2, words=30):
    texts, images = [], []
    for i in range(n_images):
        texts += [" ".join(["paragraph", str(i)] + ["text"] * words), None]
        images += [None, jpeg_bytes(["blue", "green", "yellow"][i % 3], (60 + 10 * i, 90))]
    return {"texts": texts, "images": images, "kind": "interleaved"}


@pytest.fixture(scope="module")
def regression(tiny_checkpoint):
    return model.load(tiny_checkpoint)


@pytest.fixture(scope="module")
def classifier(tiny_checkpoint_4way):
    return model.load(tiny_checkpoint_4way)


def test_regression_head_scores_captions_and_documents(regression):
    net, processor = regression
    out = net.score(**processor([caption(), document()]))
    assert out["probs"] is None
    assert out["score"].dtype == torch.float32 and out["score"].shape == (2,)
    assert torch.isfinite(out["score"]).all()
    expected = out["score"].round().clamp(0, 3).to(torch.int8)
    assert torch.equal(out["label"], expected)


def test_classification_head_gives_probabilities_and_expected_level(classifier):
    net, processor = classifier
    out = net.score(**processor([caption(), document(3)]))
    probs = out["probs"]
    assert probs.shape == (2, 4)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))
    torch.testing.assert_close(out["score"], (probs * torch.arange(4.0)).sum(-1))
    assert torch.equal(out["label"], probs.argmax(-1).to(torch.int8))


def test_images_change_the_score(regression):
    net, processor = regression
    a = net(**processor([caption("red")]))
    b = net(**processor([caption("blue")]))
    assert not torch.allclose(a, b)


def _reference_logits(net, processor, sample) -> torch.Tensor:
    """An independent, unbatched LLaVA-style splice: embeddings of the text pieces concatenated with the
    vision features of each image in order, the LLM run on that one sequence, its last token scored."""
    enc = processor.encode(sample["texts"], sample["images"], sample["kind"])
    ids = torch.from_numpy(enc.input_ids)
    pixels = torch.from_numpy(enc.pixel_values).float() / 255.0
    pixels = (pixels - 0.5) / 0.5
    tower = net.vision_tower
    hidden = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
    feats = net.projector(hidden)  # (n_images, T, D)
    parts, image_idx, i = [], 0, 0
    while i < len(ids):
        if ids[i] == IMAGE_TOKEN_ID:
            parts.append(feats[image_idx])
            image_idx += 1
            i += net.config.tokens_per_image
        else:
            j = i
            while j < len(ids) and ids[j] != IMAGE_TOKEN_ID:
                j += 1
            parts.append(net.llm.embed_tokens(ids[i:j]))
            i = j
    embeds = torch.cat(parts).unsqueeze(0)
    out = net.llm(inputs_embeds=embeds).last_hidden_state[0, -1]
    return net.score_head(out)


def test_forward_matches_an_unbatched_reference_splice(regression):
    net, processor = regression
    samples = [caption(), document(3)]
    batched = net(**processor(samples))
    with torch.no_grad():
        for row, sample in enumerate(samples):
            ref = _reference_logits(net, processor, sample)
            torch.testing.assert_close(batched[row], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("head", ["regression", "classifier"])
def test_batch_invariance(head, request):
    net, processor = request.getfixturevalue(head)
    samples = [caption("red", "short"), document(3, words=60), caption("green", "a much longer caption " * 8),
               document(1, words=5)]
    with torch.no_grad():
        batched = net(**processor(samples))
        for row, sample in enumerate(samples):
            alone = net(**processor([sample]))[0]
            assert (batched[row] - alone).abs().max().item() <= 1e-5


def test_fewer_images_than_slots_raises(regression):
    net, processor = regression
    batch = processor([document(2)])
    with pytest.raises(ValueError, match="image/slot mismatch: the batch has 1 images"):
        net(batch["input_ids"], batch["attention_mask"], batch["pixel_values"][:1])


def test_images_without_slots_raise(regression):
    net, processor = regression
    batch = processor([caption()])
    ids = batch["input_ids"].masked_fill(batch["input_ids"] == IMAGE_TOKEN_ID, 5)
    with pytest.raises(ValueError, match="image/slot mismatch"):
        net(ids, batch["attention_mask"], batch["pixel_values"])


def test_bfloat16_model_scores_in_float32(tiny_checkpoint):
    net, processor = model.load(tiny_checkpoint, dtype=torch.bfloat16)
    out = net.score(**processor([caption(), document()]))
    assert out["score"].dtype == torch.float32 and torch.isfinite(out["score"]).all()
