"""The compiled scoring forward (`pipeline.scoring.compiled`), compiled with `aot_eager` (dynamo's graphs, guards and
recompiles, and the functional rewrite, with no C++ toolchain): its scores are eager's; the warm-up compiles every
graph production runs, so every micro-batch size up to the token budget's largest reuses one; the vision tower runs
the real images only; the language model attends through SDPA's causal kernel with no mask in its graph; a
compilation that fails ends the call instead of being halved into error records.

Compiling is what costs here, so the module compiles the scoring forward once (`warm`: production's warm-up) and
the tests that score share it, each attaching its own scorer with `compile_scorer`: that warm-up must find every
graph compiled already, and every test checks that nothing compiled since the first (`nothing_compiled_since`), so
a shape one test compiled late cannot pass for warm in another."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

import model
from jobs import sample_corpus as corpus
from pipeline.errors import CompileFailed
from pipeline.scoring.compiled import CompiledForward, compile_scorer, traced_attention
from pipeline.scoring.reading import sample_rows
from pipeline.scoring.scorer import BatchScorer


@pytest.fixture(scope="module", autouse=True)
def fresh_compile_caches():
    """The module compiles its own graphs: what another module compiled neither helps nor counts here."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def encoded(tiny_checkpoint):
    """The tiny model's processor's encoded captions and documents of the bundled corpus."""
    _, processor = model.load(tiny_checkpoint)
    captions = [processor.encode([None, s["caption"]], [s["image"], None], "caption")
                for s in corpus.caption_samples(16, seed=3)]
    documents = [processor.encode(s["texts"], s["images"], "interleaved") for s in corpus.documents(4, seed=3)]
    return {"caption": captions, "interleaved": documents}


@pytest.fixture(scope="module")
def warm(tiny_checkpoint):
    """The tiny model, its processor and its forward compiled once (aot_eager) by production's warm-up, which
    compiles the tower and the language model at one row and at several; `graphs`: how many that took."""
    net, processor = model.load(tiny_checkpoint)
    compiled = compile_scorer(BatchScorer(net, processor, token_budget=10**6, max_batch=16, overlap=False),
                              backend="aot_eager")
    return {"net": net, "processor": processor, "compiled": compiled, "graphs": compiled.graphs}


def nothing_compiled_since(warm) -> bool:
    """No graph compiled since the module's one warm-up (in this test or any before it)."""
    return warm["compiled"].graphs == warm["graphs"]


def rows(n_captions: int, n_documents: int = 0, seed: int = 0) -> pa.Table:
    """Samples as the scoring actors receive them."""
    samples = [{"id": s["key"], "source": "x.tar", "kind": "caption", "texts": [None, s["caption"]],
                "images": [s["image"], None]} for s in corpus.caption_samples(n_captions, seed=seed, prefix="c")]
    samples += [{"id": s["key"], "source": "x.tar", "kind": "interleaved", "texts": s["texts"], "images": s["images"]}
                for s in corpus.documents(n_documents, seed=seed, prefix="d")]
    return sample_rows([{**s, "ordinal": k} for k, s in enumerate(samples)])


def test_compiled_scores_are_eagers(warm, encoded):
    net, processor, compiled = warm["net"], warm["processor"], warm["compiled"]
    batch = processor.collate(encoded["caption"][:5] + encoded["interleaved"][:3])
    eager = net.score(**batch)["score"]
    assert torch.allclose(compiled(**batch)["score"], eager, atol=1e-5)
    again = compiled(**processor.collate(encoded["caption"][:5] + encoded["interleaved"][:2]))["score"]
    assert torch.allclose(again, eager[:7], atol=1e-5)
    assert nothing_compiled_since(warm)


def test_every_micro_batch_size_up_to_the_budgets_largest_reuses_the_warm_ups_graphs(warm, encoded):
    """A token budget whose largest caption micro-batch is 16 rows. The warm-up compiles the tower (for one image,
    padded to two, and any number) and the language model at one row and at two or more, at any length; after it,
    one size of each class: captions of one row, two rows (the dynamic graph's smallest batch), seven (an odd size
    between) and sixteen (the largest), and four documents (several images a row, longer rows). Were a graph
    static in the batch or the length, or guarded on a size (a bound, a parity), a size the warm-up never ran (7,
    16, the documents' image count, any length but its own) would compile again: none compiling shows no size
    from 1 to 16 does."""
    net, processor = warm["net"], warm["processor"]
    longest = max(e.n_tokens for e in encoded["caption"])
    scorer = BatchScorer(net, processor, token_budget=16 * longest, max_batch=16, overlap=False)
    compiled = compile_scorer(scorer, backend="aot_eager", compiled=warm["compiled"])
    assert compiled.warm_graphs >= 3 and compiled.compile_s > 0  # the tower; the language model at 1 row and at 2+
    for kind, sizes in (("caption", (1, 2, 7, 16)), ("interleaved", (4,))):
        for size in sizes:
            compiled(**processor.collate(encoded[kind][:size]))
    assert compiled.recompiles == 0 and nothing_compiled_since(warm)


def test_the_vision_tower_runs_the_real_images_and_one_blank_beside_a_lone_image(warm):
    scorer = BatchScorer(warm["net"], warm["processor"], token_budget=10**6, max_batch=5, overlap=False)
    compile_scorer(scorer, backend="aot_eager", compiled=warm["compiled"])
    table = scorer.score_table(rows(7, 2))  # micro-batches of 5 and 2 captions; 2 documents of 1-3 images each
    call = table.column("call")[0].as_py()
    assert call["images"] == scorer.images == 7 + sum(len(s["images"]) - s["images"].count(None)
                                                       for s in corpus.documents(2, seed=0))
    assert call["tower_images"] == call["images"]  # no padding at all
    scorer.score_table(rows(1, seed=1))
    assert (scorer.tower_images, scorer.images) == (call["tower_images"] + 2, call["images"] + 1)
    assert nothing_compiled_since(warm)


def test_production_micro_batches_after_the_warm_up_compile_nothing(warm):
    scorer = BatchScorer(warm["net"], warm["processor"], token_budget=1024, max_batch=8)
    compile_scorer(scorer, backend="aot_eager", compiled=warm["compiled"])
    call = scorer.score_table(rows(10, 2, seed=2)).column("call")[0].as_py()
    assert call["recompiles"] == 0 and call["compile_s"] > 0 and nothing_compiled_since(warm)
    assert call["busy_s"] > 0 and call["wall_s"] >= call["busy_s"]  # the duty cycle counts from the first call


def test_the_compiled_language_model_has_no_mask_in_its_graph_where_transformers_would_build_one(tiny_checkpoint,
                                                                                                  encoded):
    net, processor = model.load(tiny_checkpoint)
    batch = processor.collate(encoded["caption"][:3])
    control = traced_attention(net, batch, causal_sdpa=False)  # transformers' own SDPA attention, traced
    length = control["length"]
    assert [3, 1, length, length] in control["square_tensors"] and control["causal_without_mask"] == 0
    ours = traced_attention(model.load(tiny_checkpoint)[0], batch)
    assert ours["sdpa_calls"] == net.config.text["num_hidden_layers"] == ours["causal_without_mask"]
    assert ours["square_tensors"] == []  # no (B, 1, L, L) mask, nor anything else L x L


def test_a_compilation_that_fails_ends_the_call_and_is_never_halved(tiny_checkpoint):
    net, processor = model.load(tiny_checkpoint)
    scorer = BatchScorer(net, processor, token_budget=10**6, max_batch=4, overlap=False)
    compiled = CompiledForward(net, backend="aot_eager")
    calls = []

    def failing(graph, example_inputs):
        calls.append(len(example_inputs))
        raise RuntimeError("the backend cannot compile this graph")

    compiled.backends["vision"]._compile = failing
    scorer.forward = compiled
    with pytest.raises(CompileFailed, match="compile: false"):
        scorer.score_table(rows(4))
    assert len(calls) == 1  # the whole micro-batch failed once; no halves were tried
