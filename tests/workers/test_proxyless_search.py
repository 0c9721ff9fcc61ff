"""The latency-aware search in the ProxylessNAS space: config checks, latency terms and short runs."""

import dataclasses
import json

import pytest
import torch

from search_spaces.errors import UnasError
from search_spaces.proxyless import (
    ArchitectureDistribution,
    ProxylessConfig,
    choice_counts,
    genotype_from_json,
    genotype_to_sample,
    random_genotype,
)
from workers import latency as latency_module
from workers import proxyless_search
from workers.config import DataConfig
from workers.context import RunContext, load_checkpoint
from workers.latency import (
    SURROGATE_CACHED,
    SURROGATE_FITTED,
    LatencySettings,
    LatencySurrogate,
    fit_surrogate,
    load_or_fit_surrogate,
)
from workers.proxyless_search import (
    GENOTYPE_FILE,
    SURROGATE_FILE,
    SURROGATE_SOURCE_METRIC,
    ProxylessSearchConfig,
    SampleLatency,
    derive_target_ms,
    is_one_hot,
    latency_weight_at,
    run_proxyless_search,
)

CPU = torch.device("cpu")
DIGITS = DataConfig(name="digits", validation_fraction=0.2)
# 144 training images: two steps per epoch at batch 64, for runs that check plumbing only.
FEW_DIGITS = DataConfig(name="digits", test_fraction=0.9, validation_fraction=0.2)

# A CPU-sized search on the 8x8 digits: width 0.25 and 11 searched layers.
SMALL_SEARCH = dict(
    width_mult=0.25, layers_per_stage=2, stem_stride=2, batch_size=64,
    latency_batch_size=1, latency_repeats=3, latency_warmup_runs=1, latency_fit_networks=40,
    latency_holdout_networks=10, latency_clock="thread", weight_lr=3e-3, weight_lr_min=1e-3,
)

# Six searched layers and a quick surrogate fit, for runs that check plumbing only.
PLUMBING_SEARCH = dict(layers_per_stage=1, latency_fit_networks=16, latency_holdout_networks=4)

LATENCY_KEYS = ("latency_ms", "surrogate_latency_ms", "relaxed_latency_ms", "latency_penalty_ms",
                "latency_weight", "latency_target_ms", "genotype_latency_ms", "genotype_surrogate_latency_ms",
                "surrogate_holdout_error")


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def surrogate() -> LatencySurrogate:
    config = ProxylessConfig(num_classes=10, in_chs=1, width_mult=0.25, layers_per_stage=2)
    settings = LatencySettings(input_size=8, batch_size=1, repeats=2, warmup_runs=1, fit_networks=20,
                               holdout_networks=5, clock="thread")
    return fit_surrogate(config, settings, CPU)


# ---------------------------------------------------------------------------------------------
# Config and pure functions


def test_config_defaults_are_full_size():
    config = ProxylessSearchConfig()

    assert (config.width_mult, config.layers_per_stage, config.stem_stride) == (1.0, 4, 2)
    assert (config.per_example, config.softening_eps, config.skip_drop_prob) == (False, 0.08, 0.1)
    assert config.latency_weight == 0.1


@pytest.mark.parametrize("fields, message", [
    ({"discrete_latency": "guessed"}, "search.discrete_latency"),
    ({"per_example": True}, "per_example: true samples one per example"),
    ({"estimator": "evolution"}, "search.estimator"),
    ({"latency_target_ms": 0.0}, "search.latency_target_ms"),
    ({"latency_target_quantile": 1.5}, "search.latency_target_quantile"),
    ({"warmup_epochs": 40}, "search.warmup_epochs"),
    ({"skip_drop_prob": 1.0}, "search.skip_drop_prob"),
    ({"latency_target_genotype": "MOBILENET_V9"}, "search.latency_target_genotype"),
    ({"latency_target_genotype": "UNAS", "latency_target_ms": 3.0}, "set at most one"),
])
def test_config_rejects_invalid_fields(fields, message):
    with pytest.raises(UnasError, match=message):
        ProxylessSearchConfig(**fields)


def test_config_network_shape_follows_data():
    network_config = ProxylessSearchConfig(width_mult=0.5, stem_stride=1).network_config(DIGITS)

    assert (network_config.in_chs, network_config.num_classes) == (1, 10)
    assert (network_config.width_mult, network_config.stem_stride) == (0.5, 1)


def test_latency_weight_ramps_linearly_after_warmup():
    config = ProxylessSearchConfig(epochs=4, warmup_epochs=2, latency_weight=0.1)

    during_warmup = latency_weight_at(config, 1, 9, 10)
    first = latency_weight_at(config, 2, 0, 10)
    middle = latency_weight_at(config, 2, 9, 10)
    last = latency_weight_at(config, 3, 9, 10)

    assert during_warmup == 0.0
    assert first == pytest.approx(0.005)
    assert middle == pytest.approx(0.05)
    assert last == pytest.approx(0.1)


def test_derive_target_quantile_of_random_networks(surrogate):
    config = ProxylessSearchConfig(layers_per_stage=2, latency_target_quantile=0.25)
    latencies = torch.tensor([surrogate.predict_genotype_ms(random_genotype(i, 2)) for i in range(400)])

    target_ms = derive_target_ms(surrogate, config)

    assert latencies.quantile(0.05) < target_ms < latencies.median()
    assert derive_target_ms(surrogate, ProxylessSearchConfig(latency_target_ms=1.5)) == 1.5


def test_derive_target_from_named_genotype():
    # Each skipped layer saves 0.1 ms, so PROXYLESS_GPU with 8 skips takes 3.0 - 0.8 ms.
    coefficients = [[0.0] * 6 + [-0.1] if count == 7 else [0.0] * 6 for count in choice_counts(4)]
    surrogate = LatencySurrogate(3.0, coefficients, "cpu-test", {"layers_per_stage": 4})
    config = ProxylessSearchConfig(latency_target_genotype="PROXYLESS_GPU")

    assert derive_target_ms(surrogate, config) == pytest.approx(2.2)


def test_config_rejects_named_target_at_reduced_depth():
    with pytest.raises(UnasError, match="named genotypes have 21 layers"):
        ProxylessSearchConfig(latency_target_genotype="UNAS", layers_per_stage=2)


def test_is_one_hot_tells_discrete_from_relaxed():
    distribution = ArchitectureDistribution(layers_per_stage=2)
    generator = torch.Generator().manual_seed(0)

    assert is_one_hot(distribution.sample_discrete(3, generator))
    assert not is_one_hot(distribution.sample_relaxed(3, 0.4, generator))


def _sample_latency(surrogate: LatencySurrogate, measured: bool) -> SampleLatency:
    config = ProxylessConfig(num_classes=10, in_chs=1, width_mult=0.25, layers_per_stage=2)
    settings = LatencySettings(input_size=8, batch_size=1, repeats=2, warmup_runs=1, clock="thread")
    return SampleLatency(surrogate, 1.0, config, settings, CPU, measured=measured)


def test_sample_latency_measures_each_genotype_once(surrogate, monkeypatch):
    calls = []

    def fake_measure(genotype, *args):
        calls.append(genotype)
        return 2.5

    monkeypatch.setattr(proxyless_search, "measure_genotype_latency_ms", fake_measure)
    latency = _sample_latency(surrogate, measured=True)
    sample = genotype_to_sample(random_genotype(1, 2), 2)

    first = latency(sample)
    second = latency(sample)

    assert first.tolist() == [2.5]
    assert second.tolist() == [2.5]
    assert len(calls) == 1


def test_sample_latency_relaxed_uses_surrogate_gradient(surrogate):
    latency = _sample_latency(surrogate, measured=True)
    distribution = ArchitectureDistribution(layers_per_stage=2)
    relaxed = distribution.sample_relaxed(2, 0.4, torch.Generator().manual_seed(0))

    value = latency(relaxed)
    value.sum().backward()

    assert torch.allclose(value.detach(), surrogate.predict_ms(relaxed).detach())
    assert all(phi.grad is not None for phi in distribution.arch_logits)


def test_sample_latency_state_round_trip(surrogate):
    latency = _sample_latency(surrogate, measured=True)
    latency.measured_ms["a,b"] = 3.0
    latency.surrogate_source = SURROGATE_CACHED
    restored = _sample_latency(surrogate, measured=True)

    restored.load_state_dict(latency.state_dict())

    assert restored.measured_ms == latency.measured_ms
    assert restored.surrogate == surrogate
    assert restored.target_ms == latency.target_ms
    assert restored.surrogate_source == SURROGATE_CACHED


# ---------------------------------------------------------------------------------------------
# Short runs


def test_search_reports_latency_and_resumes(tmp_path, monkeypatch):
    config = ProxylessSearchConfig(**{**SMALL_SEARCH, **PLUMBING_SEARCH}, epochs=2, warmup_epochs=1,
                                   latency_cache_dir=str(tmp_path / "cache"))
    first = RunContext(checkpoint_root=tmp_path / "ckpt")

    genotype = run_proxyless_search(config, FEW_DIGITS, first)

    assert [m["epoch"] for m in first.history] == [1, 2]
    for key in LATENCY_KEYS:
        assert all(key in metrics for metrics in first.history), key
    assert genotype_from_json(first.history[-1]["genotype"], layers_per_stage=1) == genotype
    checkpoint = next((tmp_path / "ckpt").glob("epoch_*"))
    assert json.loads((checkpoint / SURROGATE_FILE).read_text())["setting"]["layers_per_stage"] == 1
    assert (checkpoint / GENOTYPE_FILE).is_file()
    assert load_checkpoint(checkpoint)["latency"]["target_ms"] == first.history[0]["latency_target_ms"]

    def fail_if_called(*args, **kwargs):
        raise AssertionError("a resumed search must take the surrogate from its checkpoint")

    monkeypatch.setattr(latency_module, "fit_surrogate", fail_if_called)
    resumed = RunContext(checkpoint_root=tmp_path / "ckpt")
    run_proxyless_search(dataclasses.replace(config, epochs=3), FEW_DIGITS, resumed)

    assert [m["epoch"] for m in resumed.history] == [3]
    assert resumed.history[0]["latency_target_ms"] == first.history[0]["latency_target_ms"]
    assert [m[SURROGATE_SOURCE_METRIC] for m in first.history] == [SURROGATE_FITTED] * 2
    assert resumed.history[0][SURROGATE_SOURCE_METRIC] == SURROGATE_FITTED  # restored from the checkpoint


def test_search_reports_cached_surrogate(tmp_path):
    config = ProxylessSearchConfig(**{**SMALL_SEARCH, **PLUMBING_SEARCH}, epochs=2, warmup_epochs=1,
                                   latency_cache_dir=str(tmp_path / "cache"))
    surrogate = load_or_fit_surrogate(config.network_config(FEW_DIGITS), config.latency_settings(FEW_DIGITS), CPU,
                                      config.latency_cache_dir)
    context = RunContext()

    run_proxyless_search(config, FEW_DIGITS, context)

    assert context.history[0][SURROGATE_SOURCE_METRIC] == SURROGATE_CACHED
    assert context.history[0]["surrogate_holdout_error"] == surrogate.fit["holdout_relative_error"]


class _Interrupted(Exception):
    pass


def _interrupt_after_epoch_two(metrics: dict) -> None:
    if metrics["epoch"] == 2:
        raise _Interrupted


def test_search_resume_matches_uninterrupted_run(tmp_path):
    config = ProxylessSearchConfig(**{**SMALL_SEARCH, **PLUMBING_SEARCH}, epochs=3, warmup_epochs=1,
                                   discrete_latency="surrogate", latency_cache_dir=str(tmp_path / "cache"))
    straight = RunContext(checkpoint_root=tmp_path / "straight")
    run_proxyless_search(config, FEW_DIGITS, straight)
    interrupted = RunContext(checkpoint_root=tmp_path / "interrupted", on_report=_interrupt_after_epoch_two)
    with pytest.raises(_Interrupted):
        run_proxyless_search(config, FEW_DIGITS, interrupted)
    resumed = RunContext(checkpoint_root=tmp_path / "interrupted")

    run_proxyless_search(config, FEW_DIGITS, resumed)

    final_straight = load_checkpoint(next((tmp_path / "straight").glob("epoch_*")))
    final_resumed = load_checkpoint(next((tmp_path / "interrupted").glob("epoch_*")))
    assert [m["epoch"] for m in resumed.history] == [3]
    for name, logits in final_straight["distribution"].items():
        assert torch.equal(logits, final_resumed["distribution"][name]), name
    assert resumed.history[0]["latency_ms"] == straight.history[-1]["latency_ms"]
    assert resumed.history[0]["train_loss"] == straight.history[-1]["train_loss"]


@pytest.mark.slow
def test_search_sampled_latency_falls(tmp_path):
    # The target is half the median latency of uniformly random networks, below every network
    # in this space, so the penalty pushes through the whole run. The large latency weight lets
    # it outweigh the cross-entropy terms of a supernet that has barely trained.
    base = ProxylessSearchConfig(**{**SMALL_SEARCH, "batch_size": 24}, epochs=5, warmup_epochs=1, latency_weight=10.0,
                                 latency_target_quantile=0.5, arch_lr=0.2, arch_lr_min=0.2,
                                 discrete_latency="surrogate", latency_cache_dir=str(tmp_path))
    data = DataConfig(name="digits", test_fraction=0.7, validation_fraction=0.2)  # 18 steps per epoch
    surrogate = load_or_fit_surrogate(base.network_config(data), base.latency_settings(data), CPU, tmp_path)
    median_ms = derive_target_ms(surrogate, base)
    context = RunContext()

    run_proxyless_search(dataclasses.replace(base, latency_target_ms=0.5 * median_ms), data, context)

    latencies = [metrics["latency_ms"] for metrics in context.history]
    assert context.history[0]["surrogate_holdout_error"] == surrogate.fit["holdout_relative_error"]  # cache reused
    assert latencies[0] > 0.9 * median_ms, latencies  # warm-up samples come from the uniform distribution
    assert latencies[-1] < 0.9 * latencies[0], latencies
    assert context.history[-1]["expected_skips"] > context.history[0]["expected_skips"]
