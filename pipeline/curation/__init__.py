"""Curation: from committed score records to a curated corpus (`CurationJob`, `curate`: what `python -m jobs.curate`
runs): exact thresholds on Ray Data (`thresholds`), per-shard selection (`select`), the kept samples written back in
the input's format (`materialize`), and the HTML report (`report_data`, `report_html`)."""

from pipeline.curation.config import CurateConfig
from pipeline.curation.job import CurationJob, curate
from pipeline.curation.select import SELECTED_SCHEMA

__all__ = ["SELECTED_SCHEMA", "CurateConfig", "CurationJob", "curate"]
