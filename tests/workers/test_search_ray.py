"""A 2-worker search inside Ray Train (gloo on the CPU) on a real local Ray runtime."""

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import ray.cloudpickle
from ray.train import RunConfig, ScalingConfig, UserCallback
from ray.train.torch import TorchConfig, TorchTrainer

from workers.config import DataConfig, SearchConfig
from workers.search import GENOTYPE_FILE, search_worker

REPO_ROOT = Path(__file__).resolve().parents[2]
EPOCHS = 2
SEARCH = SearchConfig(chs=4, layers=3, epochs=EPOCHS, warmup_epochs=1, batch_size=64, estimator="rebar",
                      weight_lr=3e-3, arch_lr=3e-2)
DATA = DataConfig(name="digits", test_fraction=0.6, validation_fraction=0.5)


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    # The Train controller unpickles RankMetricsWriter: by value, it needs no import of this
    # module under the name pytest gave it.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    # address="local" starts a fresh runtime even where another test left a cluster running.
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT), "RAY_AUTH_MODE": "disabled"}})
    yield
    ray.shutdown()
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


class RankMetricsWriter(UserCallback):
    """Writes every rank's reported metrics to <folder>/epoch_<e>_rank_<r>.json.

    The Train result keeps rank 0's metrics only, and callbacks run in the controller process,
    so the test reads rank 1's from these files.
    """

    def __init__(self, folder: Path):
        self.folder = folder

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        for rank, rank_metrics in enumerate(metrics):
            name = f"epoch_{int(rank_metrics['epoch'])}_rank_{rank}.json"
            (self.folder / name).write_text(json.dumps(rank_metrics))


def rank_metrics(folder: Path, epoch: int, rank: int) -> dict[str, Any]:
    return json.loads((folder / f"epoch_{epoch}_rank_{rank}.json").read_text())


def test_two_worker_search_ranks_agree(local_ray, tmp_path):
    metrics_folder = tmp_path / "metrics"
    metrics_folder.mkdir()
    trainer = TorchTrainer(
        search_worker,
        train_loop_config={"search": SEARCH, "data": DATA},
        scaling_config=ScalingConfig(num_workers=2),
        torch_config=TorchConfig(backend="gloo"),
        run_config=RunConfig(name="two-worker-search", storage_path=str(tmp_path / "ray"),
                             callbacks=[RankMetricsWriter(metrics_folder)]),
    )
    result = trainer.fit()
    assert result.error is None

    for epoch in range(1, EPOCHS + 1):
        first, second = rank_metrics(metrics_folder, epoch, 0), rank_metrics(metrics_folder, epoch, 1)
        assert first["genotype"] == second["genotype"], f"epoch {epoch}: the ranks' genotypes differ"
        # The entropy is a function of all logits, so equal entropies mean no rank drifted.
        assert first["entropy"] == second["entropy"], f"epoch {epoch}: the ranks' architecture logits differ"
        assert first["train_loss"] == second["train_loss"], f"epoch {epoch}: metrics were not averaged"

    last = rank_metrics(metrics_folder, EPOCHS, 0)
    assert last["entropy"] < rank_metrics(metrics_folder, 1, 0)["entropy"], "the logits never left uniform"
    with result.checkpoint.as_directory() as folder:
        assert (Path(folder) / GENOTYPE_FILE).read_text() == last["genotype"]
