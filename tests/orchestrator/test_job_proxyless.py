"""A latency-aware search in the ProxylessNAS space, run as a job through Ray Train and MLflow."""

import json

import pytest
from mlflow.tracking import MlflowClient

from e2e_helpers import job_runs, run_cli, runs_by_stage, write_spec
from orchestrator.spec import SpecError, parse_spec
from orchestrator.tracking import TAG_LATENCY_SOURCE_RUN, TAG_LATENCY_SURROGATE

pytestmark = pytest.mark.timeout(900)


def _proxyless_spec(name: str = "tiny-proxyless") -> dict:
    return {
        "name": name,
        "data": {"name": "digits", "validation_fraction": 0.2},
        "search": {"space": "proxyless", "width_mult": 0.25, "layers_per_stage": 1, "stem_stride": 1,
                   "epochs": 2, "warmup_epochs": 1, "batch_size": 64, "tau": 1.0, "latency_weight": 1.0,
                   "latency_batch_size": 1, "latency_repeats": 3, "latency_warmup_runs": 1,
                   "latency_fit_networks": 20, "latency_holdout_networks": 10},
        "ray": {"num_cpus": 2},
    }


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
    """The output folder of a tiny proxyless job that timed random networks for its surrogate."""
    folder = tmp_path_factory.mktemp("first-job")
    output = folder / "out"
    result = run_cli("run", str(write_spec(folder, _proxyless_spec())), "--output", str(output))
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
