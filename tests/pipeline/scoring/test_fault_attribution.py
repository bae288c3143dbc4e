"""Whose a device error is: a CUDA error surfaces at whatever call into the device comes next, so one met while a
micro-batch is prepared (pinning, nvJPEG) may be another call's forward's. The fault journal counts it against the
micro-batch that faulted, never against the one being prepared."""

from __future__ import annotations

import threading

import pytest

import model
from jobs import sample_corpus as corpus
from pipeline.errors import DeviceFault
from pipeline.scoring.device_faults import FaultJournal
from pipeline.scoring.reading import sample_rows
from pipeline.scoring.scorer import BatchScorer

ILLEGAL_ACCESS = "CUDA error: an illegal memory access was encountered"


def call_rows(source: str, n: int, repeat: int = 1):
    samples = corpus.caption_samples(n, seed=len(source), prefix=source)
    return sample_rows([{"id": s["key"], "source": source, "kind": "caption", "ordinal": k,
                         "images": [s["image"], None], "texts": [None, " ".join([s["caption"]] * repeat)]}
                        for k, s in enumerate(samples)])


class Device:
    """A model whose first forward of short rows (call A's) waits until call B's preparation has met the device
    error, then fails with it; and a scorer whose preparation of long rows (call B's) meets that error while A's
    forward is on the device."""

    def __init__(self, net, long_from: int):
        self.net = net
        self.long_from = long_from
        self.a_on_device = threading.Event()
        self.b_met_it = threading.Event()

    def model(self):
        device = self

        class Model:
            def __getattr__(self, name):
                return getattr(device.net, name)

            def score(self, input_ids, attention_mask, pixel_values=None, **options):
                if input_ids.shape[1] < device.long_from and not device.a_on_device.is_set():
                    device.a_on_device.set()
                    assert device.b_met_it.wait(30)
                    raise RuntimeError(ILLEGAL_ACCESS)
                return device.net.score(input_ids, attention_mask, pixel_values, **options)

        return Model()

    def scorer(self, processor, journal):
        device = self

        class Scorer(BatchScorer):
            def _to_device(self, batch):
                if batch["input_ids"].shape[1] >= device.long_from:
                    assert device.a_on_device.wait(30)
                    device.b_met_it.set()
                    raise RuntimeError(ILLEGAL_ACCESS)
                return super()._to_device(batch)

        return Scorer(self.model(), processor, token_budget=10**6, max_batch=2, journal=journal)


def test_an_error_met_preparing_one_calls_micro_batch_is_counted_against_the_forward_that_met_it(tiny_checkpoint):
    net, processor = model.load(tiny_checkpoint)
    a, b = call_rows("a.tar", 4), call_rows("b.tar", 4, repeat=6)
    longest_a = max(processor.plan(r["texts"], r["images"], r["kind"]).n_tokens for r in a.to_pylist())
    device = Device(net, long_from=longest_a + 1)
    journal = FaultJournal()
    scorer = device.scorer(processor, journal)
    raised = {}

    def run(name, table):
        try:
            scorer.score_table(table)
        except DeviceFault as fault:
            raised[name] = fault

    threads = [threading.Thread(target=run, args=("a", a))]
    threads[0].start()
    assert device.a_on_device.wait(30)
    threads.append(threading.Thread(target=run, args=("b", b)))
    threads[1].start()
    for thread in threads:
        thread.join(60)
    assert set(raised) == {"a", "b"}
    assert raised["a"].samples is not None and raised["b"].unattributed  # B's is left to A's forward
    suspects = journal.suspects([("a.tar", k) for k in range(4)] + [("b.tar", k) for k in range(4)])
    assert len(suspects) == 2 and {source for source, _ in suspects} == {"a.tar"}  # A's first micro-batch only
    assert journal.stats()["micro_batches"] == 1


def test_an_error_met_preparing_a_micro_batch_with_no_forward_failing_is_that_micro_batchs(tiny_checkpoint):
    net, processor = model.load(tiny_checkpoint)

    class Scorer(BatchScorer):
        def _to_device(self, batch):
            if batch["input_ids"].shape[0] == 1:  # the call's last micro-batch: its pinning meets the error
                raise RuntimeError(ILLEGAL_ACCESS)
            return super()._to_device(batch)

    journal = FaultJournal()
    with pytest.raises(DeviceFault) as raised:
        Scorer(net, processor, token_budget=10**6, max_batch=2, journal=journal).score_table(call_rows("c.tar", 5))
    assert raised.value.samples is not None and len(raised.value.samples) == 1
    assert not raised.value.unattributed
    suspects = journal.suspects([("c.tar", k) for k in range(5)])
    assert len(suspects) == 1
