"""The decode threads of one process share one budget of decoded-pixel bytes: big images wait for each other, small
ones flow, and an image larger than the budget is decoded alone; the pixels are the same as without it."""

from __future__ import annotations

import io
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from model.checkpoint import load_processor
from model.processing import DecodeBudget, decode_cost
from tests.support import hostile


class RecordingBudget(DecodeBudget):
    """A budget that remembers the most it had reserved at once."""

    most = 0

    def _acquire(self, n):
        got = super()._acquire(n)
        with self._cond:
            self.most = max(self.most, self.in_use)
        return got


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    return load_processor(tiny_checkpoint)[0]


def test_the_decode_threads_hold_one_big_image_at_a_time_when_the_budget_fits_one(processor):
    png = hostile.rgba_png(1200)
    cost = decode_cost(Image.open(io.BytesIO(png)))
    unbounded = processor.image_pixels(png)
    processor.decode_budget = budget = RecordingBudget(cost + cost // 2)
    with ThreadPoolExecutor(4) as pool:
        pixels = list(pool.map(processor.image_pixels, [png] * 6))
    assert budget.most == cost and budget.in_use == 0
    assert all(np.array_equal(p, unbounded) for p in pixels)


def test_an_image_larger_than_the_budget_is_decoded_alone(processor):
    png = hostile.rgba_png(1200)
    processor.decode_budget = budget = RecordingBudget(decode_cost(Image.open(io.BytesIO(png))) // 3)
    with ThreadPoolExecutor(3) as pool:
        pixels = list(pool.map(processor.image_pixels, [png] * 3))
    assert budget.most == budget.capacity and len(pixels) == 3


def test_small_images_flow_while_a_big_one_waits():
    budget = DecodeBudget(1600)
    held, release, waited = threading.Event(), threading.Event(), threading.Event()

    def big_holder():
        with budget.reserving() as reserve:
            reserve(1000)
            held.set()
            release.wait(30)

    def big_waiter():
        with budget.reserving() as reserve:
            reserve(1000)  # waits until the holder gives its bytes back
            waited.set()

    holder, waiter = threading.Thread(target=big_holder), threading.Thread(target=big_waiter)
    holder.start()
    held.wait(30)
    waiter.start()
    while not budget._waiting:  # the second big image is in line
        threading.Event().wait(0.01)
    with budget.reserving() as reserve:
        reserve(100)  # a small one (1/16 of the budget) goes at once
    assert not waited.is_set() and budget.in_use == 1000
    release.set()
    holder.join(30)
    waiter.join(30)
    assert waited.is_set() and budget.in_use == 0
