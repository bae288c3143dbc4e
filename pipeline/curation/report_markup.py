"""The report's markup primitives, shared by the page (`report_html`) and its sections (`report_sections`): untrusted
text escaped, numbers and shares formatted, the colours of kept, dropped and the threshold, bytes as `data:` URIs.
It imports no other part of the report."""

from __future__ import annotations

import base64
import html
import math
import re

# Histogram colours (distinct from the corpus' drawn shapes, so a screenshot can tell them apart).
KEPT_COLOR = "#1b9e77"  # bins at or above the threshold
DROPPED_COLOR = "#9aa4b1"  # bins below it
THRESHOLD_COLOR = "#d1006f"

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def esc(value: object, limit: int | None = None) -> str:
    """Untrusted value -> HTML text: cut to `limit` characters (with an ellipsis), control characters dropped,
    lone surrogates replaced, then `html.escape` (quotes too, so it is safe in attributes as well)."""
    text = "" if value is None else str(value)
    text = _CONTROL.sub("", text).encode("utf-8", "replace").decode("utf-8")
    if limit is not None and len(text) > limit:
        text = text[:limit].rstrip() + "\u2026"
    return html.escape(text, quote=True)


def num(value: float | None, digits: int = 3) -> str:
    """A number to `digits` decimals; a dash for anything missing or not finite."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "\u2014"
    return f"{value:.{digits}f}" if math.isfinite(value) else "\u2014"


def pct(part: int, whole: int) -> str:
    """`part` as a percentage of `whole` (one decimal); a dash when `whole` is 0."""
    return f"{100.0 * part / whole:.1f}%" if whole else "\u2014"


def data_uri(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
