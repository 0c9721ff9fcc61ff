"""Latency timing, the ridge surrogate, its JSON cache and describe_proxyless, on the CPU."""

import json

import pytest
import torch

from search_spaces.proxyless import (
    GENOTYPES,
    ArchitectureDistribution,
    ProxylessConfig,
    genotype_to_sample,
    random_genotype,
)
from workers import latency as latency_module
from workers.latency import (
    SURROGATE_CACHED,
    SURROGATE_FITTED,
    LatencySettings,
    LatencySurrogate,
    describe_proxyless,
    device_key,
    fit_ridge,
    fit_surrogate,
    load_or_fit_surrogate,
    load_surrogate,
    measure_latency_ms,
    one_hot_features,
    random_timing_genotypes,
    save_surrogate,
    setting_digest,
    surrogate_cache_path,
    surrogate_setting,
    surrogate_with_source,
    time_genotypes,
)

CPU = torch.device("cpu")

# Full depth, so skipped layers change latency clearly, at a width and input size that keep
# one forward near 2 ms on one CPU thread.
SMALL_CONFIG = ProxylessConfig(num_classes=10, width_mult=0.25)

# A fit for tests that need a surrogate but not a good one.
QUICK_SETTINGS = LatencySettings(input_size=16, batch_size=1, repeats=2, warmup_runs=1, fit_networks=12,
                                 holdout_networks=4, clock="thread")


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def quick_surrogate() -> LatencySurrogate:
    return fit_surrogate(SMALL_CONFIG, QUICK_SETTINGS, CPU)


def test_measure_latency_ms_restores_training_mode():
    network = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.5))
    network.train()

    latency_ms = measure_latency_ms(network, torch.randn(2, 8), repeats=3, warmup_runs=1)

    assert latency_ms > 0
    assert network.training


def test_measure_latency_ms_thread_clock_needs_one_thread():
    network = torch.nn.Linear(4, 4)
    torch.set_num_threads(2)
    try:
        with pytest.raises(ValueError, match="set_num_threads"):
            measure_latency_ms(network, torch.randn(1, 4), repeats=1, clock="thread")
    finally:
        torch.set_num_threads(1)


def test_latency_settings_rejects_unknown_clock():
    with pytest.raises(ValueError, match="valid clocks: wall, thread"):
        LatencySettings(clock="cycles")


def test_time_genotypes_keeps_global_random_state():
    before = torch.get_rng_state()

    time_genotypes([random_genotype(0)], SMALL_CONFIG, QUICK_SETTINGS, CPU)

    assert torch.equal(torch.get_rng_state(), before)


def test_random_timing_genotypes_spread_depths():
    genotypes = random_timing_genotypes(40, 4, seed=0)
    skips = [genotype.skip_count for genotype in genotypes]

    assert min(skips) <= 2
    assert max(skips) >= 12


def test_fit_ridge_recovers_exact_linear_model():
    genotypes = random_timing_genotypes(300, 2, seed=1)
    features = one_hot_features(genotypes, 2)
    true_weights = torch.linspace(-1.0, 2.0, features.shape[1], dtype=torch.float64)
    targets = 5.0 + features @ true_weights

    intercept, weights = fit_ridge(features, targets, alpha=1e-9)

    assert torch.allclose(intercept + features @ weights, targets, atol=1e-6)


def test_surrogate_predicts_relaxed_sample_linearly(quick_surrogate):
    distribution = ArchitectureDistribution(layers_per_stage=4)
    sample = distribution.sample_relaxed(3, 0.4, torch.Generator().manual_seed(0))
    relaxed = [s.detach().requires_grad_() for s in sample]

    predicted = quick_surrogate.predict_ms(relaxed)
    predicted.sum().backward()

    expected = quick_surrogate.intercept_ms + sum(
        s.detach() @ torch.tensor(c) for s, c in zip(relaxed, quick_surrogate.coefficients_ms)
    )
    assert torch.allclose(predicted.detach(), expected, atol=1e-5)
    for s, coefficients in zip(relaxed, quick_surrogate.coefficients_ms):
        assert torch.allclose(s.grad, torch.tensor(coefficients).expand(3, -1), atol=1e-6)


def test_surrogate_genotype_matches_one_hot_sample(quick_surrogate):
    genotype = random_genotype(5)

    from_sample = quick_surrogate.predict_ms(genotype_to_sample(genotype)).item()

    assert quick_surrogate.predict_genotype_ms(genotype) == pytest.approx(from_sample, rel=1e-5)


def test_surrogate_heldout_error_below_ten_percent():
    # 160 networks of 21 layers are timed round-robin in one chunk with the thread clock. Load
    # from other processes on a shared machine then neither slows some networks more than
    # others nor counts toward their time. Their skip counts, and so their latencies, spread widely.
    settings = LatencySettings(input_size=32, batch_size=1, repeats=15, warmup_runs=2, fit_networks=120,
                               holdout_networks=40, ridge_alpha=3.0, clock="thread", chunk_size=1000)

    fit = fit_surrogate(SMALL_CONFIG, settings, CPU).fit

    report = {key: round(value, 4) for key, value in fit.items() if isinstance(value, float)}
    assert fit["holdout_std_ms"] / fit["holdout_mean_ms"] > 0.15, report  # latencies differ clearly
    assert fit["holdout_relative_error"] < 0.10, report
    assert fit["holdout_rmse_ms"] < 0.5 * fit["holdout_std_ms"], report  # far better than the mean


def test_surrogate_json_round_trip(quick_surrogate, tmp_path):
    path = save_surrogate(quick_surrogate, tmp_path / "nested" / "surrogate.json")

    loaded = load_surrogate(path)

    assert loaded == quick_surrogate
    assert json.loads(path.read_text())["device_key"] == device_key(CPU)


def test_load_surrogate_rejects_other_format_version(quick_surrogate, tmp_path):
    data = quick_surrogate.to_dict()
    data["format_version"] = 99
    path = tmp_path / "surrogate.json"
    path.write_text(json.dumps(data))

    with pytest.raises(ValueError, match="format_version 99"):
        load_surrogate(path)


def test_load_or_fit_surrogate_reuses_cache(tmp_path, monkeypatch):
    first = load_or_fit_surrogate(SMALL_CONFIG, QUICK_SETTINGS, CPU, tmp_path)

    def fail_if_called(*args, **kwargs):
        raise AssertionError("the cached surrogate should have been reused")

    monkeypatch.setattr(latency_module, "fit_surrogate", fail_if_called)
    second = load_or_fit_surrogate(SMALL_CONFIG, QUICK_SETTINGS, CPU, tmp_path)

    assert second == first
    assert surrogate_cache_path(tmp_path, device_key(CPU), surrogate_setting(SMALL_CONFIG, QUICK_SETTINGS)).is_file()


def test_load_or_fit_surrogate_refits_other_setting(tmp_path):
    first = load_or_fit_surrogate(SMALL_CONFIG, QUICK_SETTINGS, CPU, tmp_path)
    other_input = LatencySettings(**{**QUICK_SETTINGS.__dict__, "input_size": 8})

    second = load_or_fit_surrogate(SMALL_CONFIG, other_input, CPU, tmp_path)

    assert second.setting["input_size"] == 8
    assert first.setting["input_size"] == 16
    assert len(list(tmp_path.glob("latency-*.json"))) == 2


def test_surrogate_source_fitted_then_cached(tmp_path):
    fitted, first_source = surrogate_with_source(SMALL_CONFIG, QUICK_SETTINGS, CPU, tmp_path)
    cached, second_source = surrogate_with_source(SMALL_CONFIG, QUICK_SETTINGS, CPU, tmp_path)

    assert first_source == SURROGATE_FITTED
    assert second_source == SURROGATE_CACHED
    assert cached == fitted


def test_cache_path_names_device_and_setting(tmp_path):
    setting = surrogate_setting(SMALL_CONFIG, QUICK_SETTINGS)

    path = surrogate_cache_path(tmp_path, "cpu-test", setting)

    assert path == tmp_path / f"latency-cpu-test-{setting_digest(setting)}.json"
    assert len(setting_digest(setting)) == 10


def test_device_key_names_cpu_and_threads():
    key = device_key("cpu")

    assert key.startswith("cpu-")
    assert key.endswith("-1-threads")


def test_describe_proxyless_without_latency():
    description = describe_proxyless(GENOTYPES.get("PROXYLESS_GPU"))

    assert description["params_m"] == pytest.approx(7.120, rel=0.005)
    assert len(description["layers"]) == 21
    assert "latency_ms" not in description


def test_describe_proxyless_with_latency():
    settings = LatencySettings(input_size=32, batch_size=1, repeats=2, warmup_runs=1)

    description = describe_proxyless(GENOTYPES.get("UNAS"), latency=True, settings=settings, device=CPU)

    assert description["latency_ms"] > 0
    assert description["latency_device"] == device_key(CPU)
    assert description["latency_batch_size"] == 1
