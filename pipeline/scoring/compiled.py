"""The scoring forward pass compiled (`torch.compile`), on by default on a GPU: the vision tower and the language
model, each compiled once for every batch size (dynamic shapes), and between them, eager, the two steps whose shapes
depend on the data (splicing the image tokens in at their slots, pooling each row's last token). The host-side
image-slot check runs before the batch is copied (`BatchScorer.prepare`), so nothing in the compiled parts breaks
the graph on it.

- Vision work is proportional to the images. The tower (81-85% of the 0.5B model's FLOPs) has a dynamic batch
  dimension, so a micro-batch of n images runs n images through it. Padding image counts up to powers of two
  (the design before) cost 37-50% more vision work on caption micro-batches (136-207 images padded to 256) and
  met torch's recompile limit (8 shapes) at the ninth bucket. Only a micro-batch of one image gets a blank one
  beside it: torch specialises a dimension of size 1, and one graph is worth one image. `vision_padding` (images
  through the tower / real images) is counted.
- The language model has dynamic batch and length and attends through SDPA's causal kernel with no mask
  (`CAUSAL_SDPA`): traced, transformers cannot read the padding mask's values and builds an explicit (B, 1, L, L)
  mask for every layer instead. No mask is needed: rows are right-padded and each is pooled at its last real
  token, so causal attention alone is exact, and it is what the eager path runs (SDPA with `is_causal`).
- Every graph compiled is counted (the backend compiles one graph per call of it) and every call that compiled
  one is timed (`compile_s`). `compile_scorer`'s warm-up compiles each graph production runs (the tower, the
  language model at one row and at several, at any length), so a graph compiled later is a recompile.
- A compilation that fails is no sample's fault: `CompileFailed` goes through the scorer (never halved into error
  records); `compile: false` is the way round it.
"""

from __future__ import annotations

import time

import torch

from pipeline.errors import CompileFailed

# transformers' own SDPA attention under a name of ours: transformers makes no mask for an implementation it has
# no mask function for, so SDPA gets `attn_mask=None` and `is_causal=True`, eager and compiled alike.
CAUSAL_SDPA = "unifilter_causal_sdpa"


def use_causal_sdpa(llm) -> bool:
    """Switch the language model to `CAUSAL_SDPA`; False (and left as it is) where it has layers that are not plain
    causal attention (a sliding window), whose masks a mask function must make."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    config = llm.config
    if getattr(config, "use_sliding_window", False) or any(
            kind != "full_attention" for kind in (getattr(config, "layer_types", None) or [])):
        return False
    AttentionInterface.register(CAUSAL_SDPA, sdpa_attention_forward)
    llm.set_attn_implementation(CAUSAL_SDPA)
    return True


def tower_images(n: int) -> int:
    """How many images the compiled tower runs for a micro-batch of `n`."""
    return 0 if n == 0 else max(n, 2)


class CountingBackend:
    """A `torch.compile` backend that counts the graphs it compiles (dynamo calls it once per graph)."""

    def __init__(self, backend: str):
        from torch._dynamo import lookup_backend

        self._compile = lookup_backend(backend)
        self.graphs = 0

    def __call__(self, graph, example_inputs):
        self.graphs += 1
        return self._compile(graph, example_inputs)


class CompiledForward:
    """`model.score` with its heavy parts compiled: called like it, returns the same dict."""

    def __init__(self, model, backend: str = "inductor"):
        self.model = model
        self.causal_sdpa = use_causal_sdpa(model.llm)
        self.backends = {"vision": CountingBackend(backend), "llm": CountingBackend(backend)}
        self.vision = torch.compile(model.encode_images, backend=self.backends["vision"], fullgraph=True)
        self.llm = torch.compile(model.llm, backend=self.backends["llm"], fullgraph=True)
        self.compile_s = 0.0  # time spent in calls that compiled a graph
        self.warm_graphs: int | None = None  # graphs the warm-up compiled; those after it are recompiles

    @property
    def graphs(self) -> int:
        return sum(backend.graphs for backend in self.backends.values())

    tower_images = staticmethod(tower_images)

    @property
    def recompiles(self) -> int:
        """Graphs compiled after the warm-up (all of them when there was none)."""
        return self.graphs - (self.warm_graphs or 0)

    def __call__(self, input_ids, attention_mask, pixel_values=None, check_slots: bool = True):
        from model.modeling import check_image_slots, scores_from_logits

        if check_slots:
            check_image_slots(input_ids, pixel_values, self.model.config.tokens_per_image)
        graphs, started = self.graphs, time.perf_counter()
        try:
            with torch.inference_mode():
                image_tokens = self._images(pixel_values)
                embeds = self.model.embed(input_ids, image_tokens)  # (B, L, D)
                torch._dynamo.maybe_mark_dynamic(embeds, 0)  # one graph for every batch of two rows or more
                torch._dynamo.maybe_mark_dynamic(embeds, 1)  # and every length
                hidden = self.llm(inputs_embeds=embeds, use_cache=False).last_hidden_state
                out = scores_from_logits(self.model.head(hidden, attention_mask))
        except Exception as err:
            memory = _out_of_memory_in(err)
            if memory is not None:  # compiling ran out of memory: as any other out-of-memory error, the scorer's
                raise memory from err  # to split the micro-batch
            if is_compile_error(err):
                raise CompileFailed(f"compiling the scoring model failed ({type(err).__name__}: "
                                    f"{str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}); "
                                    "set compile: false (--no-compile) to score without compiling") from err
            raise
        if self.graphs > graphs:  # this call compiled a graph: its time is compile time
            if self.model.device.type == "cuda":
                torch.cuda.synchronize()
            self.compile_s += time.perf_counter() - started
        return out

    def _images(self, pixel_values):
        if pixel_values is None or not pixel_values.shape[0]:
            return None
        n = int(pixel_values.shape[0])
        if n == 1:  # a dimension of size 1 would be specialised: a graph of its own
            pixel_values = torch.cat([pixel_values, pixel_values.new_zeros(pixel_values.shape)])
        torch._dynamo.mark_dynamic(pixel_values, 0)
        return self.vision(pixel_values)[:n]


def _out_of_memory_in(err: BaseException) -> torch.OutOfMemoryError | None:
    """The out-of-memory error a compile error wraps (autotuning a kernel, say), if it wraps one."""
    seen = err.__cause__ or getattr(err, "inner_exception", None)
    for _ in range(16):  # a chain of causes, never a cycle followed for ever
        if seen is None or isinstance(seen, torch.OutOfMemoryError):
            return seen
        seen = seen.__cause__ or getattr(seen, "inner_exception", None)
    return None


def is_compile_error(err: BaseException) -> bool:
    """An error of torch.compile itself (tracing, a backend, the recompile limit), not of running the model."""
    from torch._dynamo import exc

    kinds = tuple(k for k in (exc.TorchDynamoException, getattr(exc, "FailOnRecompileLimitHit", None)) if k)
    try:
        from torch._inductor.exc import InductorError

        kinds += (InductorError,)
    except ImportError:  # pragma: no cover - torch versions without it
        pass
    return isinstance(err, kinds) and not isinstance(err, torch.OutOfMemoryError)


def warm_up_samples(processor) -> list[list]:
    """The micro-batches the warm-up runs, as planned samples: two captions (the tower at several images, the
    language model at several rows), one caption (one row), and documents of several images each at a greater
    length (every length and image count after these reuses a graph)."""
    import numpy as np

    size = processor.config.image_size
    grey = np.full((3, size, size), 127, np.uint8)

    def caption(text: str):
        return processor.plan([None, text], [grey, None], "caption")

    def document(paragraphs: int):
        texts, images = [], []
        for k in range(paragraphs):
            texts += [f"paragraph {k} " + "of a grey square " * 8, None]
            images += [None, grey]
        return processor.plan(texts, images, "interleaved")

    return [[caption("a grey square"), caption("a grey square on a grey background")],
            [caption("one grey square")],
            [document(2), document(3), document(2)]]


def compile_scorer(scorer, backend: str = "inductor", compiled: CompiledForward | None = None) -> CompiledForward:
    """Swap `scorer`'s forward for a compiled one (`compiled`, one already made for the same model, or a new one)
    and compile, at set-up, every graph production runs (the warm-up micro-batches go through the scorer's own
    path); the scorer's duty cycle and image counts forget them."""
    compiled = compiled or CompiledForward(scorer.model, backend)
    scorer.forward = compiled
    for samples in warm_up_samples(scorer.processor):
        scorer.run_through(samples)
    compiled.warm_graphs = compiled.graphs
    scorer.duty.reset()
    scorer.images = scorer.tower_images = 0
    return compiled


def traced_attention(model, batch: dict, causal_sdpa: bool = True) -> dict:
    """What the compiled language model's graph does for attention, traced once on `batch` (a collated batch) at
    its static shapes: how many SDPA calls, how many are causal without a mask, and the shapes of every tensor in
    the graph whose last two dimensions are the sequence length (a materialised (B, 1, L, L) mask shows there).
    With `causal_sdpa`, `model` is switched to `CAUSAL_SDPA` first, as `CompiledForward` does; without it, on a
    model never switched, the graph shows what transformers does on its own."""
    import torch.nn.functional as F

    captured = []

    def capture(graph, example_inputs):
        captured.append(graph)
        return graph.forward

    if causal_sdpa:
        use_causal_sdpa(model.llm)
    with torch.inference_mode():
        embeds = model.embed(batch["input_ids"], model.encode_images(batch["pixel_values"])
                             if batch["pixel_values"].shape[0] else None)
        torch.compile(model.llm, backend=capture, dynamic=False, fullgraph=True)(inputs_embeds=embeds, use_cache=False)
    length = int(embeds.shape[1])
    calls, square = [], []
    for graph in captured:
        for node in graph.graph.nodes:
            if node.op == "call_function" and node.target is F.scaled_dot_product_attention:
                mask = node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None)
                calls.append({"is_causal": bool(node.kwargs.get("is_causal", False)), "mask": mask is not None})
            value = node.meta.get("example_value")
            shape = tuple(getattr(value, "shape", ()))
            if len(shape) >= 2 and shape[-1] == shape[-2] == length:
                square.append([int(d) for d in shape])
    return {"graphs": len(captured), "sdpa_calls": len(calls),
            "causal_without_mask": sum(c["is_causal"] and not c["mask"] for c in calls),
            "length": length, "square_tensors": square}
