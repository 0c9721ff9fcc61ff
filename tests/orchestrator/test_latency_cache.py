"""Latency surrogates shared through a real SQLite MLflow store: lookup by setting hash and device key, and run tags."""

import dataclasses
import time

import pytest
import torch

from orchestrator.latency_cache import (
    CACHE_FOLDER,
    StoredSurrogate,
    prepare_surrogate_cache,
    record_search_surrogate,
    search_setting,
)
from orchestrator.tracking import (
    TAG_LATENCY_DEVICE,
    TAG_LATENCY_SETTING,
    TAG_LATENCY_SOURCE_RUN,
    TAG_LATENCY_SURROGATE,
    Tracker,
)
from search_spaces.proxyless import choice_counts
from workers import latency as latency_module
from workers.config import DataConfig
from workers.latency import (
    SURROGATE_CACHED,
    SURROGATE_FITTED,
    LatencySurrogate,
    device_key,
    load_surrogate,
    save_surrogate,
    setting_digest,
    surrogate_cache_path,
    surrogate_with_source,
)
from workers.proxyless_search import SURROGATE_FILE, ProxylessSearchConfig

CPU = torch.device("cpu")
DIGITS = DataConfig(name="digits", validation_fraction=0.2)
CONFIG = ProxylessSearchConfig(width_mult=0.25, layers_per_stage=1, stem_stride=1, latency_batch_size=1)
OTHER_DEVICE = "cuda-nvidia-test-gpu"


def _surrogate(key: str, setting: dict, intercept_ms: float = 1.0) -> LatencySurrogate:
    coefficients = [[0.1] * count for count in choice_counts(setting["layers_per_stage"])]
    return LatencySurrogate(intercept_ms, coefficients, key, dict(setting), {"holdout_relative_error": 0.05})


def _tracker(tmp_path, experiment: str) -> Tracker:
    return Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", experiment, tmp_path / "mlartifacts").open()


def _store_search_run(tracker: Tracker, surrogate: LatencySurrogate, tmp_path) -> str:
    """Create a finished search run that carries ``surrogate`` as the driver records it."""
    run_id = tracker.client.create_run(tracker.experiment_id).info.run_id
    path = save_surrogate(surrogate, tmp_path / "uploads" / run_id / SURROGATE_FILE)
    record_search_surrogate(tracker, run_id, path, SURROGATE_FITTED, {})
    tracker.finish(run_id)
    return run_id


def _worker_surrogate(cache_dir: str) -> tuple[LatencySurrogate, str]:
    """Look the cache up as the search worker does on this CPU."""
    return surrogate_with_source(CONFIG.network_config(DIGITS), CONFIG.latency_settings(DIGITS), CPU, cache_dir)


def test_search_setting_matches_worker_setting():
    settings = CONFIG.latency_settings(DIGITS)

    setting = search_setting(CONFIG, DIGITS)

    assert setting["input_size"] == 8
    assert setting["layers_per_stage"] == 1
    assert setting == latency_module.surrogate_setting(CONFIG.network_config(DIGITS), settings)


def test_fetch_reuses_surrogate_from_other_experiment(tmp_path):
    stored = _surrogate(device_key(CPU), search_setting(CONFIG, DIGITS))
    run_id = _store_search_run(_tracker(tmp_path, "earlier-job"), stored, tmp_path)
    tracker = _tracker(tmp_path, "later-job")

    config, fetched = prepare_surrogate_cache(CONFIG, DIGITS, tracker, tmp_path / "out")
    surrogate, source = _worker_surrogate(config.latency_cache_dir)

    assert config.latency_cache_dir == str(tmp_path / "out" / CACHE_FOLDER)
    assert list(fetched) == [device_key(CPU)]
    assert fetched[device_key(CPU)].run_id == run_id
    assert source == SURROGATE_CACHED
    assert surrogate == stored


def test_fetch_skips_other_setting_and_device(tmp_path, monkeypatch):
    setting = search_setting(CONFIG, DIGITS)
    other_setting = search_setting(dataclasses.replace(CONFIG, width_mult=0.5), DIGITS)
    earlier = _tracker(tmp_path, "earlier-job")
    _store_search_run(earlier, _surrogate(device_key(CPU), other_setting), tmp_path)
    other_device_run = _store_search_run(earlier, _surrogate(OTHER_DEVICE, setting), tmp_path)
    fitted = _surrogate(device_key(CPU), setting, intercept_ms=9.0)
    monkeypatch.setattr(latency_module, "fit_surrogate", lambda *args: fitted)

    config, fetched = prepare_surrogate_cache(CONFIG, DIGITS, _tracker(tmp_path, "later-job"), tmp_path / "out")
    surrogate, source = _worker_surrogate(config.latency_cache_dir)

    assert setting_digest(other_setting) != setting_digest(setting)
    assert list(fetched) == [OTHER_DEVICE]
    assert fetched[OTHER_DEVICE].run_id == other_device_run
    assert surrogate_cache_path(config.latency_cache_dir, OTHER_DEVICE, setting).is_file()
    assert source == SURROGATE_FITTED
    assert surrogate is fitted


def test_fetch_skips_mismatched_device_tag(tmp_path):
    setting = search_setting(CONFIG, DIGITS)
    earlier = _tracker(tmp_path, "earlier-job")
    run_id = _store_search_run(earlier, _surrogate(OTHER_DEVICE, setting), tmp_path)
    earlier.set_tags(run_id, {TAG_LATENCY_DEVICE: device_key(CPU)})

    config, fetched = prepare_surrogate_cache(CONFIG, DIGITS, _tracker(tmp_path, "later-job"), tmp_path / "out")

    assert fetched == {}
    assert not surrogate_cache_path(config.latency_cache_dir, device_key(CPU), setting).exists()


def test_fetch_takes_newest_run_per_device(tmp_path):
    setting = search_setting(CONFIG, DIGITS)
    earlier = _tracker(tmp_path, "earlier-job")
    _store_search_run(earlier, _surrogate(device_key(CPU), setting, intercept_ms=1.0), tmp_path)
    time.sleep(0.05)  # run start times have millisecond resolution
    newest = _store_search_run(earlier, _surrogate(device_key(CPU), setting, intercept_ms=2.0), tmp_path)

    config, fetched = prepare_surrogate_cache(CONFIG, DIGITS, _tracker(tmp_path, "later-job"), tmp_path / "out")

    assert fetched[device_key(CPU)].run_id == newest
    assert load_surrogate(surrogate_cache_path(config.latency_cache_dir, device_key(CPU), setting)).intercept_ms == 2.0


def test_prepare_keeps_files_in_spec_cache_folder(tmp_path):
    setting = search_setting(CONFIG, DIGITS)
    _store_search_run(_tracker(tmp_path, "earlier-job"), _surrogate(device_key(CPU), setting), tmp_path)
    user_folder = tmp_path / "my-cache"
    path = save_surrogate(_surrogate(device_key(CPU), setting, intercept_ms=5.0),
                          surrogate_cache_path(user_folder, device_key(CPU), setting))
    spec_config = dataclasses.replace(CONFIG, latency_cache_dir=str(user_folder))

    config, fetched = prepare_surrogate_cache(spec_config, DIGITS, _tracker(tmp_path, "later-job"), tmp_path / "out")

    assert config == spec_config
    assert fetched == {}
    assert load_surrogate(path).intercept_ms == 5.0
    assert not (tmp_path / "out" / CACHE_FOLDER).exists()


def test_record_names_cached_source_run(tmp_path):
    tracker = _tracker(tmp_path, "job")
    stored = _surrogate(device_key(CPU), search_setting(CONFIG, DIGITS))
    run_id = tracker.client.create_run(tracker.experiment_id).info.run_id
    path = save_surrogate(stored, tmp_path / SURROGATE_FILE)

    record_search_surrogate(tracker, run_id, path, SURROGATE_CACHED,
                            {device_key(CPU): StoredSurrogate("earlier-run", stored)})

    tags = tracker.client.get_run(run_id).data.tags
    assert tags[TAG_LATENCY_SURROGATE] == SURROGATE_CACHED
    assert tags[TAG_LATENCY_SOURCE_RUN] == "earlier-run"
    assert tags[TAG_LATENCY_DEVICE] == device_key(CPU)
    assert tags[TAG_LATENCY_SETTING] == setting_digest(stored.setting)
    artifacts = [item.path for item in tracker.client.list_artifacts(run_id, "latency")]
    assert artifacts == [f"latency/{SURROGATE_FILE}"]


@pytest.mark.parametrize("source", [SURROGATE_FITTED, SURROGATE_CACHED])
def test_record_omits_unmatched_source_run(tmp_path, source):
    tracker = _tracker(tmp_path, "job")
    setting = search_setting(CONFIG, DIGITS)
    run_id = tracker.client.create_run(tracker.experiment_id).info.run_id
    path = save_surrogate(_surrogate(device_key(CPU), setting, intercept_ms=3.0), tmp_path / SURROGATE_FILE)
    fetched = {device_key(CPU): StoredSurrogate("earlier-run", _surrogate(device_key(CPU), setting))}

    record_search_surrogate(tracker, run_id, path, source, fetched)

    tags = tracker.client.get_run(run_id).data.tags
    assert tags[TAG_LATENCY_SURROGATE] == source
    assert TAG_LATENCY_SOURCE_RUN not in tags
