"""Reading and writing: URIs and filesystems (`uris`), listing a job's input shards (`listing`), opening a shard
with the line between a fault and bad data drawn once (`files`), the readers of every input format into the one
sample schema (`samples`, `tar`, `parquet`), a look at a first shard before a job starts (`sniff`), counting
samples from metadata (`counting`), and the one atomic write helper everything publishes through (`publish`)."""

from pipeline.io.listing import Shard, ShardListing, list_shards, output_name
from pipeline.io.publish import publish_file, read_json, write_bytes, write_json, write_with_retries
from pipeline.io.samples import SAMPLE_SCHEMA, Format, SourceOptions, read_samples, sample_kind
from pipeline.io.uris import filesystem_for, join, normalize_uri, storage_env

__all__ = ["SAMPLE_SCHEMA", "Format", "Shard", "ShardListing", "SourceOptions", "filesystem_for", "join",
           "list_shards", "normalize_uri", "output_name", "publish_file", "read_json", "read_samples", "sample_kind",
           "storage_env", "write_bytes", "write_json", "write_with_retries"]
