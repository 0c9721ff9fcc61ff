"""Faults and bad input on a real local Ray runtime and a real SQLite MLflow store."""

import time
from pathlib import Path

import pytest
import ray
import torch
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from e2e_helpers import REPO_ROOT, kill_once_after_epoch, raise_on_rank_one, run_cli, tiny_spec, write_spec
from orchestrator.launch import run_evaluation_trials
from orchestrator.plan import EvalTask
from orchestrator.spec import parse_spec
from orchestrator.tracking import Tracker
from search_spaces.darts import Edge, Genotype, SEARCH_OPS, random_genotype
from workers.config import DataConfig, SearchConfig
from workers.context import RunContext, load_checkpoint
from workers.search import run_search

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

SEARCH = SearchConfig(chs=4, layers=3, epochs=3, warmup_epochs=1, batch_size=128, weight_lr=3e-3, arch_lr=3e-2)
DATA = DataConfig(name="digits", validation_fraction=0.2)


@pytest.fixture(scope="module")
def local_ray():
    paths = f"{REPO_ROOT}:{REPO_ROOT / 'tests'}"
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2,
             runtime_env={"env_vars": {"PYTHONPATH": paths, "RAY_AUTH_MODE": "disabled"}})
    yield
    ray.shutdown()


def _final_logits(folder: Path) -> list[torch.Tensor]:
    state = load_checkpoint(folder)["distribution"]
    return [state[key] for key in sorted(state)]


def test_search_worker_killed_resumes_with_identical_logits(local_ray, tmp_path):
    torch.set_num_threads(1)
    try:
        uninterrupted = RunContext(tmp_path / "plain")
        run_search(SEARCH, DATA, uninterrupted)
    finally:
        torch.set_num_threads(2)
    marker = tmp_path / "killed"
    trainer = TorchTrainer(
        kill_once_after_epoch,
        train_loop_config={"search": SEARCH, "data": DATA, "kill_epoch": 2, "marker": str(marker)},
        scaling_config=ScalingConfig(num_workers=1),
        run_config=RunConfig(name="killed-search", storage_path=str(tmp_path / "ray"),
                             failure_config=FailureConfig(max_failures=2)),
    )
    result = trainer.fit()
    assert result.error is None
    assert marker.exists(), "the worker was never killed"
    assert result.metrics["epoch"] == 3
    with result.checkpoint.as_directory() as folder:
        recovered = _final_logits(Path(folder))
    with uninterrupted.latest_checkpoint() as folder:
        expected = _final_logits(folder)
    for got, want in zip(recovered, expected, strict=True):
        assert torch.equal(got, want)


def test_search_worker_raising_fails_run_within_a_minute(local_ray, tmp_path):
    raised_at = tmp_path / "raised_at"
    trainer = TorchTrainer(
        raise_on_rank_one,
        train_loop_config={"search": SEARCH, "data": DATA, "raised_at": str(raised_at)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name="raising-search", storage_path=str(tmp_path / "ray"),
                             failure_config=FailureConfig(max_failures=0)),
    )
    result = _fit_capturing_error(trainer)
    returned_at = time.time()
    assert result is not None
    assert "injected failure on rank 1" in result
    # Rank 0 is blocked in a gloo collective when rank 1 raises. Waiting for that collective's
    # timeout (30 minutes by default) would far exceed this bound.
    assert returned_at - float(raised_at.read_text()) < 60


def _fit_capturing_error(trainer) -> str | None:
    try:
        result = trainer.fit()
    except Exception as error:  # Train V2 raises the worker's error from fit()
        return str(error)
    return str(result.error) if result.error is not None else None


def _evaluation_setup(tmp_path: Path, tasks_count: int, trial_cpus: float, epochs: int):
    spec = parse_spec(tiny_spec("trials", random_cells=tasks_count, search=False, trial_cpus=trial_cpus,
                                eval_epochs=epochs) | {"evaluate": {
        **tiny_spec("trials", random_cells=tasks_count, search=False, trial_cpus=trial_cpus, eval_epochs=epochs)["evaluate"],
        "max_concurrent": 8}})
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "trials", tmp_path / "artifacts").open()
    tasks = [EvalTask("random", f"random-{i:02d}", random_genotype(i, SEARCH_OPS), 0) for i in range(tasks_count)]
    run_ids = [tracker.find_or_create_run(task.key, {"unas.key": task.key})[0] for task in tasks]
    return spec, tracker, tasks, run_ids


def test_evaluation_trial_raising_fails_alone_and_is_recorded(local_ray, tmp_path):
    spec, tracker, tasks, run_ids = _evaluation_setup(tmp_path, 3, 0.5, 2)
    broken_cell = tuple((Edge("no_such_op", 0), Edge("skip_connect", 1)) for _ in range(4))
    tasks[1] = EvalTask("random", "broken", Genotype(normal=broken_cell, reduce=broken_cell), 0)
    errors = run_evaluation_trials(spec, tasks, run_ids, tracker, tmp_path / "out")
    assert errors[tasks[0].key] is None
    assert errors[tasks[2].key] is None
    assert "no_such_op" in errors[tasks[1].key]
    broken_run = tracker.client.get_run(run_ids[1])
    assert broken_run.info.status == "FAILED"
    assert "no_such_op" in broken_run.data.tags["unas.error"]
    for index in (0, 2):
        assert tracker.client.get_run(run_ids[index]).info.status == "FINISHED"


def test_eight_concurrent_trials_keep_their_own_metrics(local_ray, tmp_path):
    epochs = 3
    spec, tracker, tasks, run_ids = _evaluation_setup(tmp_path, 8, 0.25, epochs)
    errors = run_evaluation_trials(spec, tasks, run_ids, tracker, tmp_path / "out")
    assert all(error is None for error in errors.values()), errors
    starts, ends = [], []
    for run_id in run_ids:
        run = tracker.client.get_run(run_id)
        assert run.info.status == "FINISHED"
        for key in ("train_loss", "test_acc", "lr", "test_error"):
            history = tracker.client.get_metric_history(run_id, key)
            assert sorted(metric.step for metric in history) == list(range(1, epochs + 1)), (run_id, key)
        starts.append(run.data.metrics["trial_started_unix_s"])
        ends.append(run.data.metrics["trial_finished_unix_s"])
    assert max(starts) < min(ends), "the 8 trials did not all run at once"


def test_four_one_cpu_trials_run_two_at_a_time(local_ray, tmp_path):
    spec, tracker, tasks, run_ids = _evaluation_setup(tmp_path, 4, 1.0, 2)
    errors = run_evaluation_trials(spec, tasks, run_ids, tracker, tmp_path / "out")
    assert all(error is None for error in errors.values()), errors
    events = []
    for run_id in run_ids:
        run = tracker.client.get_run(run_id)
        assert run.info.status == "FINISHED"
        events += [(run.data.metrics["trial_started_unix_s"], 1), (run.data.metrics["trial_finished_unix_s"], -1)]
    running, max_running = 0, 0
    for _, change in sorted(events, key=lambda event: (event[0], event[1])):
        running += change
        max_running = max(max_running, running)
    assert max_running == 2


def _cli_error(tmp_path: Path, spec: dict, *extra: str) -> tuple[int, str]:
    result = run_cli("run", str(write_spec(tmp_path, spec)), *extra, timeout_s=300)
    return result.returncode, result.stderr


def test_run_rejects_missing_data_folder(tmp_path):
    spec = tiny_spec("nodata", random_cells=1)
    spec["data"] = {"name": "cifar10", "root": str(tmp_path / "absent")}
    code, stderr = _cli_error(tmp_path, spec, "--output", str(tmp_path / "out"))
    assert code == 2
    assert "data.root" in stderr
    assert "absent" in stderr


def test_run_rejects_unwritable_output(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    code, stderr = _cli_error(tmp_path, tiny_spec("unwritable", random_cells=1), "--output", str(blocker / "out"))
    assert code == 2
    assert "--output" in stderr
    assert str(blocker) in stderr


def test_run_rejects_more_gpus_than_any_node(tmp_path):
    spec = tiny_spec("gpus", random_cells=1)
    spec["evaluate"]["trial_resources"] = {"cpus": 1, "gpus": 4}
    code, stderr = _cli_error(tmp_path, spec, "--output", str(tmp_path / "out"))
    assert code == 2
    assert "evaluate.trial_resources" in stderr
    assert "4 GPU" in stderr
    assert "largest node" in stderr


def test_run_rejects_unreachable_tracking_server(tmp_path):
    from e2e_helpers import free_port

    uri = f"http://127.0.0.1:{free_port()}"
    code, stderr = _cli_error(tmp_path, tiny_spec("offline", random_cells=1), "--output", str(tmp_path / "out"),
                              "--tracking-uri", uri)
    assert code == 2
    assert "unreachable" in stderr
    assert uri in stderr
