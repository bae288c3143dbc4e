"""Compare two scorings of one corpus: `python -m jobs.compare A B --output DIR [--keep-fraction F | --sweep ...]`.

A and B are two scoring outputs over the same corpus (refused, naming why, when their inputs differ). Writes
`DIR/compare.json` (Spearman and Kendall per kind and per source, the kept-set overlap at each fraction, the counts)
and `DIR/index.html`. `--dry-run` prints the counts and the agreement, writing nothing. Nothing is rescored.
Exit status: 0 when written, 2 on bad configuration or outputs that cannot be compared.
"""

from __future__ import annotations

import sys

from pydantic import BaseModel, ConfigDict, Field, model_validator

from jobs._config import Command, entry, parse

COMMAND = Command("jobs.compare", __doc__, dry_run="match the two outputs and print the summary lines; write nothing")


class CompareConfig(BaseModel):
    """`python -m jobs.compare`: every field is a YAML key and a `--flag` (A and B may also come first, bare)."""

    model_config = ConfigDict(extra="forbid")

    a: str = Field(description="the first scoring output (its committed records are read)")
    b: str = Field(description="the second scoring output, over the same corpus")
    output: str | None = Field(None, description="where compare.json and index.html go (required unless --dry-run)")
    keep_fraction: float | None = Field(None, gt=0, le=1, description="the fraction kept at which to compare the "
                                                                        "kept sets (default: a standard sweep)")
    sweep: list[float] | None = Field(None, description="the fractions kept at which to compare the kept sets")

    @model_validator(mode="after")
    def _check(self):
        from pipeline.io.uris import normalize_uri

        if self.keep_fraction is not None and self.sweep is not None:
            raise ValueError("set at most one of field 'keep_fraction' and field 'sweep'")
        if self.sweep is not None and (not self.sweep or not all(0 < f <= 1 for f in self.sweep)):
            raise ValueError("field 'sweep': fractions lie in (0, 1], at least one")
        if self.output is not None and normalize_uri(self.output) in (normalize_uri(self.a), normalize_uri(self.b)):
            raise ValueError(f"field 'output': {self.output} is one of the outputs compared; give another folder")
        return self

    def fractions(self) -> list[float]:
        from pipeline.curation.compare import DEFAULT_FRACTIONS

        if self.keep_fraction is not None:
            return [self.keep_fraction]
        return sorted(set(self.sweep or DEFAULT_FRACTIONS))


def _flags(argv: list[str]) -> list[str]:
    """`A B --output DIR`: the two bare leading arguments are `--a A --b B`."""
    bare = []
    for arg in argv:
        if arg.startswith("-") or len(bare) == 2:
            break
        bare.append(arg)
    return [*(["--a", bare[0]] if bare else []), *(["--b", bare[1]] if len(bare) > 1 else []), *argv[len(bare):]]


def run(argv: list[str] | None = None) -> int:
    from pipeline.errors import ConfigError

    argv = _flags(sys.argv[1:] if argv is None else list(argv))
    invocation = parse(CompareConfig, argv, COMMAND)
    config = invocation.config
    from pipeline.curation import compare

    if invocation.dry_run:
        matched = compare.match(config.a, config.b)
        result = compare.compare(matched, config.fractions())
    else:
        if config.output is None:
            raise ConfigError("field 'output': required (where compare.json and index.html go), or use --dry-run")
        from pipeline.runner.prepare import check_writable

        check_writable(config.output, create=False)  # nothing is created before the outputs are matched
        result = compare.write_comparison(config.a, config.b, config.output, config.fractions())
    print(compare.summary_text(result))
    if not invocation.dry_run:
        print(f"wrote {config.output.rstrip('/')}/compare.json and index.html")
    return 0


def main(argv: list[str] | None = None) -> int:
    return entry(lambda: run(argv), argv)


if __name__ == "__main__":
    sys.exit(main())
