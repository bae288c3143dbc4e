"""Text generators for the synthetic training data, behind one interface: `offline` (deterministic perturbations,
no network), `openai` (any OpenAI-compatible chat endpoint, e.g. vLLM) and `bedrock` (Claude through the Bedrock
Converse API). A generator turns one request (an origin sample and a target level) into text segments."""

from pipeline.synth.generators.base import (
    Generated,
    GenerationRequest,
    MalformedReply,
    Outcome,
    PermanentError,
    RetryableError,
    RetryPolicy,
    cache_namespace,
    generate_with_retries,
)
from pipeline.synth.generators.llm import BedrockGenerator, OpenAIGenerator
from pipeline.synth.generators.offline import OfflineGenerator

__all__ = ["BedrockGenerator", "Generated", "GenerationRequest", "MalformedReply", "OfflineGenerator",
           "OpenAIGenerator", "Outcome", "PermanentError", "RetryPolicy", "RetryableError", "cache_namespace",
           "generate_with_retries"]
