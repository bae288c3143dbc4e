"""Synthetic training pairs: offline perturbations per level, the OpenAI and Bedrock wire formats with retries,
and configuration errors; the stages in this process (the local executor; tests/jobs/test_synth_job.py runs the
job on Ray)."""

from __future__ import annotations

import base64
from collections import Counter

import pytest
from pydantic import ValidationError

from jobs import sample_corpus as corpus
from pipeline.runner import format_summary, run_job
from pipeline.synth import SynthConfig, SynthJob, split_key, split_of, synthesize
from pipeline.synth.generators.offline import _FALLBACK_UNRELATED
from tests.support.llm_servers import FakeBedrock, FakeOpenAI
from tests.support.synth import fake_caption_corpus, pairs_of


def synth_config(**fields) -> SynthConfig:
    """The job's configuration, its stages in this process."""
    return SynthConfig(executor="local", **fields)


def by_origin(pairs):
    out = {}
    for p in pairs:
        out.setdefault(p["origin_id"], {})[p["label"]] = p
    return out


def words(text):
    return text.split()


def test_offline_captions_realise_each_level(tmp_path):
    samples = corpus.caption_samples(24, seed=3)
    for k in range(3):
        corpus.write_webdataset(str(tmp_path / "in" / f"{k}.tar"), samples[k * 8:(k + 1) * 8])
    summary = synthesize(synth_config(input=str(tmp_path / "in"), format="webdataset", output=str(tmp_path / "out"),
                                     val_fraction=0.25), progress=False)
    pairs, errors = pairs_of(tmp_path / "out")
    assert not errors and len(pairs) == 96 and summary["synth"]["pairs_this_run"] == 96
    originals = {s["key"]: s for s in samples}
    grouped = by_origin(pairs)
    assert set(grouped) == set(originals)
    for origin, levels in grouped.items():
        assert set(levels) == {0, 1, 2, 3}
        assert len({p["split"] for p in levels.values()}) == 1  # an origin never spans splits
        caption = originals[origin]["caption"]
        image = originals[origin]["image"]
        assert all(p["images"] == [image, None] for p in levels.values())
        texts = {lv: p["texts"][1] for lv, p in levels.items()}
        assert texts[3] == caption
        w3, w2, w1 = words(texts[3]), words(texts[2]), words(texts[1])
        assert len(w2) == len(w3) and sum(a != b for a, b in zip(w2, w3)) == 1  # exactly one attribute wrong
        assert sum(a != b for a, b in zip(w1, w3)) >= 2 or len(w1) != len(w3)  # several errors
        # another origin's caption (of the same split), or a stock unrelated one when the split has no other
        assert texts[0] != caption and texts[0] in {s["caption"] for s in samples} | set(_FALLBACK_UNRELATED)
        assert split_of(split_key(levels[0]["source"], origin), 0.25) == levels[0]["split"]
    splits = Counter(p["split"] for p in pairs)
    assert splits["val"] > 0 and splits["train"] > 0
    balance = summary["synth"]["level_balance"]
    assert all(len(set(counts.values())) == 1 for counts in balance.values())  # balanced per split
    assert summary["synth"]["requests_sent"] == 0 and summary["synth"]["estimated_cost_usd"] == 0.0


def test_split_and_perturbations_do_not_depend_on_where_the_corpus_lives(tmp_path):
    samples = corpus.caption_samples(12, seed=5)
    splits = []
    for k, where in enumerate(("here", "elsewhere/nested")):
        corpus.write_webdataset(str(tmp_path / where / "0.tar"), samples)
        summary = synthesize(synth_config(input=str(tmp_path / where), format="webdataset",
                                         output=str(tmp_path / f"out{k}"), val_fraction=0.3), progress=False)
        assert not summary["synth"]["warnings"]
        splits.append({(p["origin_id"], p["label"]): (p["split"], p["texts"])
                       for p in pairs_of(tmp_path / f"out{k}")[0]})
    assert splits[0] == splits[1]  # the same split and the same perturbations
    assert {split for split, _ in splits[0].values()} == {"train", "val"}
    assert split_key("s3://bucket/corpus/0.tar", "k1") == split_key(str(tmp_path / "0.tar"), "k1")


def test_a_run_that_holds_out_nothing_says_so(tmp_path):
    corpus.write_webdataset(str(tmp_path / "in" / "0.tar"), corpus.caption_samples(2, seed=5))
    job = SynthJob(synth_config(input=str(tmp_path / "in"), format="webdataset", output=str(tmp_path / "out"),
                               val_fraction=0.01))
    summary = run_job(job, progress=False)
    assert summary["synth"]["level_balance"]["val"] == {"0": 0, "1": 0, "2": 0, "3": 0}
    assert "no origin of this run fell in the validation split" in summary["synth"]["warnings"][0]
    assert "warning    no origin" in format_summary(job, summary)


def test_offline_documents_realise_each_level(tmp_path):
    docs = [d for d in corpus.documents(30, seed=5) if sum(i is not None for i in d["images"]) >= 2][:12]
    corpus.write_obelics(str(tmp_path / "in" / "docs.parquet"), docs)
    synthesize(synth_config(input=str(tmp_path / "in"), format="obelics", output=str(tmp_path / "out"),
                           val_fraction=0.0), progress=False)
    pairs, errors = pairs_of(tmp_path / "out")
    assert not errors and len(pairs) == 4 * len(docs)
    originals = {d["key"]: d for d in docs}
    for origin, levels in by_origin(pairs).items():
        doc = originals[origin]
        texts = {lv: [t for t in p["texts"] if t is not None] for lv, p in levels.items()}
        images = {lv: [i for i in p["images"] if i is not None] for lv, p in levels.items()}
        original_texts = [t for t in doc["texts"] if t is not None]
        original_images = [i for i in doc["images"] if i is not None]
        assert texts[3] == original_texts and images[3] == original_images
        assert levels[3]["texts"] == doc["texts"]
        assert sum(a != b for a, b in zip(texts[2], original_texts)) == 1  # subtle: one segment changed
        assert images[2] != original_images  # one image replaced by another origin's
        assert sum(a != b for a, b in zip(images[2], original_images)) == 1
        assert all(a != b for a, b in zip(texts[1], original_texts[1:]))  # writing errors throughout
        assert images[1] == original_images[1:] + original_images[:1]  # misaligned with the text
        assert not set(images[0]) & set(original_images)  # unrelated images
        assert texts[0] != original_texts


def script(key, attempt, prompt):
    if "MALFORMED" in prompt:
        return "malformed"
    return {1: "throttle", 2: "error"}.get(attempt, "ok")


def test_openai_generator_retries_and_records_unparseable_replies(tmp_path):
    origins = fake_caption_corpus(tmp_path / "in", malformed={"o1-000001"})
    with FakeOpenAI(script) as server:
        config = synth_config(input=str(tmp_path / "in"), format="webdataset", output=str(tmp_path / "out"),
                             generator="openai", endpoint=server.url + "/v1", llm="test-vlm", backoff_base_s=0.01,
                             max_malformed=3, val_fraction=0.0, concurrency=1, threads_per_actor=4)
        summary = synthesize(config, progress=False)
    pairs, errors = pairs_of(tmp_path / "out")
    assert len(pairs) + len(errors) == 4 * len(origins)  # nothing lost
    assert {e["origin_id"] for e in errors} == {"o1-000001"} and len(errors) == 4
    assert all(e["error"].startswith("malformed: reply") and "gave up after 3" in e["error"] for e in errors)
    for p in pairs:
        assert p["texts"][1] == f"synthetic level {p['label']} caption"
        assert p["generator"] == "openai:test-vlm" and p["prompt_version"] == "v1"
    good_keys = {k for k, _ in server.log if "o1-000001" not in k}
    assert len(good_keys) == 4 * (len(origins) - 1)
    for key in good_keys:  # 429, then 500, then a valid reply: two retries each
        assert [o for k, o in server.log if k == key] == ["throttle", "error", "ok"]
    user = server.bodies[0]["messages"][1]["content"]
    assert user[1]["type"] == "image_url" and user[1]["image_url"]["url"].startswith("data:image/jpeg;base64,")
    own = summary["synth"]
    assert own["requests_sent"] == 3 * len(good_keys) + 3 * 4
    assert own["input_tokens"] == 100 * (len(good_keys) + 12) and own["output_tokens"] == 20 * (len(good_keys) + 12)
    assert summary["errors"]["by_category"] == {"malformed": 4}


def test_bedrock_converse_with_throttling(tmp_path):
    origins = fake_caption_corpus(tmp_path / "in", n_shards=1, per_shard=3)
    sent_images = {base64.b64encode(s["image"]).decode() for s in corpus.caption_samples(3, seed=0, prefix="o0-")}
    with FakeBedrock(lambda key, attempt, prompt: "throttle" if attempt == 1 else "ok") as server:
        config = synth_config(input=str(tmp_path / "in"), format="webdataset", output=str(tmp_path / "out"),
                             generator="bedrock", endpoint=server.url, llm="anthropic.claude-3-sonnet-20240229-v1:0",
                             region="us-east-1", backoff_base_s=0.01, val_fraction=0.0, concurrency=1)
        summary = synthesize(config, progress=False)
    pairs, errors = pairs_of(tmp_path / "out")
    assert not errors and len(pairs) == 4 * len(origins)
    assert Counter(o for _, o in server.log) == {"throttle": 12, "ok": 12}
    for body in server.bodies:
        image_blocks = [b["image"] for b in body["messages"][0]["content"] if "image" in b]
        assert len(image_blocks) == 1 and image_blocks[0]["format"] == "jpeg"
        assert image_blocks[0]["source"]["bytes"] in sent_images  # the request carries the real image
    assert all(p["generator"] == "bedrock:anthropic.claude-3-sonnet-20240229-v1:0" for p in pairs)
    assert summary["synth"]["estimated_cost_usd"] == round((12 * 200 * 3.0 + 12 * 30 * 15.0) / 1e6, 4)


@pytest.mark.parametrize("fields, field", [
    ({"generator": "gpt"}, "generator"),
    ({"generator": "openai", "llm": "m"}, "endpoint"),
    ({"levels": [0, 1, 2, 3, 4]}, "levels"),
    ({"levels": [2]}, "levels"),
])
def test_bad_configuration_names_the_field(fields, field):
    with pytest.raises(ValidationError) as err:
        SynthConfig(input="x", format="webdataset", output="y", **fields)
    assert field in str(err.value)
