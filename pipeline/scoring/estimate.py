"""What a scoring run would cost, for its dry run: the model's size from its config alone, the GPU-hours at a
rate, the price."""

from __future__ import annotations

# Reference rates on one H200 (README, "Running on a cluster"): captions/s with bf16 batching, by model size.
REFERENCE_RATES = ((1.0e9, 379.0), (float("inf"), 282.0))


def parameter_count(config) -> int:
    """The model's parameters, from its config alone (built on the meta device: no memory, no weights read)."""
    import torch

    from model.modeling import UniFilter

    with torch.device("meta"):
        net = UniFilter(config)
    return sum(p.numel() for p in net.parameters())


def human(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:g}"


def reference_rate(params: int, fmt: str) -> float:
    """Samples/s one GPU scores, from the reference rates: documents at a quarter of the captions' rate."""
    rate = next(r for limit, r in REFERENCE_RATES if params <= limit)
    return rate / 4 if fmt in ("obelics", "interleaved-wds") else rate
