"""Experiments as resumable jobs: reruns over seeds, random baseline, named cells, a killed driver."""

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from e2e_helpers import REPO_ROOT, job_runs, run_cli, runs_by_stage, subprocess_env, tiny_spec, write_spec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def test_run_job_with_seeds_baseline_and_named_cell_matches_mlflow(tmp_path):
    spec = tiny_spec("reruns", random_cells=3, named=["DARTS_V2"])
    spec["search"]["seeds"] = [0, 1]
    output = tmp_path / "out"
    result = run_cli("run", str(write_spec(tmp_path, spec)), "--output", str(output))
    assert result.returncode == 0, result.stderr[-3000:]

    stages = runs_by_stage(job_runs(output))
    assert len(stages["search"]) == 2
    assert len(stages["evaluate"]) == 2 + 3 + 1
    table = pd.read_parquet(output / "tables" / "results.parquet").set_index("row")
    groups = pd.Series([run.data.tags["unas.group"] + ":" + (run.data.tags["unas.label"] if run.data.tags[
        "unas.group"] != "random" else "random") for run in stages["evaluate"]]).value_counts()
    assert set(table.index) == set(groups.index) == {"found:rebar", "named:DARTS_V2", "random:random"}
    for row, count in groups.items():
        assert table.loc[row, "cells"] == count
        assert table.loc[row, "finished"] == count
    found_errors = [run.data.metrics["final_test_error"] * 100 for run in stages["evaluate"]
                    if run.data.tags["unas.group"] == "found"]
    assert table.loc["found:rebar", "test_error_mean_pct"] == pytest.approx(sum(found_errors) / 2)
    assert table.loc["found:rebar", "test_error_std_pct"] == pytest.approx(pd.Series(found_errors).std(ddof=0))
    assert table.loc["found:rebar", "search_wall_h"] > 0


def _finished_evaluations(output) -> list:
    if not (output / "mlflow.db").exists():
        return []
    try:
        evaluations = runs_by_stage(job_runs(output)).get("evaluate", [])
    except Exception:  # the store may be mid-creation while the driver starts
        return []
    return [run for run in evaluations if run.info.status == "FINISHED"]


def test_run_job_killed_during_evaluation_resumes_without_duplicates(tmp_path):
    spec = tiny_spec("killed", random_cells=3, search=False, eval_epochs=3)
    spec["evaluate"]["max_concurrent"] = 1  # trials one after another, so the kill lands between them
    spec_path = write_spec(tmp_path, spec)
    output = tmp_path / "out"
    driver = subprocess.Popen([sys.executable, "-m", "orchestrator", "run", str(spec_path), "--output", str(output)],
                              cwd=REPO_ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 900
    while not _finished_evaluations(output) and time.monotonic() < deadline and driver.poll() is None:
        time.sleep(1)
    finished_before = {run.info.run_id: run for run in _finished_evaluations(output)}
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait(timeout=60)
    assert finished_before, "no evaluation finished before the deadline"
    assert len(finished_before) < 3, "the job finished before it could be killed"

    result = run_cli("run", str(spec_path), "--output", str(output))
    assert result.returncode == 0, result.stderr[-3000:]
    stages = runs_by_stage(job_runs(output))
    assert len(stages["job"]) == 1
    assert len(stages["evaluate"]) == 3
    assert all(run.info.status == "FINISHED" for run in stages["evaluate"] + stages["job"])
    client = MlflowClient(f"sqlite:///{output / 'mlflow.db'}")
    for run_id in finished_before:
        history = client.get_metric_history(run_id, "test_acc")
        assert [metric.step for metric in history] == [1, 2, 3], "a finished trial was trained again"
    assert result.stderr.count("reusing the finished evaluation run") == len(finished_before)
