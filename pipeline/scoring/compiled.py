"""The scoring forward pass compiled (`torch.compile`), on by default on a GPU: the vision tower at fixed image
counts, the language model with dynamic shapes, and between them, eager, the two steps whose shapes depend on the
data (splicing the image tokens in at their slots, pooling each row's last token). The host-side image-slot check
runs before the batch is copied (`BatchScorer.prepare`), so nothing in the compiled parts breaks the graph on it.

The vision tower is 81-85% of the model's FLOPs for the 0.5B config; a micro-batch's images are padded up to the
next bucket (`IMAGE_BUCKETS`) with blank images, so the tower compiles once per bucket, never per count, and the
padding's outputs are dropped. Compilation is paid once per actor, most of it at set-up (a warm-up micro-batch),
and timed: `CompiledForward.compile_s` (the summary reports it).
"""

from __future__ import annotations

import time

import torch

IMAGE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def bucket(n: int) -> int:
    return next((b for b in IMAGE_BUCKETS if b >= n), n)


class CompiledForward:
    """`model.score` with its heavy parts compiled: called like it, returns the same dict."""

    def __init__(self, model, backend: str = "inductor"):
        self.model = model
        self.vision = torch.compile(model.encode_images, backend=backend, dynamic=False, fullgraph=True)
        self.llm = torch.compile(model.llm, backend=backend, dynamic=True)
        self.compile_s = 0.0  # time spent in calls that compiled something
        self._seen: set = set()

    def __call__(self, input_ids, attention_mask, pixel_values=None, check_slots: bool = True):
        from model.modeling import check_image_slots, scores_from_logits

        if check_slots:
            check_image_slots(input_ids, pixel_values, self.model.config.tokens_per_image)
        shape_key = (bucket(0 if pixel_values is None else int(pixel_values.shape[0])), input_ids.dim())
        started = time.perf_counter()
        with torch.inference_mode():
            image_tokens = self._images(pixel_values)
            embeds = self.model.embed(input_ids, image_tokens)
            hidden = self.llm(inputs_embeds=embeds, use_cache=False).last_hidden_state
            out = scores_from_logits(self.model.head(hidden, attention_mask))
        if shape_key not in self._seen:  # the first call at this bucket compiled it
            self._seen.add(shape_key)
            if self.model.device.type == "cuda":
                torch.cuda.synchronize()
            self.compile_s += time.perf_counter() - started
        return out

    def _images(self, pixel_values):
        if pixel_values is None or not pixel_values.shape[0]:
            return None
        n = int(pixel_values.shape[0])
        padded = bucket(n)
        if padded > n:
            blank = pixel_values.new_zeros((padded - n, *pixel_values.shape[1:]))
            pixel_values = torch.cat([pixel_values, blank])
        return self.vision(pixel_values)[:n]


def compile_scorer(scorer, backend: str = "inductor") -> CompiledForward:
    """Swap `scorer`'s forward for the compiled one and warm it up (a grey-square caption through the whole path:
    the first compilations happen here, at set-up, not in the first micro-batch)."""
    import numpy as np

    compiled = CompiledForward(scorer.model, backend)
    scorer.forward = compiled
    size = scorer.processor.config.image_size
    sample = scorer.processor.plan([None, "a grey square"], [np.full((3, size, size), 127, np.uint8), None],
                                   "caption")
    prepared = scorer.prepare([sample], [0])
    if "error" not in prepared:
        scorer._forward(prepared)
    return compiled
