"""A latency-aware search in the ProxylessNAS space and the evaluation of its networks, run as a job
through Ray Train, Ray Tune and MLflow."""

import json

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from e2e_helpers import job_runs, run_cli, runs_by_stage, write_spec
from orchestrator.spec import SpecError, parse_spec
from orchestrator.tracking import TAG_LATENCY_SOURCE_RUN, TAG_LATENCY_SURROGATE

pytestmark = pytest.mark.timeout(900)


def _proxyless_spec(name: str = "tiny-proxyless", evaluate: bool = False) -> dict:
    spec = {
        "name": name,
        "data": {"name": "digits", "validation_fraction": 0.2},
        "search": {"space": "proxyless", "width_mult": 0.25, "layers_per_stage": 1, "stem_stride": 1,
                   "epochs": 2, "warmup_epochs": 1, "batch_size": 64, "tau": 1.0, "latency_weight": 1.0,
                   "latency_batch_size": 1, "latency_repeats": 3, "latency_warmup_runs": 1,
                   "latency_fit_networks": 20, "latency_holdout_networks": 10},
        "ray": {"num_cpus": 2},
    }
    if evaluate:
        # The found network and two random ones; the other recipe fields come from the published recipe.
        spec["evaluate"] = {"found": True, "random_cells": 2,
                            "recipe": {"epochs": 2, "warmup_epochs": 0, "batch_size": 128},
                            "trial_resources": {"cpus": 0.5}, "max_concurrent": 4}
    return spec


def test_parse_spec_rejects_unknown_proxyless_field():
    spec = _proxyless_spec()
    spec["search"]["latency_budget"] = 3
    with pytest.raises(SpecError) as info:
        parse_spec(spec)
    assert info.value.problems == ["search.latency_budget: unknown field of the proxyless space; "
                                   "remove it or check its spelling"]


def test_parse_spec_rejects_proxyless_field_in_darts_space():
    spec = _proxyless_spec()
    spec["search"]["space"] = "darts"
    with pytest.raises(SpecError) as info:
        parse_spec(spec)
    assert "search.width_mult: unknown field; remove it or check its spelling" in info.value.problems


@pytest.fixture(scope="module")
def first_job(tmp_path_factory):
    """The output folder of a tiny proxyless job that timed random networks for its surrogate and then
    evaluated the found network and two random ones."""
    folder = tmp_path_factory.mktemp("first-job")
    output = folder / "out"
    result = run_cli("run", str(write_spec(folder, _proxyless_spec(evaluate=True))), "--output", str(output))
    assert result.returncode == 0, result.stderr[-3000:]
    return output


def _surrogate_artifact(client: MlflowClient, run_id: str) -> dict:
    return json.loads(open(client.download_artifacts(run_id, "latency/latency_surrogate.json")).read())


def _search_run(client: MlflowClient, job_name: str):
    """Return the one search run of a job, from the experiment named after the job."""
    experiment = client.get_experiment_by_name(job_name)
    (run,) = client.search_runs([experiment.experiment_id], "tags.`unas.stage` = 'search'")
    return run


@pytest.mark.slow
def test_run_proxyless_job_records_genotype_and_surrogate(first_job):
    (search,) = runs_by_stage(job_runs(first_job))["search"]
    assert search.info.status == "FINISHED"
    client = MlflowClient(f"sqlite:///{first_job / 'mlflow.db'}")
    genotype = json.loads(open(client.download_artifacts(search.info.run_id, "genotype.json")).read())
    assert len(genotype["layers"]) == 6
    assert [artifact.path for artifact in client.list_artifacts(search.info.run_id, "latency")] == [
        "latency/latency_surrogate.json"]
    assert len(client.get_metric_history(search.info.run_id, "latency_ms")) == 2
    assert search.data.tags[TAG_LATENCY_SURROGATE] == "fitted"
    assert TAG_LATENCY_SOURCE_RUN not in search.data.tags


@pytest.mark.slow
def test_second_job_reuses_stored_surrogate(first_job, tmp_path):
    tracking_uri = f"sqlite:///{first_job / 'mlflow.db'}"
    output = tmp_path / "out"
    spec_path = write_spec(tmp_path, _proxyless_spec("tiny-proxyless-again"))

    result = run_cli("run", str(spec_path), "--output", str(output), "--tracking-uri", tracking_uri)

    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(tracking_uri)
    first, second = _search_run(client, "tiny-proxyless"), _search_run(client, "tiny-proxyless-again")
    assert second.info.status == "FINISHED"
    assert second.data.tags[TAG_LATENCY_SURROGATE] == "cached"
    assert second.data.tags[TAG_LATENCY_SOURCE_RUN] == first.info.run_id
    first_surrogate = _surrogate_artifact(client, first.info.run_id)
    second_surrogate = _surrogate_artifact(client, second.info.run_id)
    assert second_surrogate["coefficients_ms"] == first_surrogate["coefficients_ms"]
    assert second_surrogate["fit"]["timing_s"] == first_surrogate["fit"]["timing_s"]  # no networks timed again
    assert (output / "latency_cache").is_dir()
    assert "fitted the latency surrogate" not in result.stdout + result.stderr
    assert f"reused the latency surrogate of {first_surrogate['device_key']} from run {first.info.run_id}" in (
        result.stdout + result.stderr)


def _first_job_stages(first_job) -> dict[str, list]:
    """Return the first job's runs by stage, because the second job records into the same store."""
    client = MlflowClient(f"sqlite:///{first_job / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny-proxyless")
    return runs_by_stage(client.search_runs([experiment.experiment_id], max_results=1000))


@pytest.mark.slow
def test_proxyless_job_evaluates_found_and_random_networks(first_job):
    client = MlflowClient(f"sqlite:///{first_job / 'mlflow.db'}")
    stages = _first_job_stages(first_job)
    evaluations = stages["evaluate"]
    assert sorted(run.data.tags["unas.group"] for run in evaluations) == ["found", "random", "random"]
    assert list((first_job / "ray").glob("*-evaluate-*")), "no Ray Tune experiment folder"
    for run in evaluations:
        assert run.info.status == "FINISHED", run.data.tags
        assert run.data.tags["unas.space"] == "proxyless"
        genotype = json.loads(open(client.download_artifacts(run.info.run_id, "genotype.json")).read())
        assert len(genotype["layers"]) == 6
        assert run.data.params["lr"] == "0.2"
        assert run.data.params["layers_per_stage"] == "1"
        assert "chs" not in run.data.params
        assert run.data.metrics["params_m"] > 0
        assert run.data.metrics["madds_m"] > 0
        assert 0.0 <= run.data.metrics["final_test_error"] <= 1.0
        assert run.data.metrics["final_min_test_error"] <= run.data.metrics["final_test_error"]
        assert len(client.get_metric_history(run.info.run_id, "test_acc")) == 2


@pytest.mark.slow
def test_proxyless_job_evaluates_searched_genotype(first_job):
    client = MlflowClient(f"sqlite:///{first_job / 'mlflow.db'}")
    stages = _first_job_stages(first_job)
    (search,) = stages["search"]
    (found,) = [run for run in stages["evaluate"] if run.data.tags["unas.group"] == "found"]
    searched = open(client.download_artifacts(search.info.run_id, "genotype.json")).read()
    evaluated = open(client.download_artifacts(found.info.run_id, "genotype.json")).read()
    assert json.loads(evaluated) == json.loads(searched)
    assert found.data.tags["unas.source_run_id"] == search.info.run_id


@pytest.mark.slow
def test_proxyless_job_table_rows_equal_run_metrics(first_job):
    table = pd.read_parquet(first_job / "tables" / "results.parquet")
    evaluations = _first_job_stages(first_job)["evaluate"]
    by_group = {group: [run for run in evaluations if run.data.tags["unas.group"] == group]
                for group in ("found", "random")}
    assert list(table["row"]) == ["found:rebar", "random:random"]
    for row_name, runs in (("found:rebar", by_group["found"]), ("random:random", by_group["random"])):
        row = table[table["row"] == row_name].iloc[0]
        errors = [run.data.metrics["final_test_error"] * 100 for run in runs]
        assert row["finished"] == len(runs)
        assert row["test_error_mean_pct"] == pytest.approx(sum(errors) / len(errors))
        assert row["test_error_best_pct"] == pytest.approx(min(errors))
        assert row["params_m"] == pytest.approx(sum(run.data.metrics["params_m"] for run in runs) / len(runs))
        assert row["madds_m"] == pytest.approx(sum(run.data.metrics["madds_m"] for run in runs) / len(runs))
    client = MlflowClient(f"sqlite:///{first_job / 'mlflow.db'}")
    (parent,) = _first_job_stages(first_job)["job"]
    tables = {artifact.path for artifact in client.list_artifacts(parent.info.run_id, "tables")}
    assert {"tables/results.md", "tables/results.parquet"} <= tables
    assert parent.data.metrics["found_test_accuracy_pct"] == pytest.approx(100 - table["test_error_mean_pct"][0])
