"""The commit protocol, for any job: the marker rows that close each shard on the wire (`markers`), the committer
that writes a shard's records and then its commit record (`committer`), the manifest of commit records
(`manifest`), the output's identity (`identity`), the lease that gives one job at a time the output (`lease`), and
reading committed records back (`records`)."""

from pipeline.commit.committer import ErrorCounts, ShardCommitter
from pipeline.commit.identity import Claim, check_entries, check_identity, record_identity
from pipeline.commit.lease import Lease
from pipeline.commit.manifest import read_manifest
from pipeline.commit.markers import (
           MARKERS,
           SHARD_END,
           SHARD_FAILED,
           WIRE,
           end_marker,
           failed_marker,
           wire_schema,
)
from pipeline.commit.records import read_committed

__all__ = ["MARKERS", "SHARD_END", "SHARD_FAILED", "WIRE", "Claim", "ErrorCounts", "Lease", "ShardCommitter",
           "check_entries", "check_identity", "end_marker", "failed_marker", "read_committed", "read_manifest",
           "record_identity", "wire_schema"]
