"""MLflow records of a job: one parent run, one child run per search and evaluation task.

Runs are found by stable tags (job id, task key) before any is created, so a resubmitted job
reuses its runs instead of duplicating them. The driver creates the store and the
experiment first: a fresh SQLite store opened by several processes at once can fail.
"""

import json
import logging
import math
import platform
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient

from search_spaces.errors import UnasError

logger = logging.getLogger(__name__)

TAG_JOB_ID = "unas.job_id"
TAG_JOB_NAME = "unas.job_name"
TAG_STAGE = "unas.stage"
TAG_KEY = "unas.key"
TAG_GROUP = "unas.group"
TAG_LABEL = "unas.label"
TAG_METHOD = "unas.method"
TAG_SEED = "unas.seed"
TAG_SOURCE_KEY = "unas.source_key"
TAG_SOURCE_RUN = "unas.source_run_id"
TAG_ERROR = "unas.error"
TAG_SPACE = "unas.space"  # the search space of a search or evaluation run's genotype: darts or proxyless
# Set on a proxyless search run once its latency surrogate artifact is logged, so later jobs find the run by them.
TAG_LATENCY_DEVICE = "unas.latency_device"
TAG_LATENCY_SETTING = "unas.latency_setting"
# "cached" or "fitted", and the run whose stored surrogate a cached one came from.
TAG_LATENCY_SURROGATE = "unas.latency_surrogate"
TAG_LATENCY_SOURCE_RUN = "unas.latency_source_run_id"

_PROBE_TIMEOUT_S = 10.0
TAG_PARENT = "mlflow.parentRunId"
TAG_RUN_NAME = "mlflow.runName"

_MAX_BATCH = 900  # below MLflow's 1000-entry log_batch limit


class TrackingError(UnasError):
    """The tracking store cannot be reached or used."""


def default_tracking_uri(output_dir: Path) -> str:
    return f"sqlite:///{(output_dir / 'mlflow.db').resolve()}"


class Tracker:
    """A thin, picklable handle on one experiment of one tracking store."""

    def __init__(self, tracking_uri: str, experiment_name: str, artifact_root: Path | None = None):
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.artifact_root = artifact_root
        self.experiment_id: str | None = None

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(self.tracking_uri)

    def open(self) -> "Tracker":
        """Creates the store and the experiment if needed; reports an unreachable store at start."""
        self._probe_server()
        try:
            experiment = self.client.get_experiment_by_name(self.experiment_name)
            if experiment is None:
                location = self.artifact_root.resolve().as_uri() if self.artifact_root else None
                self.experiment_id = self.client.create_experiment(self.experiment_name, artifact_location=location)
            else:
                self.experiment_id = experiment.experiment_id
        except Exception as error:  # MLflow raises many types for an unreachable or broken store
            raise TrackingError(f"tracking.uri: cannot use the MLflow store {self.tracking_uri!r}: {error}; "
                                "check the URI or start the tracking server") from error
        return self

    def _probe_server(self) -> None:
        """Checks an HTTP server's health quickly, since MLflow's own client retries an unreachable server for minutes."""
        if not self.tracking_uri.startswith(("http://", "https://")):
            return
        url = self.tracking_uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=_PROBE_TIMEOUT_S):
                return
        except (urllib.error.URLError, OSError) as error:
            raise TrackingError(f"tracking.uri: the MLflow server {self.tracking_uri!r} is unreachable ({error}); "
                                "start it or fix the URI") from None

    def find_run(self, tags: dict[str, str]):
        filters = " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())
        runs = self.client.search_runs([self.experiment_id], filter_string=filters, max_results=2)
        if len(runs) > 1:
            logger.warning("%d runs carry the tags %s; using the first", len(runs), tags)
        return runs[0] if runs else None

    def find_or_create_run(self, name: str, tags: dict[str, str]) -> tuple[str, str]:
        """Returns (run id, status before this call); a found unfinished run is marked RUNNING again."""
        run = self.find_run(tags)
        if run is not None:
            status = run.info.status
            if status != "FINISHED":
                self.client.update_run(run.info.run_id, status="RUNNING")
            return run.info.run_id, status
        run = self.client.create_run(self.experiment_id, tags={**tags, TAG_RUN_NAME: name}, run_name=name)
        return run.info.run_id, "NEW"

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        existing = self.client.get_run(run_id).data.params
        items = [Param(key, str(value)[:6000]) for key, value in params.items() if key not in existing]
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start:start + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, Any], step: int | None = None) -> None:
        timestamp = int(time.time() * 1000)
        items = [Metric(key, float(value), timestamp, step or 0) for key, value in metrics.items()
                 if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(float(value))]
        for start in range(0, len(items), _MAX_BATCH):
            self.client.log_batch(run_id, metrics=items[start:start + _MAX_BATCH])

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()])

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def search_store_runs(self, filter_string: str, order_by: list[str] | None = None) -> list:
        """Return the runs that match the filter in every active experiment of the store, page by page."""
        client = self.client
        experiments = _collect_pages(lambda token: client.search_experiments(page_token=token))
        experiment_ids = [experiment.experiment_id for experiment in experiments]
        if not experiment_ids:
            return []
        return _collect_pages(lambda token: client.search_runs(experiment_ids, filter_string, order_by=order_by,
                                                               page_token=token))

    def runs_of_job(self, job_id: str):
        return self.client.search_runs([self.experiment_id], filter_string=f"tags.`{TAG_JOB_ID}` = '{job_id}'",
                                       max_results=5000)


def _collect_pages(search_page) -> list:
    """Concatenate the pages of an MLflow search, where ``search_page(token)`` returns one PagedList."""
    items, token = [], None
    while True:
        page = search_page(token)
        items += list(page)
        token = page.token
        if not token:
            return items


def provenance_tags() -> dict[str, str]:
    """Returns the git commit and library versions, so every run records what produced it."""
    import mlflow
    import ray
    import torch

    tags = {"unas.python": platform.python_version(), "unas.torch": torch.__version__,
            "unas.ray": ray.__version__, "unas.mlflow": mlflow.__version__}
    commit = _git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def _git_commit() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def is_finished(status: str) -> bool:
    return status == RunStatus.to_string(RunStatus.FINISHED)


def genotype_artifact_json(genotype) -> str:
    return json.dumps(genotype.to_dict(), indent=1) + "\n"
