"""Ray stages of UniFilter-on-Ray: sources, preprocessing, scoring, sinks (and, later, synth, training, curation).

Each module exposes one or two functions a job calls; helpers stay private. No argument parsing here."""
