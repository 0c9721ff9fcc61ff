"""`unas report`: the results table of a finished or partial job, from its MLflow runs alone."""

from pathlib import Path

from orchestrator.tables import (
    build_cells_table,
    build_results_table,
    fetch_job_runs,
    format_cells_markdown,
    format_markdown,
)
from orchestrator.tracking import TAG_JOB_ID, TAG_STAGE, Tracker, TrackingError, default_tracking_uri
from search_spaces.errors import UnasError


def build_report(output: str | None = None, tracking_uri: str | None = None, job: str | None = None) -> str:
    """Markdown tables of every job recorded in the store (or of the named job's experiment)."""
    if output is None and tracking_uri is None:
        raise UnasError("report: give --output DIR (a job's output folder) or --tracking-uri URI with --job NAME")
    if output is not None:
        database = Path(output) / "mlflow.db"
        if not database.is_file():
            raise UnasError(f"--output: {output!r} contains no mlflow.db; give the output folder of a job")
        tracking_uri = tracking_uri or default_tracking_uri(Path(output))
    experiment = job or _only_experiment(tracking_uri)
    tracker = Tracker(tracking_uri, experiment)
    if tracker.client.get_experiment_by_name(experiment) is None:
        raise TrackingError(f"--job: no experiment named {experiment!r} in {tracking_uri}")
    tracker.open()
    parents = tracker.client.search_runs([tracker.experiment_id], filter_string=f"tags.`{TAG_STAGE}` = 'job'")
    sections = []
    for parent in parents:
        job_id = parent.data.tags[TAG_JOB_ID]
        runs = fetch_job_runs(tracker, job_id)
        tables = format_markdown(build_results_table(runs)) + "\n" + format_cells_markdown(build_cells_table(runs))
        sections.append(f"Job {parent.info.run_name} (id {job_id}, {parent.info.status})\n\n{tables}")
    return "\n".join(sections) if sections else f"no jobs recorded in experiment {experiment!r}"


def _only_experiment(tracking_uri: str) -> str:
    from mlflow.tracking import MlflowClient

    names = [e.name for e in MlflowClient(tracking_uri).search_experiments() if e.name != "Default"]
    if len(names) != 1:
        raise UnasError(f"--job: the store contains {len(names)} job experiments ({', '.join(names) or 'none'}); "
                        "name one with --job")
    return names[0]
