"""The Ray side of UniFilter-on-Ray (docs/ARCHITECTURE.md), one subpackage per part, dependencies pointing one way:

    io  <-  commit  <-  runner  <-  scoring, synth, curation      (no job imports another)
    encoded  <-  scoring, training                                 (training never imports scoring)

`io` reads and writes (shard listing, filesystems, readers, atomic writes); `commit` is the commit protocol (markers,
committer, manifest, identity, lease); `runner` is the one shape of a shard job (stages, the job interface,
execution, the summary); `scoring`, `synth` and `curation` are the jobs; `training` trains on Ray Train. `errors`
holds the pipeline's exceptions; `encoded` the encoded-sample format scoring and training share. No argument
parsing here (that is `jobs/`)."""
