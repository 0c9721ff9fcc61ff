"""The whole job on a local Ray runtime started by the driver, recorded in a SQLite MLflow store."""


import pytest
from mlflow.tracking import MlflowClient

from e2e_helpers import job_runs, run_cli, runs_by_stage, tiny_spec, write_spec

pytestmark = pytest.mark.timeout(1200)


@pytest.fixture(scope="module")
def finished_job(tmp_path_factory):
    folder = tmp_path_factory.mktemp("job")
    spec_path = write_spec(folder, tiny_spec("tiny-job", random_cells=2))
    output = folder / "out"
    result = run_cli("run", str(spec_path), "--output", str(output))
    return spec_path, output, result


def test_run_job_finishes_with_table(finished_job):
    _, output, result = finished_job
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| found:rebar | UNAS (rebar) | 1 (1) |" in result.stdout
    assert "| random:random | random | 2 (2) |" in result.stdout
    assert (output / "tables" / "results.md").is_file()
    assert (output / "tables" / "results.parquet").is_file()
    assert "found cell eval-found-rebar" in result.stderr
    assert "test accuracy" in result.stderr


def test_run_job_records_one_parent_one_search_and_each_evaluation(finished_job):
    _, output, _ = finished_job
    stages = runs_by_stage(job_runs(output))
    assert len(stages["job"]) == 1
    assert len(stages["search"]) == 1
    assert len(stages["evaluate"]) == 3
    parent_id = stages["job"][0].info.run_id
    for run in stages["search"] + stages["evaluate"] + stages["job"]:
        assert run.info.status == "FINISHED", run.data.tags
    for run in stages["search"] + stages["evaluate"]:
        assert run.data.tags["mlflow.parentRunId"] == parent_id
        assert run.data.tags["unas.job_id"] == stages["job"][0].data.tags["unas.job_id"]
        assert "unas.seed" in run.data.tags


def test_run_job_logs_genotypes_metrics_and_tables(finished_job):
    _, output, _ = finished_job
    client = MlflowClient(f"sqlite:///{output / 'mlflow.db'}")
    stages = runs_by_stage(job_runs(output))
    for run in stages["search"] + stages["evaluate"]:
        names = {artifact.path for artifact in client.list_artifacts(run.info.run_id)}
        assert {"genotype.json", "genotype.png"} <= names
    search = stages["search"][0]
    assert len(client.get_metric_history(search.info.run_id, "train_loss")) == 2
    drawings = {artifact.path for artifact in client.list_artifacts(search.info.run_id, "genotypes")}
    assert {"genotypes/epoch_0002.json", "genotypes/epoch_0002.png"} <= drawings
    for run in stages["evaluate"]:
        assert len(client.get_metric_history(run.info.run_id, "test_acc")) == 2
        assert 0.0 <= run.data.metrics["final_test_error"] <= 1.0
    parent = stages["job"][0]
    tables = {artifact.path for artifact in client.list_artifacts(parent.info.run_id, "tables")}
    assert {"tables/results.md", "tables/results.parquet"} <= tables
    assert "found_test_accuracy_pct" in parent.data.metrics


def test_run_job_evaluation_trials_overlap(finished_job):
    _, output, _ = finished_job
    evaluations = runs_by_stage(job_runs(output))["evaluate"]
    starts = [run.data.metrics["trial_started_unix_s"] for run in evaluations]
    ends = [run.data.metrics["trial_finished_unix_s"] for run in evaluations]
    # Three trials of half a CPU each on two CPUs: all run at the same time.
    assert max(starts) < min(ends)


def test_run_job_table_numbers_come_from_runs(finished_job):
    import pandas as pd

    _, output, _ = finished_job
    table = pd.read_parquet(output / "tables" / "results.parquet")
    evaluations = runs_by_stage(job_runs(output))["evaluate"]
    random_errors = [run.data.metrics["final_test_error"] * 100 for run in evaluations
                     if run.data.tags["unas.group"] == "random"]
    row = table[table["row"] == "random:random"].iloc[0]
    assert row["test_error_mean_pct"] == pytest.approx(sum(random_errors) / len(random_errors))
    assert row["test_error_best_pct"] == pytest.approx(min(random_errors))


def test_run_job_resubmitted_reuses_every_run(finished_job):
    spec_path, output, _ = finished_job
    before = {run.info.run_id for run in job_runs(output)}
    result = run_cli("run", str(spec_path), "--output", str(output))
    assert result.returncode == 0, result.stderr[-3000:]
    after = {run.info.run_id for run in job_runs(output)}
    assert after == before
    assert "reusing the finished search run" in result.stderr
    assert result.stderr.count("reusing the finished evaluation run") == 3


def test_report_rebuilds_table_from_mlflow(finished_job):
    _, output, run_result = finished_job
    result = run_cli("report", "--output", str(output))
    assert result.returncode == 0, result.stderr
    summary_line = next(line for line in run_result.stdout.splitlines() if line.startswith("| random:random"))
    assert summary_line in result.stdout
