"""A document's images beyond what the model can see are dropped before it is shipped (`drop_unseen_images`), and
the processor plans what is left exactly as it plans the whole: the same tokens, images and `truncated`, or the
same error."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest

from model.checkpoint import load_processor
from model.limits import drop_unseen_images, images_seen
from tests.support import hostile


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    return load_processor(tiny_checkpoint)[0]


def planned_or_error(processor, texts, images, kind):
    try:
        plan = processor.plan(texts, images, kind)
    except Exception as err:  # noqa: BLE001 - the error is what must match
        return f"{type(err).__name__}: {err}"
    return plan.input_ids.tolist(), [bytes(i) for i in plan.images], plan.truncated


@pytest.mark.parametrize("max_images", [16, 3])
def test_planning_what_is_left_gives_what_planning_the_whole_gives(processor, max_images):
    processor = copy.copy(processor)
    processor.config = processor.config.model_copy(update={"max_images": max_images})
    seen = images_seen(max_images, processor.config.max_tokens, processor.config.tokens_per_image)
    rng = random.Random(0)
    dropped = 0
    for _ in range(300):
        texts, images = hostile.random_document(rng, positions=rng.randint(1, 60))
        kind = "interleaved" if rng.random() < 0.95 else "caption"
        kept_texts, kept_images = drop_unseen_images(texts, images, kind, seen)
        dropped += sum(i is not None for i in images or []) - sum(i is not None for i in kept_images or [])
        assert planned_or_error(processor, kept_texts, kept_images, kind) == planned_or_error(processor, texts,
                                                                                              images, kind)
    assert dropped > 0  # the property was exercised


def test_a_document_of_300_images_ships_only_those_the_model_can_see(processor):
    texts, images = hostile.many_image_document(300)
    seen = images_seen(processor.config.max_images, processor.config.max_tokens, processor.config.tokens_per_image)
    kept_texts, kept_images = drop_unseen_images(texts, images, "interleaved", seen)
    assert sum(1 for i in kept_images if i) == seen == 16
    assert sum(len(i) for i in kept_images if i) < sum(len(i) for i in images if i) / 15
    whole = processor.plan(texts, images, "interleaved")
    part = processor.plan(kept_texts, kept_images, "interleaved")
    assert np.array_equal(whole.input_ids, part.input_ids) and whole.truncated and part.truncated
