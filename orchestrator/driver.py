"""The job driver: validate, plan, search, evaluate, summarise; resumable at every stage.

Finished tasks (MLflow runs in FINISHED state) are reused; unfinished ones continue from
their checkpoints; runs are looked up by tag before any is created.
"""

import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.launch import (
    check_cluster_fits,
    describe_error,
    init_ray,
    run_evaluation_trials,
    run_search_task,
)
from orchestrator.latency_cache import StoredSurrogate, prepare_surrogate_cache
from orchestrator.plan import (
    GROUP_FOUND,
    STAGE_EVALUATE,
    STAGE_SEARCH,
    EvalTask,
    SearchTask,
    plan_evaluations,
    plan_searches,
)
from orchestrator.spec import JobSpec
from orchestrator.tables import (
    build_cells_table,
    build_results_table,
    fetch_job_runs,
    format_cells_markdown,
    format_markdown,
    write_tables,
)
from orchestrator.tracking import (
    TAG_ERROR,
    TAG_GROUP,
    TAG_JOB_ID,
    TAG_JOB_NAME,
    TAG_KEY,
    TAG_LABEL,
    TAG_METHOD,
    TAG_PARENT,
    TAG_SEED,
    TAG_SOURCE_KEY,
    TAG_SOURCE_RUN,
    TAG_SPACE,
    TAG_STAGE,
    Tracker,
    default_tracking_uri,
    genotype_artifact_json,
    is_finished,
    provenance_tags,
)
from search_spaces.errors import UnasError
from workers.config import SearchConfig
from workers.data import check_data_available
from workers.genotype_spaces import GenotypeSpace
from workers.proxyless_search import ProxylessSearchConfig

logger = logging.getLogger(__name__)

GENOTYPE_ARTIFACT = "genotype.json"
GENOTYPE_DRAWING = "genotype.png"


@dataclass
class JobResult:
    job_id: str
    parent_run_id: str
    table_markdown: str
    failed: dict[str, str] = field(default_factory=dict)


def resolve_output_dir(spec: JobSpec, output: str | None) -> Path:
    return Path(output or Path("runs") / spec.name).resolve()


def prepare_output_dir(output_dir: Path) -> None:
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise UnasError(f"--output: cannot write to {str(output_dir)!r} ({error.strerror}); "
                        "choose a writable folder") from None


def open_tracker(spec: JobSpec, output_dir: Path, tracking_uri: str | None) -> Tracker:
    uri = tracking_uri or spec.tracking.uri or default_tracking_uri(output_dir)
    return Tracker(uri, spec.tracking.experiment or spec.name, output_dir / "mlartifacts").open()


def run_job(spec: JobSpec, output_dir: Path, tracking_uri: str | None = None) -> JobResult:
    """Runs (or resumes) a validated job and returns its summary table."""
    check_data_available(spec.data_config())
    prepare_output_dir(output_dir)
    tracker = open_tracker(spec, output_dir, tracking_uri)
    init_ray(spec.ray)
    check_cluster_fits(spec)
    job_id = spec.job_id()
    parent_id = _open_parent_run(tracker, spec, job_id)
    logger.info("job %s (id %s): output in %s, MLflow at %s", spec.name, job_id, output_dir, tracker.tracking_uri)

    failed: dict[str, str] = {}
    try:
        found = _run_searches(spec, tracker, parent_id, output_dir, failed)
        eval_tasks = plan_evaluations(spec, found)
        _run_evaluations(spec, eval_tasks, found, tracker, parent_id, output_dir, failed)
    except BaseException:
        # Stopped or crashed: no run of this job may stay RUNNING; a resubmission reopens them.
        _close_open_runs(tracker, job_id)
        raise
    return _summarise_job(tracker, job_id, parent_id, output_dir, failed)


def _close_open_runs(tracker: Tracker, job_id: str) -> None:
    for run in tracker.runs_of_job(job_id):
        if run.info.status == "RUNNING":
            tracker.finish(run.info.run_id, "KILLED")


def _summarise_job(tracker: Tracker, job_id: str, parent_id: str, output_dir: Path, failed: dict[str, str]) -> JobResult:
    runs = fetch_job_runs(tracker, job_id)
    table, cells = build_results_table(runs), build_cells_table(runs)
    _log_found_accuracy(tracker, parent_id, cells)
    markdown = format_markdown(table) + "\n" + format_cells_markdown(cells)
    for path in write_tables(table, cells, output_dir / "tables"):
        tracker.log_artifact(parent_id, path, "tables")
    tracker.finish(parent_id, "FAILED" if failed else "FINISHED")
    return JobResult(job_id, parent_id, markdown, failed)


def _log_found_accuracy(tracker: Tracker, parent_id: str, cells) -> None:
    """Puts each found cell's final test accuracy in the log and on the parent run."""
    found = cells[(cells["group"] == GROUP_FOUND) & cells["test_accuracy_pct"].notna()]
    for row in found.itertuples(index=False):
        logger.info("found cell %s: test accuracy %.2f%%", row.key, row.test_accuracy_pct)
    if len(found):
        tracker.log_metrics(parent_id, {"found_test_accuracy_pct": float(found["test_accuracy_pct"].mean())})


def _open_parent_run(tracker: Tracker, spec: JobSpec, job_id: str) -> str:
    run_id, status = tracker.find_or_create_run(spec.name, {TAG_JOB_ID: job_id, TAG_STAGE: "job"})
    tracker.set_tags(run_id, {TAG_JOB_NAME: spec.name, "unas.spec_hash": job_id, **provenance_tags()})
    if status == "NEW":
        tracker.log_text(run_id, spec.model_dump_json(indent=1), "spec.json")
    else:
        logger.info("resuming job %s (parent run %s was %s)", job_id, run_id, status)
    return run_id


def _child_tags(job_id: str, parent_id: str, stage: str, key: str) -> dict[str, str]:
    return {TAG_JOB_ID: job_id, TAG_STAGE: stage, TAG_KEY: key, TAG_PARENT: parent_id}


def _run_searches(spec: JobSpec, tracker: Tracker, parent_id: str, output_dir: Path,
                  failed: dict[str, str]) -> dict[SearchTask, Any]:
    found: dict[SearchTask, Any] = {}
    for task in plan_searches(spec):
        run_id, status = tracker.find_or_create_run(task.key, _child_tags(spec.job_id(), parent_id, STAGE_SEARCH, task.key))
        if is_finished(status):
            found[task] = _load_run_genotype(tracker, run_id, spec.genotype_space())
            logger.info("%s: reusing the finished search run %s", task.key, run_id)
            continue
        tracker.set_tags(run_id, {TAG_METHOD: task.method, TAG_SEED: task.seed, TAG_SPACE: spec.search.space})
        config, fetched = _search_worker_config(spec, task, tracker, output_dir)
        tracker.log_params(run_id, {**vars(config), "workers": spec.search.workers})
        logger.info("%s: starting the search (Ray Train, %d worker(s))", task.key, spec.search.workers)
        started = time.time()
        try:
            genotype = run_search_task(task, spec, config, tracker, run_id, output_dir, fetched)
        except Exception as error:  # one failed search must not stop the others
            logger.error("%s failed: %s", task.key, error)
            failed[task.key] = describe_error(error)
            tracker.set_tags(run_id, {TAG_ERROR: f"{type(error).__name__}: {error}"[:4000]})
            tracker.finish(run_id, "FAILED")
            continue
        _finish_search_run(spec, tracker, run_id, genotype, time.time() - started)
        found[task] = genotype
        logger.info("%s found:\n%s", task.key, genotype.describe())
    return found


def _search_worker_config(spec: JobSpec, task: SearchTask, tracker: Tracker,
                          output_dir: Path) -> tuple[SearchConfig | ProxylessSearchConfig, dict[str, StoredSurrogate]]:
    """Return a search's worker config and, for the proxyless space, the stored surrogates put in its cache folder."""
    config = spec.search_config(task.method, task.seed)
    if spec.search.space != "proxyless":
        return config, {}
    return prepare_surrogate_cache(config, spec.data_config(), tracker, output_dir)


def _finish_search_run(spec: JobSpec, tracker: Tracker, run_id: str, genotype: Any, wall_time_s: float) -> None:
    gpus = spec.search.workers * spec.search.worker_resources.gpus
    _log_genotype(tracker, run_id, genotype, spec.genotype_space())
    tracker.log_metrics(run_id, {"wall_time_s": wall_time_s, "gpus": gpus, "gpu_days": wall_time_s * gpus / 86400})
    tracker.finish(run_id)


def _log_genotype(tracker: Tracker, run_id: str, genotype: Any, space: GenotypeSpace) -> None:
    """Logs the genotype as JSON and, where its space has drawings (DARTS cells), as a drawing."""
    tracker.log_text(run_id, genotype_artifact_json(genotype), GENOTYPE_ARTIFACT)
    if not space.can_draw:
        return
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / GENOTYPE_DRAWING
        space.draw_genotype(genotype, path)
        tracker.log_artifact(run_id, path)


def _load_run_genotype(tracker: Tracker, run_id: str, space: GenotypeSpace) -> Any:
    local_path = tracker.client.download_artifacts(run_id, GENOTYPE_ARTIFACT)
    return space.parse_genotype(Path(local_path).read_text())


def _run_evaluations(spec: JobSpec, tasks: list[EvalTask], found: dict[SearchTask, Any], tracker: Tracker,
                     parent_id: str, output_dir: Path, failed: dict[str, str]) -> None:
    search_runs = {task.key: tracker.find_run({TAG_JOB_ID: spec.job_id(), TAG_KEY: task.key}) for task in found}
    pending, run_ids = [], []
    for task in tasks:
        run_id, status = tracker.find_or_create_run(task.key, _child_tags(spec.job_id(), parent_id, STAGE_EVALUATE, task.key))
        if is_finished(status):
            logger.info("%s: reusing the finished evaluation run %s", task.key, run_id)
            continue
        if status == "NEW":
            _describe_eval_run(spec, task, tracker, run_id, search_runs)
        pending.append(task)
        run_ids.append(run_id)
    logger.info("evaluating %d genotype(s) as Ray Tune trials (%d already finished)", len(pending),
                len(tasks) - len(pending))
    errors = run_evaluation_trials(spec, pending, run_ids, tracker, output_dir)
    for key, error in errors.items():
        if error is not None:
            failed[key] = error


def _describe_eval_run(spec: JobSpec, task: EvalTask, tracker: Tracker, run_id: str, search_runs: dict) -> None:
    space = spec.genotype_space()
    tags = {TAG_GROUP: task.group, TAG_LABEL: task.label, TAG_SEED: task.train_seed, TAG_SPACE: space.name}
    if task.source_key:
        tags[TAG_SOURCE_KEY] = task.source_key
        source = search_runs.get(task.source_key)
        if source is not None:
            tags[TAG_SOURCE_RUN] = source.info.run_id
    tracker.set_tags(run_id, tags)
    recipe = spec.eval_recipe(task.train_seed, task.genotype)
    tracker.log_params(run_id, space.run_params(recipe))
    _log_genotype(tracker, run_id, task.genotype, space)
    tracker.log_metrics(run_id, space.network_sizes(task.genotype, recipe, spec.data_config()))
