"""The one shape of every shard job: stages with a lifecycle (`stage`), the job interface (`job`), surveying and
claiming the output (`prepare`), running the stages on Ray Data and committing (`execute`), the summary shell
(`summary`), what a job asks of the cluster (`resources`), connecting to Ray (`cluster`), and every use of Ray's
private APIs (`ray_compat`). `run_job` is the one way a job runs."""

from pipeline.runner.job import Job, JobSpec, Plan, PreparedJob, RunResult
from pipeline.runner.run import dry_run, run_job
from pipeline.runner.stage import Resources, ShardStage, Stage, StageActor, TableStage
from pipeline.runner.summary import exit_status, format_summary

__all__ = ["Job", "JobSpec", "Plan", "PreparedJob", "Resources", "RunResult", "ShardStage", "Stage", "StageActor",
           "TableStage", "dry_run", "exit_status", "format_summary", "run_job"]
