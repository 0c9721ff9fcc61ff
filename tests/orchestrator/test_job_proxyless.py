"""A latency-aware search in the ProxylessNAS space, run as a job through Ray Train and MLflow."""

import json

import pytest
from mlflow.tracking import MlflowClient

from e2e_helpers import job_runs, run_cli, runs_by_stage, write_spec
from orchestrator.spec import SpecError, parse_spec

pytestmark = pytest.mark.timeout(900)


def _proxyless_spec() -> dict:
    return {
        "name": "tiny-proxyless",
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


@pytest.mark.slow
def test_run_proxyless_job_records_genotype_and_surrogate(tmp_path):
    output = tmp_path / "out"
    result = run_cli("run", str(write_spec(tmp_path, _proxyless_spec())), "--output", str(output))
    assert result.returncode == 0, result.stderr[-3000:]
    (search,) = runs_by_stage(job_runs(output))["search"]
    assert search.info.status == "FINISHED"
    client = MlflowClient(f"sqlite:///{output / 'mlflow.db'}")
    genotype = json.loads(open(client.download_artifacts(search.info.run_id, "genotype.json")).read())
    assert len(genotype["layers"]) == 6
    assert [artifact.path for artifact in client.list_artifacts(search.info.run_id, "latency")] == [
        "latency/latency_surrogate.json"]
    assert len(client.get_metric_history(search.info.run_id, "latency_ms")) == 2
