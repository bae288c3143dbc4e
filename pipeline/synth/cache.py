"""The request cache: generated texts by (origin, level) under OUTPUT/_cache/<generator>/<prompt version>/, so a
rerun never pays for a request twice. One small JSON object per entry, written as soon as the reply arrives."""

from __future__ import annotations

import hashlib
import json

from pipeline.io.publish import write_json
from pipeline.io.uris import filesystem_for, join
from pipeline.synth.generators import cache_namespace


class RequestCache:
    """Generated texts by (origin, level) under OUTPUT/_cache/<generator>/<prompt version>/: a rerun never
    pays for a request twice. One small JSON object per entry, written as soon as the reply arrives."""

    def __init__(self, output: str, generator_name: str):
        self.prefix = join(output, "_cache", cache_namespace(generator_name))
        self.fs, self.root = filesystem_for(self.prefix)

    @staticmethod
    def _name(origin_key: str, level: int) -> str:
        return hashlib.sha256(f"{origin_key}|{level}".encode()).hexdigest()[:40] + ".json"

    def get(self, origin_key: str, level: int) -> list[str] | None:
        try:
            with self.fs.open_input_stream(f"{self.root}/{self._name(origin_key, level)}") as f:
                return json.loads(f.read())["texts"]
        except (FileNotFoundError, OSError, ValueError, KeyError):
            return None

    def put(self, origin_key: str, level: int, texts: list[str], usage: tuple[int, int]) -> None:
        write_json(join(self.prefix, self._name(origin_key, level)),
                   {"texts": texts, "input_tokens": usage[0], "output_tokens": usage[1]})
