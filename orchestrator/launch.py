"""Launching work on Ray: searches as Ray Train runs, evaluations as parallel Ray Tune trials."""

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, UserCallback
from ray.train.torch import TorchConfig, TorchTrainer

from orchestrator.latency_cache import StoredSurrogate, record_search_surrogate
from orchestrator.plan import EvalTask, SearchTask
from orchestrator.spec import JobSpec, RaySpec
from orchestrator.tracking import TAG_ERROR, Tracker
from search_spaces.errors import UnasError
from workers.context import RunContext, configure_worker_logging
from search_spaces.darts.counting import count_params_m
from workers.evaluate import EvalOutcome, evaluation_worker, run_evaluation
from workers.config import SearchConfig
from workers.genotype_spaces import GenotypeSpace
from workers.proxyless_search import (
    SURROGATE_FILE,
    SURROGATE_SOURCE_METRIC,
    ProxylessSearchConfig,
    proxyless_search_worker,
)
from workers.search import GENOTYPE_FILE, search_worker

logger = logging.getLogger(__name__)


class LaunchError(UnasError):
    """A search or evaluation that failed on Ray."""

    exit_status = 1


def init_ray(config: RaySpec) -> None:
    """Connects to a cluster when an address is given (or set by `ray job submit`), else starts one."""
    if ray.is_initialized():
        return
    address = config.address or os.environ.get("RAY_ADDRESS")
    if address:
        logger.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
        return
    logger.info("starting a local Ray runtime")
    ray.init(address="local", num_cpus=config.num_cpus, num_gpus=config.num_gpus, include_dashboard=False,
             log_to_driver=True)


class ResourceError(UnasError):
    """A resource request that no node of the cluster can ever satisfy."""


def _resource_requests(spec: JobSpec) -> list[tuple[str, float, float, int]]:
    """(field, CPUs, GPUs, how many at once) of each kind of Ray worker the job starts."""
    requests = []
    if spec.search is not None:
        resources = spec.search.worker_resources
        requests.append(("search.worker_resources", resources.cpus, resources.gpus, spec.search.workers))
    if spec.evaluate is not None:
        resources, workers = spec.evaluate.trial_resources, spec.evaluate.workers
        requests.append(("evaluate.trial_resources", resources.cpus / workers, resources.gpus / workers, workers))
    return requests


def check_cluster_fits(spec: JobSpec) -> None:
    """Rejects requests larger than every node (or than the cluster) before any work starts."""
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    largest_cpus = max((node.get("CPU", 0.0) for node in nodes), default=0.0)
    largest_gpus = max((node.get("GPU", 0.0) for node in nodes), default=0.0)
    total_cpus = sum(node.get("CPU", 0.0) for node in nodes)
    total_gpus = sum(node.get("GPU", 0.0) for node in nodes)
    for field, cpus, gpus, count in _resource_requests(spec):
        if not any(node.get("CPU", 0.0) >= cpus and node.get("GPU", 0.0) >= gpus for node in nodes):
            raise ResourceError(f"{field}: {cpus:g} CPU and {gpus:g} GPU per worker, but the largest node has "
                                f"{largest_cpus:g} CPU and {largest_gpus:g} GPU; lower the request or add such nodes")
        if cpus * count > total_cpus or gpus * count > total_gpus:
            raise ResourceError(f"{field}: {count} workers of {cpus:g} CPU and {gpus:g} GPU need more than the "
                                f"cluster's {total_cpus:g} CPU and {total_gpus:g} GPU; lower search.workers or the "
                                "per-worker resources")


class MlflowReportCallback(UserCallback):
    """Forwards rank 0's per-epoch metrics of a Train run to its MLflow run (on the controller)."""

    def __init__(self, tracker: Tracker, run_id: str, label: str, space: GenotypeSpace | None = None):
        self.tracker = tracker
        self.run_id = run_id
        self.label = label
        self.space = space  # the space that parses and draws the genotypes epochs report, or None for no drawings

    def _log_genotype(self, genotype_json: str, epoch: int) -> None:
        """Logs the current genotype of the search as JSON and, where its space has drawings, as a drawing."""
        self.tracker.log_text(self.run_id, genotype_json, f"genotypes/epoch_{epoch:04d}.json")
        if self.space is None or not self.space.can_draw:
            return
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / f"epoch_{epoch:04d}.png"
            self.space.draw_genotype(self.space.parse_genotype(genotype_json), path)
            self.tracker.log_artifact(self.run_id, path, "genotypes")

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if not metrics:
            return
        epoch_metrics = metrics[0]
        epoch = int(epoch_metrics.get("epoch", 0))
        self.tracker.log_metrics(self.run_id, epoch_metrics, step=epoch)
        if "genotype" in epoch_metrics:
            self._log_genotype(epoch_metrics["genotype"], epoch)
        logger.info("%s: epoch %d, train_acc %.3f, entropy %.2f", self.label, epoch,
                    epoch_metrics.get("train_acc", float("nan")), epoch_metrics.get("entropy", float("nan")))


def run_search_task(task: SearchTask, spec: JobSpec, config: SearchConfig | ProxylessSearchConfig, tracker: Tracker,
                    run_id: str, output_dir: Path,
                    fetched_surrogates: dict[str, StoredSurrogate] | None = None) -> Any:
    """Runs (or resumes) one search with the worker config ``config`` as a Ray Train run and returns its genotype.

    ``fetched_surrogates`` are the latency surrogates that the driver put in the proxyless
    search's cache folder, by device key.
    """
    search = spec.search
    space = spec.genotype_space()
    use_gpu = search.worker_resources.gpus > 0
    resources = {"CPU": search.worker_resources.cpus}
    if use_gpu:
        resources["GPU"] = search.worker_resources.gpus
    worker = proxyless_search_worker if search.space == "proxyless" else search_worker
    trainer = TorchTrainer(
        worker,
        train_loop_config={"search": config, "data": spec.data_config()},
        scaling_config=ScalingConfig(num_workers=search.workers, use_gpu=use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=f"{spec.job_id()}-{task.key}",
            storage_path=str((output_dir / "ray").resolve()),
            failure_config=FailureConfig(max_failures=search.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=[MlflowReportCallback(tracker, run_id, task.key, space)],
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise LaunchError(f"search {task.key} failed: {describe_error(result.error)}")
    with result.checkpoint.as_directory() as folder:
        surrogate = Path(folder) / SURROGATE_FILE
        if surrogate.is_file():
            # Stored per device, so later jobs on the same device reuse the surrogate.
            record_search_surrogate(tracker, run_id, surrogate, result.metrics.get(SURROGATE_SOURCE_METRIC),
                                    fetched_surrogates or {})
        return space.parse_genotype((Path(folder) / GENOTYPE_FILE).read_text())


@dataclass(frozen=True)
class TrialSetup:
    """Inputs shared by every evaluation trial, shipped once through tune.with_parameters."""

    spec: JobSpec
    tasks: list[EvalTask]
    run_ids: list[str]
    tracker: Tracker
    checkpoint_root: str


def evaluation_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """A Tune function trial: trains one genotype's network, logs it to its MLflow run and marks the run done."""
    import torch

    configure_worker_logging()
    torch.set_num_threads(max(1, int(setup.spec.evaluate.trial_resources.cpus)))
    index = config["task_index"]
    task, run_id, tracker = setup.tasks[index], setup.run_ids[index], setup.tracker
    recipe = setup.spec.eval_recipe(task.train_seed, task.genotype)

    def report(metrics: dict[str, Any]) -> None:
        tracker.log_metrics(run_id, metrics, step=int(metrics["epoch"]))
        tune.report({key: value for key, value in metrics.items() if isinstance(value, int | float)})

    tracker.client.update_run(run_id, status="RUNNING")  # a retried trial reopens its run
    started = time.time()
    try:
        if setup.spec.evaluate.workers > 1:
            outcome = _run_evaluation_group(setup, task, run_id, recipe)
        else:
            context = RunContext(Path(setup.checkpoint_root) / task.key, on_report=report)
            outcome = run_evaluation(task.genotype, recipe, setup.spec.data_config(), context,
                                     build_network=setup.spec.genotype_space().build_network)
    except BaseException as error:
        tracker.set_tags(run_id, {TAG_ERROR: f"{type(error).__name__}: {error}"[:4000]})
        tracker.finish(run_id, "FAILED")
        raise
    wall_time_s = time.time() - started
    gpus = setup.spec.evaluate.trial_resources.gpus
    tracker.log_metrics(run_id, {"final_test_error": outcome.test_error, "final_min_test_error": outcome.min_test_error,
                                 "params_m": outcome.params_m, "wall_time_s": wall_time_s,
                                 "trial_started_unix_s": started, "trial_finished_unix_s": time.time(),
                                 "device_hours": wall_time_s / 3600 * max(gpus, 1.0),
                                 "gpu_days": wall_time_s / 86400 * gpus}, step=outcome.epochs)
    tracker.finish(run_id)


def _run_evaluation_group(setup: TrialSetup, task: EvalTask, run_id: str, recipe) -> EvalOutcome:
    """Runs one evaluation as a Ray Train worker group inside the trial's resources."""
    from ray.tune.integration.ray_train import TuneReportCallback

    evaluate = setup.spec.evaluate
    workers = evaluate.workers
    use_gpu = evaluate.trial_resources.gpus > 0
    space = setup.spec.genotype_space()
    per_worker = {"CPU": evaluate.trial_resources.cpus / workers}
    if use_gpu:
        per_worker["GPU"] = evaluate.trial_resources.gpus / workers
    trainer = TorchTrainer(
        evaluation_worker,
        train_loop_config={"genotype": task.genotype.to_json(), "space": space, "recipe": recipe,
                           "data": setup.spec.data_config()},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=per_worker),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=f"{setup.spec.job_id()}-{task.key}",
            storage_path=str(Path(setup.checkpoint_root).parent / "ray"),
            failure_config=FailureConfig(max_failures=1),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=[MlflowReportCallback(setup.tracker, run_id, task.key), TuneReportCallback()],
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise LaunchError(f"evaluation {task.key} failed: {describe_error(result.error)}")
    metrics = result.metrics
    network = space.build_network(task.genotype, recipe, setup.spec.data_config())
    return EvalOutcome(test_error=metrics["test_error"], min_test_error=metrics["min_test_error"],
                       params_m=count_params_m(network), epochs=int(metrics["epoch"]))


def _trial_resources(spec: JobSpec) -> dict[str, float]:
    """Returns a trial's resources; a trial that starts a worker group only coordinates it, so the group takes the real resources."""
    resources = spec.evaluate.trial_resources
    if spec.evaluate.workers > 1:
        return {"cpu": 0.01, "gpu": 0}
    return {"cpu": resources.cpus, "gpu": resources.gpus}


def run_evaluation_trials(spec: JobSpec, tasks: list[EvalTask], run_ids: list[str], tracker: Tracker,
                          output_dir: Path) -> dict[str, str | None]:
    """Runs the tasks as parallel Tune trials; returns each task key's error message (None: finished)."""
    if not tasks:
        return {}
    setup = TrialSetup(spec, tasks, run_ids, tracker, str((output_dir / "checkpoints").resolve()))
    trainable = tune.with_resources(tune.with_parameters(evaluation_trial, setup=setup), _trial_resources(spec))
    tuner = tune.Tuner(
        trainable,
        param_space={"task_index": tune.grid_search(list(range(len(tasks))))},
        tune_config=tune.TuneConfig(max_concurrent_trials=spec.evaluate.max_concurrent),
        run_config=tune.RunConfig(name=f"{spec.job_id()}-evaluate-{int(time.time())}",
                                  storage_path=str((output_dir / "ray").resolve()), verbose=1,
                                  failure_config=tune.FailureConfig(max_failures=1)),
    )
    results = tuner.fit()
    errors: dict[str, str | None] = {task.key: None for task in tasks}
    for result in results:
        if result.error is not None:
            errors[tasks[result.config["task_index"]].key] = describe_error(result.error)
    return errors


def describe_error(error: BaseException) -> str:
    """'Type: message' of the exception a Ray actor raised, without Ray's wrapper header."""
    cause = getattr(error, "cause", None) or error
    return f"{type(cause).__name__}: {cause}".splitlines()[0]

