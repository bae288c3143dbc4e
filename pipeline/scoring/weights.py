"""The weights a scoring actor loaded are the ones the run's identity names (`model.digest`)."""

from __future__ import annotations

from pipeline.errors import CheckpointError


def check_weights(model_uri: str, model_id: str, expected: str | None) -> None:
    """A checkpoint rewritten in place while the job runs (or between an actor's restarts) never adds another
    model's scores to the output: the actor refuses to start."""
    from model.digest import weights_digest

    if expected is None:
        return
    found = weights_digest(model_uri, model_id.rsplit("@", 1)[-1] if "@" in model_id else None)
    if found != expected:
        raise CheckpointError(f"the weights at {model_uri} changed since the job started (digest {expected}, now "
                              f"{found}): their scores would mix with the earlier weights' in one output; score the "
                              "new weights into another output")
