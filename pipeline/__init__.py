"""The Ray side of UniFilter-on-Ray (docs/ARCHITECTURE.md): the one shard-job runner and the jobs built on it
(scoring, synthetic training pairs, curation), training on Ray Train, and what they share (readers, the commit
protocol, the output's lease and identity).

Each module exposes one or two functions a job calls; helpers stay private. No argument parsing here."""
