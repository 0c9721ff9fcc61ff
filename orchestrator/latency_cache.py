"""Latency surrogates of ProxylessNAS-space searches, shared between jobs through the MLflow store.

A finished proxyless search logs its surrogate as the artifact ``latency/latency_surrogate.json``
and tags its run with the surrogate's device key and setting hash. Before a later proxyless
search starts, the driver downloads the newest stored surrogate of each device kind with that
search's setting hash, from every experiment of the store, into a cache folder. The search
worker then reuses the file named after its own device kind, or fits a surrogate when the
folder has none. Only the driver talks to MLflow; the Ray Train workers read the folder.
"""

import logging
import re
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException

from orchestrator.tracking import (
    TAG_LATENCY_DEVICE,
    TAG_LATENCY_SETTING,
    TAG_LATENCY_SOURCE_RUN,
    TAG_LATENCY_SURROGATE,
    Tracker,
)
from workers.config import DataConfig
from workers.latency import (
    SURROGATE_CACHED,
    LatencySurrogate,
    load_surrogate,
    save_surrogate,
    setting_digest,
    surrogate_cache_path,
    surrogate_setting,
)
from workers.proxyless_search import SURROGATE_FILE, ProxylessSearchConfig

logger = logging.getLogger(__name__)

ARTIFACT_DIR = "latency"
ARTIFACT_PATH = f"{ARTIFACT_DIR}/{SURROGATE_FILE}"
# The job's own cache folder under its output directory, used when the spec sets no latency_cache_dir.
CACHE_FOLDER = "latency_cache"
# workers.latency.device_key() returns such slugs; anything else could name a file outside the folder.
_DEVICE_KEY = re.compile(r"^[a-z0-9][a-z0-9-]*$")


@dataclass(frozen=True)
class StoredSurrogate:
    """A surrogate downloaded from a search run and written into the cache folder."""

    run_id: str
    surrogate: LatencySurrogate


def search_setting(config: ProxylessSearchConfig, data: DataConfig) -> dict[str, Any]:
    """Return the surrogate setting that the search worker computes for this config and data set."""
    return surrogate_setting(config.network_config(data), config.latency_settings(data))


def prepare_surrogate_cache(config: ProxylessSearchConfig, data: DataConfig, tracker: Tracker,
                            output_dir: Path) -> tuple[ProxylessSearchConfig, dict[str, StoredSurrogate]]:
    """Fill the search's cache folder from the MLflow store and return the config the worker gets.

    Without ``latency_cache_dir`` in the spec, the folder is ``<output>/latency_cache``, and the
    returned config points the worker at it. Stored surrogates replace the files there. A folder
    that the spec names only gains files, because the user may have put surrogates there.
    Also returns the stored surrogates written, by device key.
    """
    if config.latency_cache_dir is None:
        folder = output_dir / CACHE_FOLDER
        config = replace(config, latency_cache_dir=str(folder))
        overwrite = True
    else:
        folder = Path(config.latency_cache_dir)
        overwrite = False
    written = fetch_surrogates(tracker, search_setting(config, data), folder, overwrite)
    # NOTE: a worker on another node finds these files only where the output folder is shared,
    # as Ray Train's storage path under it already requires for a cluster of several nodes.
    return config, written


def fetch_surrogates(tracker: Tracker, setting: dict[str, Any], folder: Path,
                     overwrite: bool) -> dict[str, StoredSurrogate]:
    """Write the newest stored surrogate of each device kind at ``setting`` into ``folder``.

    Returns the surrogates written, by device key. A run whose artifact is missing, unreadable,
    or for another setting or device than its tags name is skipped with a warning.
    """
    digest = setting_digest(setting)
    runs = tracker.search_store_runs(f"tags.`{TAG_LATENCY_SETTING}` = '{digest}'",
                                     order_by=["attributes.start_time DESC"])
    written: dict[str, StoredSurrogate] = {}
    seen_devices: set[str] = set()
    for run in runs:
        key = run.data.tags.get(TAG_LATENCY_DEVICE)
        if key in seen_devices:
            continue  # an older surrogate of a device kind already served
        surrogate = _download_surrogate(tracker, run.info.run_id, key, setting)
        if surrogate is None:
            continue
        seen_devices.add(key)
        path = surrogate_cache_path(folder, key, setting)
        if path.exists() and not overwrite:
            logger.info("keeping the latency surrogate %s instead of the one of run %s", path,
                        run.info.run_id)
            continue
        save_surrogate(surrogate, path)
        written[key] = StoredSurrogate(run.info.run_id, surrogate)
        logger.info("fetched the latency surrogate of %s from run %s into %s", key, run.info.run_id, path)
    if not runs:
        logger.info("no run in the MLflow store has a latency surrogate of setting %s", digest)
    return written


def _download_surrogate(tracker: Tracker, run_id: str, key: str | None,
                        setting: dict[str, Any]) -> LatencySurrogate | None:
    """Return the surrogate artifact of a run when it matches the run's device tag and ``setting``."""
    with tempfile.TemporaryDirectory() as folder:
        try:
            surrogate = load_surrogate(tracker.client.download_artifacts(run_id, ARTIFACT_PATH, folder))
        except (MlflowException, OSError, ValueError, KeyError, TypeError) as error:
            logger.warning("skipping the latency surrogate of run %s: cannot read %s (%s)", run_id, ARTIFACT_PATH,
                           error)
            return None
    if surrogate.device_key != key or not _DEVICE_KEY.match(surrogate.device_key):
        logger.warning("skipping the latency surrogate of run %s: its device key %r differs from the run's tag "
                       "%s=%r", run_id, surrogate.device_key, TAG_LATENCY_DEVICE, key)
        return None
    if surrogate.setting != setting:
        logger.warning("skipping the latency surrogate of run %s: its setting %s differs from the search's %s",
                       run_id, surrogate.setting, setting)
        return None
    return surrogate


def record_search_surrogate(tracker: Tracker, run_id: str, path: Path, source: str | None,
                            fetched: dict[str, StoredSurrogate]) -> None:
    """Log a finished search's surrogate as an artifact and tag the run with its device, setting and origin.

    ``source`` is what the worker reported (cached or fitted). A cached surrogate equal to one
    fetched from the store also names that run, so the record shows which job timed it.
    """
    surrogate = load_surrogate(path)
    tracker.log_artifact(run_id, path, ARTIFACT_DIR)
    # Tagged only after the upload, so every run that the lookup finds has the artifact.
    tags = {TAG_LATENCY_DEVICE: surrogate.device_key, TAG_LATENCY_SETTING: setting_digest(surrogate.setting)}
    if source is not None:
        tags[TAG_LATENCY_SURROGATE] = source
    stored = fetched.get(surrogate.device_key)
    if source == SURROGATE_CACHED and stored is not None and stored.surrogate == surrogate:
        tags[TAG_LATENCY_SOURCE_RUN] = stored.run_id
        logger.info("search run %s reused the latency surrogate of %s from run %s", run_id, surrogate.device_key,
                    stored.run_id)
    else:
        logger.info("search run %s used a %s latency surrogate of %s", run_id, source or "checkpointed",
                    surrogate.device_key)
    tracker.set_tags(run_id, tags)
