"""An evaluation trial that runs its own Ray Train worker group (DDP over gloo on CPU)."""

import pytest

from e2e_helpers import job_runs, run_cli, runs_by_stage, tiny_spec, write_spec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_run_job_evaluates_with_worker_group(tmp_path):
    spec = tiny_spec("group", random_cells=1, search=False, trial_cpus=1.0, eval_epochs=2)
    spec["evaluate"]["workers"] = 2
    output = tmp_path / "out"
    result = run_cli("run", str(write_spec(tmp_path, spec)), "--output", str(output))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "world_size=2" in result.stdout + result.stderr
    (run,) = runs_by_stage(job_runs(output))["evaluate"]
    assert run.info.status == "FINISHED"
    assert 0.0 <= run.data.metrics["final_test_error"] <= 1.0
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{output / 'mlflow.db'}")
    assert [metric.step for metric in client.get_metric_history(run.info.run_id, "test_acc")] == [1, 2]
