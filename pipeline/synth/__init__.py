"""Semi-synthetic training pairs: real images and documents with text generated at the four quality levels
(`SynthJob`, `synthesize`: what `python -m jobs.synth` runs), by the offline generator, an OpenAI-compatible
endpoint or Claude on Bedrock (`pipeline.synth.generators`), with a request cache (`pipeline.synth.cache`)."""

from pipeline.synth.cache import RequestCache
from pipeline.synth.config import PAIR_SCHEMA, SynthConfig, split_key, split_of
from pipeline.synth.job import SynthJob, synthesize

__all__ = ["PAIR_SCHEMA", "RequestCache", "SynthConfig", "SynthJob", "split_key", "split_of", "synthesize"]
