"""Latency of ProxylessNAS-space networks on the device a worker runs on, and its linear surrogate.

A network's latency is the median wall time of repeated forwards of its eval network in eval
mode after warm-up runs, synchronised on CUDA (``LatencySettings.clock`` can switch the CPU
to thread time). The surrogate is a ridge regression that is
linear in the one-hot op choice of every searched layer. It is fitted on timed random
networks, its error is measured on held-out timed networks, and applied to relaxed
(Gumbel-softmax) vectors it gives the relaxed latency that the search differentiates.

A fitted surrogate is saved as JSON. ``device_key()`` names the device and
``surrogate_setting()`` the network shape it was timed at, so a later job on the same kind of
device reuses the file instead of timing again.
"""

import hashlib
import json
import logging
import platform
import random
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from search_spaces.proxyless import (
    EvalNetwork,
    Genotype,
    ProxylessConfig,
    allowed_ops,
    choice_counts,
    describe_network,
    random_genotype,
)

logger = logging.getLogger(__name__)

SURROGATE_FORMAT_VERSION = 1
CLOCKS = ("wall", "thread")
# The two origins of a search's surrogate: a cache file, or a fit to random networks timed on its device.
SURROGATE_CACHED = "cached"
SURROGATE_FITTED = "fitted"


@dataclass(frozen=True)
class LatencySettings:
    """Timing and fitting settings of the latency surrogate.

    The defaults time a batch of 8 images at 224x224. Networks for the fit are random with a
    per-network skip probability drawn from [0, 1), so their depths, and latencies, spread
    widely.

    Networks are timed round-robin in chunks of ``chunk_size`` that are alive together, so the
    chunk size bounds the memory that timing takes. Larger chunks resist load that drifts over
    the measurement better.

    ``clock`` is "wall" (wall time, the latency) or "thread": the CPU time of the timing thread,
    for CPU timing with one intra-op thread on a shared machine. Other processes there take the
    core for whole scheduler slices. On a 2-vCPU VM at load average 5 to 12, two wall-time
    medians of the same small network in one measurement differed by 37% RMS, and thread-time
    medians by 5%.
    """

    input_size: int = 224
    batch_size: int = 8
    repeats: int = 10
    warmup_runs: int = 3
    fit_networks: int = 200
    holdout_networks: int = 50
    ridge_alpha: float = 1.0
    clock: str = "wall"
    chunk_size: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("input_size", "batch_size", "repeats", "fit_networks", "holdout_networks", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"latency {name} must be at least 1, got {getattr(self, name)}")
        if self.warmup_runs < 0:
            raise ValueError(f"latency warmup_runs must be non-negative, got {self.warmup_runs}")
        if self.ridge_alpha < 0:
            raise ValueError(f"latency ridge_alpha must be non-negative, got {self.ridge_alpha}")
        if self.clock not in CLOCKS:
            raise ValueError(f"latency clock {self.clock!r} is not valid; valid clocks: {', '.join(CLOCKS)}")


# ---------------------------------------------------------------------------------------------
# Devices and timing


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def device_key(device: torch.device | str | None = None) -> str:
    """Name the kind of device latencies are timed on, e.g. 'cuda-nvidia-h200'.

    A CPU key includes the model name and torch's intra-op thread count, because both set
    CPU latency.
    """
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda":
        return _slug(f"cuda {torch.cuda.get_device_name(device)}")
    return _slug(f"cpu {_cpu_model_name()} {torch.get_num_threads()} threads")


def _synchronize(device: torch.device) -> None:
    # NOTE: only CPU timing has been run; the CUDA path (synchronize, networks built on the GPU) is untested.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clock_function(clock: str, device: torch.device) -> Callable[[], float]:
    if clock == "wall":
        return time.perf_counter
    if clock != "thread":
        raise ValueError(f"latency clock {clock!r} is not valid; valid clocks: {', '.join(CLOCKS)}")
    # Thread CPU time misses GPU work and the work of other intra-op threads.
    if device.type != "cpu" or torch.get_num_threads() != 1:
        raise ValueError(f"the 'thread' latency clock needs the CPU and torch.set_num_threads(1); got device "
                         f"{device} with {torch.get_num_threads()} threads; use the 'wall' clock")
    return time.thread_time


def measure_latencies_ms(networks: list[nn.Module], inputs: torch.Tensor, repeats: int = 10,
                         warmup_runs: int = 3, clock: str = "wall") -> list[float]:
    """Return the median ms of ``repeats`` forwards of each network, after ``warmup_runs`` untimed ones.

    Each round times one forward of every network in turn. Interleaving spreads a network's
    forwards over the whole measurement, so a burst of load from another process slows one
    forward of many networks instead of all forwards of a few, and the median drops it.
    Networks run in eval mode under inference_mode and get their training flags back.
    """
    now = _clock_function(clock, inputs.device)
    modes = [network.training for network in networks]
    times_ms: list[list[float]] = [[] for _ in networks]
    try:
        with torch.inference_mode():
            for network in networks:
                network.eval()
                for _ in range(warmup_runs):
                    network(inputs)
            for _ in range(repeats):
                for index, network in enumerate(networks):
                    _synchronize(inputs.device)
                    start = now()
                    network(inputs)
                    _synchronize(inputs.device)
                    times_ms[index].append((now() - start) * 1e3)
    finally:
        for network, training in zip(networks, modes):
            network.train(training)
    return [statistics.median(times) for times in times_ms]


def measure_latency_ms(model: nn.Module, inputs: torch.Tensor, repeats: int = 10, warmup_runs: int = 3,
                       clock: str = "wall") -> float:
    return measure_latencies_ms([model], inputs, repeats, warmup_runs, clock)[0]


def _timing_inputs(config: ProxylessConfig, settings: LatencySettings, device: torch.device) -> torch.Tensor:
    shape = (settings.batch_size, config.in_chs, settings.input_size, settings.input_size)
    return torch.randn(shape, device=device)


def _cuda_devices(device: torch.device) -> list[torch.device]:
    return [device] if device.type == "cuda" else []


def time_genotypes(genotypes: list[Genotype], config: ProxylessConfig, settings: LatencySettings,
                   device: torch.device) -> list[float]:
    """Time each genotype's eval network on ``device``, the networks of each chunk round-robin.

    The global random state is left as it was, so timing inside a search keeps its resume exact.
    """
    chunk_size = settings.chunk_size
    latencies_ms: list[float] = []
    with torch.random.fork_rng(devices=_cuda_devices(device)):
        inputs = _timing_inputs(config, settings, device)
        for first in range(0, len(genotypes), chunk_size):
            with torch.device(device):
                networks = [EvalNetwork(genotype, config) for genotype in genotypes[first:first + chunk_size]]
            latencies_ms += measure_latencies_ms(networks, inputs, settings.repeats, settings.warmup_runs,
                                                 settings.clock)
            del networks
    return latencies_ms


def measure_genotype_latency_ms(genotype: Genotype, config: ProxylessConfig, settings: LatencySettings,
                                device: torch.device) -> float:
    return time_genotypes([genotype], config, settings, device)[0]


def random_timing_genotypes(count: int, layers_per_stage: int, seed: int) -> list[Genotype]:
    """Draw ``count`` random networks for a fit, each with its own skip probability from [0, 1)."""
    rng = random.Random(seed)
    return [random_genotype(rng.randrange(2**31), layers_per_stage, skip_prob=rng.random()) for _ in range(count)]


# ---------------------------------------------------------------------------------------------
# The surrogate


def one_hot_features(genotypes: list[Genotype], layers_per_stage: int) -> torch.Tensor:
    """(N, total choices) one-hot rows, the per-layer choices concatenated in layer order."""
    counts = choice_counts(layers_per_stage)
    offsets = [sum(counts[:i]) for i in range(len(counts))]
    features = torch.zeros(len(genotypes), sum(counts), dtype=torch.float64)
    for row, genotype in enumerate(genotypes):
        for index, op in enumerate(genotype.layers):
            features[row, offsets[index] + allowed_ops(index, layers_per_stage).index(op)] = 1.0
    return features


def fit_ridge(features: torch.Tensor, targets: torch.Tensor, alpha: float) -> tuple[float, torch.Tensor]:
    """Return (intercept, weights) minimising |y - b - Xw|^2 + alpha |w|^2, with the intercept b unpenalised."""
    features = features.to(torch.float64)
    targets = targets.to(torch.float64)
    feature_mean = features.mean(0)
    target_mean = targets.mean()
    centred = features - feature_mean
    gram = centred.T @ centred + alpha * torch.eye(features.shape[1], dtype=torch.float64)
    # lstsq rather than solve, because with alpha = 0 the one-hot blocks make the Gram matrix singular.
    weights = torch.linalg.lstsq(gram, centred.T @ (targets - target_mean)).solution
    intercept = float(target_mean - feature_mean @ weights)
    return intercept, weights


@dataclass
class LatencySurrogate:
    """A linear latency model: intercept_ms + sum over layers of <choice vector, coefficients_ms[l]>.

    ``setting`` is the network shape and input it was timed at, ``fit`` the fit's statistics.
    """

    intercept_ms: float
    coefficients_ms: list[list[float]]
    device_key: str
    setting: dict[str, Any]
    fit: dict[str, Any] = field(default_factory=dict)

    def predict_ms(self, sample: list[torch.Tensor]) -> torch.Tensor:
        """(B,) latency of a one-hot or relaxed sample of (B, choices) tensors; differentiable."""
        if len(sample) != len(self.coefficients_ms):
            raise ValueError(f"the surrogate covers {len(self.coefficients_ms)} layers, but the sample has "
                             f"{len(sample)}; fit a surrogate for this network's layers_per_stage")
        total = None
        for weights, coefficients in zip(sample, self.coefficients_ms):
            term = weights @ torch.tensor(coefficients, device=weights.device, dtype=weights.dtype)
            total = term if total is None else total + term
        return total + self.intercept_ms

    def predict_genotype_ms(self, genotype: Genotype) -> float:
        layers_per_stage = int(self.setting["layers_per_stage"])
        return float(self.predict_features(one_hot_features([genotype], layers_per_stage))[0])

    def predict_features(self, features: torch.Tensor) -> torch.Tensor:
        flat = torch.tensor([c for layer in self.coefficients_ms for c in layer], dtype=features.dtype)
        return features @ flat + self.intercept_ms

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": SURROGATE_FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LatencySurrogate":
        version = data.get("format_version")
        if version != SURROGATE_FORMAT_VERSION:
            raise ValueError(f"latency surrogate format_version {version!r} is not supported (expected "
                             f"{SURROGATE_FORMAT_VERSION}); delete the file to time the networks again")
        return cls(float(data["intercept_ms"]), [list(map(float, layer)) for layer in data["coefficients_ms"]],
                   str(data["device_key"]), dict(data["setting"]), dict(data.get("fit", {})))


def surrogate_setting(config: ProxylessConfig, settings: LatencySettings) -> dict[str, Any]:
    """Everything besides the device that a timed latency depends on."""
    return {
        "width_mult": config.width_mult,
        "layers_per_stage": config.layers_per_stage,
        "stem_stride": config.stem_stride,
        "in_chs": config.in_chs,
        "num_classes": config.num_classes,
        "input_size": settings.input_size,
        "batch_size": settings.batch_size,
        "clock": settings.clock,
        "torch_version": torch.__version__,
    }


def _error_stats(predicted: torch.Tensor, measured: torch.Tensor) -> dict[str, float]:
    errors = predicted - measured
    mean_ms = float(measured.mean())
    rmse_ms = float(errors.square().mean().sqrt())
    return {
        "holdout_mean_ms": mean_ms,
        "holdout_std_ms": float(measured.std()) if len(measured) > 1 else 0.0,
        "holdout_mae_ms": float(errors.abs().mean()),
        "holdout_rmse_ms": rmse_ms,
        # RMSE over the mean latency: the figure the surrogate is judged by.
        "holdout_relative_error": rmse_ms / mean_ms,
    }


def fit_surrogate(config: ProxylessConfig, settings: LatencySettings,
                  device: torch.device | None = None) -> LatencySurrogate:
    """Time random networks on ``device``, fit the ridge surrogate and measure it on held-out ones."""
    device = device or default_device()
    layers_per_stage = config.layers_per_stage
    count = settings.fit_networks + settings.holdout_networks
    genotypes = random_timing_genotypes(count, layers_per_stage, settings.seed)
    started = time.perf_counter()
    latencies = torch.tensor(time_genotypes(genotypes, config, settings, device), dtype=torch.float64)
    timing_s = time.perf_counter() - started

    features = one_hot_features(genotypes, layers_per_stage)
    fit_rows, holdout_rows = _split_rows(settings.fit_networks, settings.holdout_networks)
    intercept, weights = fit_ridge(features[fit_rows], latencies[fit_rows], settings.ridge_alpha)
    coefficients = _split_per_layer(weights, choice_counts(layers_per_stage))
    surrogate = LatencySurrogate(intercept, coefficients, device_key(device), surrogate_setting(config, settings))

    stats = _error_stats(surrogate.predict_features(features[holdout_rows]), latencies[holdout_rows])
    surrogate.fit = {
        "fit_networks": settings.fit_networks,
        "holdout_networks": settings.holdout_networks,
        "fit_mean_ms": float(latencies[fit_rows].mean()),
        "repeats": settings.repeats,
        "warmup_runs": settings.warmup_runs,
        "ridge_alpha": settings.ridge_alpha,
        "timing_s": timing_s,
        **stats,
    }
    logger.info("fitted the latency surrogate on %s from %d timed networks in %.1f s: held-out error %.1f%% "
                "of the %.3f ms mean (%d networks)", surrogate.device_key, settings.fit_networks, timing_s,
                100 * stats["holdout_relative_error"], stats["holdout_mean_ms"], settings.holdout_networks)
    return surrogate


def _split_rows(fit_count: int, holdout_count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices of the fit and held-out networks, the held-out ones spread evenly over the list.

    Spreading them keeps the held-out networks timed alongside the fitted ones, not in a last
    chunk whose load may differ.
    """
    count = fit_count + holdout_count
    is_holdout = torch.zeros(count, dtype=torch.bool)
    is_holdout[[i * count // holdout_count for i in range(holdout_count)]] = True
    return torch.nonzero(~is_holdout).squeeze(1), torch.nonzero(is_holdout).squeeze(1)


def _split_per_layer(weights: torch.Tensor, counts: list[int]) -> list[list[float]]:
    layers, offset = [], 0
    for count in counts:
        layers.append([float(w) for w in weights[offset:offset + count]])
        offset += count
    return layers


def save_surrogate(surrogate: LatencySurrogate, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(surrogate.to_dict(), indent=1) + "\n")
    return path


def load_surrogate(path: str | Path) -> LatencySurrogate:
    return LatencySurrogate.from_dict(json.loads(Path(path).read_text()))


def setting_digest(setting: dict[str, Any]) -> str:
    """Return the 10-hex-digit hash of a surrogate setting that cache file names and run tags carry."""
    return hashlib.sha256(json.dumps(setting, sort_keys=True).encode()).hexdigest()[:10]


def surrogate_cache_path(cache_dir: str | Path, key: str, setting: dict[str, Any]) -> Path:
    """Return the cache file of one device kind and setting, 'latency-<device key>-<setting hash>.json'."""
    return Path(cache_dir) / f"latency-{key}-{setting_digest(setting)}.json"


def load_cached_surrogate(path: Path, key: str, setting: dict[str, Any]) -> LatencySurrogate | None:
    """Return the surrogate cached at ``path`` when it was timed on device kind ``key`` at ``setting``, else None."""
    if not path.is_file():
        return None
    try:
        cached = load_surrogate(path)
    except (ValueError, KeyError, TypeError) as error:
        logger.warning("ignoring the unreadable latency cache %s (%s); timing again", path, error)
        return None
    if cached.device_key != key or cached.setting != setting:
        logger.warning("latency cache %s was timed on %s with another setting; timing again", path,
                       cached.device_key)
        return None
    logger.info("reusing the latency surrogate %s", path)
    return cached


def surrogate_with_source(config: ProxylessConfig, settings: LatencySettings, device: torch.device,
                          cache_dir: str | Path | None = None) -> tuple[LatencySurrogate, str]:
    """Reuse a cached surrogate of this device kind and setting, or fit one and cache it.

    Returns the surrogate and SURROGATE_CACHED or SURROGATE_FITTED, so a search can record
    whether it timed networks.
    """
    key = device_key(device)
    setting = surrogate_setting(config, settings)
    path = surrogate_cache_path(cache_dir, key, setting) if cache_dir is not None else None
    cached = load_cached_surrogate(path, key, setting) if path is not None else None
    if cached is not None:
        return cached, SURROGATE_CACHED
    surrogate = fit_surrogate(config, settings, device)
    if path is not None:
        save_surrogate(surrogate, path)
        logger.info("saved the latency surrogate to %s", path)
    return surrogate, SURROGATE_FITTED


def load_or_fit_surrogate(config: ProxylessConfig, settings: LatencySettings, device: torch.device,
                          cache_dir: str | Path | None = None) -> LatencySurrogate:
    """Reuse a cached surrogate of this device kind and setting, or fit one and cache it."""
    return surrogate_with_source(config, settings, device, cache_dir)[0]


# ---------------------------------------------------------------------------------------------
# Reporting


def describe_proxyless(genotype: Genotype, latency: bool = False, settings: LatencySettings | None = None,
                       device: torch.device | None = None) -> dict[str, Any]:
    """Return the size of a genotype's full-size ImageNet network and, when asked, its latency.

    Keys: params_m, madds_m (conv+linear at 224x224), layers (the op of each searched layer)
    and active_layers; with latency=True also latency_ms, timed on ``device`` (default: CUDA
    when available) at ``settings`` (default: LatencySettings()), latency_device and
    latency_batch_size.
    """
    config = ProxylessConfig()
    description: dict[str, Any] = describe_network(genotype, config)
    if latency:
        settings = settings or LatencySettings()
        device = device or default_device()
        description["latency_ms"] = measure_genotype_latency_ms(genotype, config, settings, device)
        description["latency_device"] = device_key(device)
        description["latency_batch_size"] = settings.batch_size
    return description
