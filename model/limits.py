"""Limits the model library enforces, importable without torch (a job's configuration shows them as defaults)."""

DEFAULT_MAX_IMAGE_PIXELS = 64_000_000  # decompression-bomb guard: checked from the header, before decoding
DEFAULT_DECODE_MEMORY = 2**30  # decoded-pixel bytes a process's decode threads hold at once (processing.DecodeBudget)
