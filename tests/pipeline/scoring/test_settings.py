"""Scoring's settings as one value (`pipeline.scoring.settings.ScoringSettings`): refused when built wrong, naming
the field; its device defaults decided in one place; built whole by the job's configuration; and what a loaded
scorer and its processor are made with."""

from __future__ import annotations

import pytest
import torch

from model.limits import ImageDecoding
from pipeline.scoring import ScoreConfig, ScoringSettings
from pipeline.scoring.stage import load_scorer


def test_unset_defaults_are_decided_for_the_device():
    settings = ScoringSettings(model="m")
    gpu, cpu = settings.on_device(True), settings.on_device(False)
    assert (gpu.dtype, gpu.compile, gpu.token_budget) == ("bfloat16", True, 32768)
    assert (cpu.dtype, cpu.compile, cpu.token_budget) == ("float32", False, 8192)


def test_settings_that_are_set_are_kept_on_any_device():
    settings = ScoringSettings(model="m", dtype="float16", compile=False, token_budget=1024)
    assert settings.on_device(True) == settings == settings.on_device(False)


def test_nvjpeg_with_jpeg_draft_is_refused_when_the_settings_are_built():
    with pytest.raises(ValueError, match="field 'image_decoder'.*jpeg_draft"):
        ScoringSettings(model="m", image_decoder="nvjpeg", jpeg_draft=True)


def test_an_unknown_image_decoder_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="field 'image_decoder': 'libjpeg'"):
        ScoringSettings(model="m", image_decoder="libjpeg")


def test_the_job_decides_precision_and_compiling_for_its_actors_and_leaves_the_token_budget_to_their_device():
    config = ScoreConfig(input="in", format="webdataset", output="out", model="m", gpus_per_actor=1,
                         jpeg_draft=True, decode_memory=2**21)
    settings = config.settings(weights="sha256:abc", actor_cpus=6)
    assert (settings.dtype, settings.compile, settings.token_budget) == ("bfloat16", True, None)
    assert (settings.decode_threads, settings.weights, settings.model) == (6, "sha256:abc", "m")
    assert settings.decoding == ImageDecoding(config.max_image_pixels, jpeg_draft=True, decode_memory=2**21)
    identity = config.identity("m@1", "sha256:abc")
    assert (identity["dtype"], identity["compiled"]) == (settings.dtype, settings.compile)


def test_a_loaded_scorer_and_its_processor_are_built_with_the_settings(tiny_checkpoint):
    scorer = load_scorer(ScoringSettings(model=tiny_checkpoint, jpeg_draft=True, max_image_pixels=10**6,
                                         decode_memory=2**22, max_batch=7))
    try:
        processor = scorer.processor
        assert (processor.max_image_pixels, processor.jpeg_draft, processor.decode_budget.capacity) == (
            10**6, True, 2**22)
        assert scorer.max_batch == 7 and scorer.token_budget == 8192  # decided for this machine's CPU
        assert scorer.model.dtype == torch.float32 and scorer.forward == scorer.model.score  # not compiled
    finally:
        scorer.close()
