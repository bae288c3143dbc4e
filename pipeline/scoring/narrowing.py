"""One scoring call's dealings with the run's fault journal (`pipeline.scoring.device_faults` has the protocol):
samples the journal already blames get their error record without a forward pass; samples at the bound are scored
alone after a canary; a DeviceFault is recorded before the process ends; a call whose every sample fails alone the
same way is the device's or the model's fault, never the data's."""

from __future__ import annotations

import re
import sys

import numpy as np
import torch

from model.errors import Category
from pipeline.errors import DeviceFault
from pipeline.scoring.device_faults import FAULTS_BEFORE_NARROWING, Key

_DEVICE_ERROR = re.compile(r"CUDA error|CUBLAS_STATUS|CUDNN_STATUS|cuDNN error|device-side assert|illegal memory "
                           r"access|NCCL error|ECC error|unspecified launch failure", re.I)


def is_device_error(err: BaseException) -> bool:
    accelerator_error = getattr(torch, "AcceleratorError", ())
    return (accelerator_error and isinstance(err, accelerator_error)) or bool(_DEVICE_ERROR.search(str(err)))


def score_call(scorer, planned: list, keys: list[Key], rows: list[int]) -> dict[int, dict | str]:
    """{row: record fields or error reason} for the planned samples of one call (`rows` their row indices)."""
    blamed, suspects = scorer.journal.lookup(keys) if keys else ({}, {})
    narrowed = {key for key, faults in suspects.items() if faults >= FAULTS_BEFORE_NARROWING}
    alone = [j for j, key in enumerate(keys) if key in narrowed]
    rest = [j for j, key in enumerate(keys) if key not in narrowed and key not in blamed]
    results: dict[int, dict | str] = {}
    cleared: list[Key] = []  # suspects that scored alone in this call
    try:
        results.update(_score_alone(scorer, planned, alone, keys, cleared))
        results.update(scorer.score_planned(planned, rest))
    except DeviceFault as fault:
        try:
            _record(scorer, fault, keys, alone, cleared)
        except Exception as err:  # noqa: BLE001 - the fault is handled (the process ends) all the same
            print(f"[score] the device fault could not be recorded in the fault journal: {err}", file=sys.stderr,
                  flush=True)
        raise
    _check_not_all_failed(results)
    if suspects:  # the call completes: its suspects are cleared
        scorer.journal.clear([key for key in keys if key in suspects])
    results.update({j: blamed[key] for j, key in enumerate(keys) if key in blamed})
    return {rows[j]: result for j, result in results.items()}


def _score_alone(scorer, planned: list, alone: list[int], keys: list[Key], cleared: list[Key]) -> dict:
    """Suspects at the bound, each on its own, once the canary has shown that the device works."""
    if not alone:
        return {}
    _canary(scorer)
    results: dict[int, dict | str] = {}
    for j in alone:
        results.update(scorer.score_group(planned, [j]))
        cleared.append(keys[j])
    return results


def _canary(scorer) -> None:
    """A synthetic caption (a grey square) through the whole path: a fault here is the device's own."""
    if scorer.healthy:
        return
    size = scorer.processor.config.image_size
    sample = scorer.processor.plan([None, "a grey square"], [np.full((3, size, size), 127, np.uint8), None],
                                   "caption")
    try:
        prepared = scorer.prepare([sample], [0])
        if "error" in prepared or prepared["failed"]:
            raise prepared.get("error") or RuntimeError(str(prepared["failed"]))
        scorer._forward(prepared)
    except Exception as err:
        raise DeviceFault(f"the canary sample failed: {type(err).__name__}: {err}", canary=True) from err


def _record(scorer, fault: DeviceFault, keys: list[Key], alone: list[int], cleared: list[Key]) -> None:
    """Into the journal before the process ends: a sample that faulted alone after the canary is blamed, a
    micro-batch that faulted gets one more fault, a canary fault blames nobody."""
    journal = scorer.journal
    if fault.canary:
        journal.record_canary_fault(fault.first_line)
    elif fault.samples is not None and len(fault.samples) == 1 and fault.samples[0] in alone:
        reason = f"{Category.DEVICE.value}: the sample faults the device on its own ({fault.first_line})"
        journal.blame(keys[fault.samples[0]], reason[:500], cleared)
    elif fault.samples is not None:
        journal.record_fault([keys[j] for j in fault.samples], fault.first_line, cleared)


def _check_not_all_failed(results: dict[int, dict | str]) -> None:
    """Samples that fail on their own fail for their own reasons. When every sample of a call (two or more) failed
    alone with the same error, the error is the device's or the model's, not the data's (an unrecognised CUDA
    error, say): a DeviceFault, so the batch is retried and nothing is committed as an error record."""
    failed = [r for r in results.values() if isinstance(r, str) and r.startswith(f"{Category.SCORE.value}:")]
    if len(results) < 2 or len(failed) < len(results):
        return
    causes = {re.sub(r"\(\d+ tokens\)", "", r) for r in failed}  # out of memory names each size
    if len(causes) == 1:
        raise DeviceFault(f"every one of {len(results)} samples failed alone with: {failed[0]}")
