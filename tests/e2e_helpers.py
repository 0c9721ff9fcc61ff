"""Tiny job specs and helpers for the end-to-end tests (real Ray, real SQLite MLflow)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

REPO_ROOT = Path(__file__).resolve().parents[1]


def tiny_spec(name: str, random_cells: int = 2, named: list[str] | None = None, search: bool = True,
              trial_cpus: float = 0.5, eval_epochs: int = 2) -> dict:
    spec = {
        "name": name,
        "seed": 0,
        "data": {"name": "digits", "validation_fraction": 0.2},
        "evaluate": {
            "found": search,
            "named": named or [],
            "random_cells": random_cells,
            "recipe": {"chs": 4, "layers": 3, "epochs": eval_epochs, "batch_size": 128, "warmup_epochs": 0,
                       "cutout": 0, "drop_path": 0.0},
            "trial_resources": {"cpus": trial_cpus},
            "max_concurrent": 4,
        },
        "ray": {"num_cpus": 2},
    }
    if search:
        spec["search"] = {"chs": 4, "layers": 3, "epochs": 2, "warmup_epochs": 1, "batch_size": 128,
                          "weight_lr": 0.003, "arch_lr": 0.03}
    return spec


def write_spec(folder: Path, spec: dict) -> Path:
    path = folder / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", MLFLOW_DISABLE_TELEMETRY="true",
               PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    return env


def run_cli(*args: str, timeout_s: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True,
                          cwd=REPO_ROOT, env=subprocess_env(), timeout=timeout_s)


def job_runs(output: Path) -> list:
    client = MlflowClient(f"sqlite:///{output / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, max_results=1000)


def runs_by_stage(runs: list) -> dict[str, list]:
    stages: dict[str, list] = {}
    for run in runs:
        stages.setdefault(run.data.tags.get("unas.stage"), []).append(run)
    return stages


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def kill_once_after_epoch(config: dict) -> None:
    """A Ray Train loop that kills its own process once, right after reporting epoch `kill_epoch`."""
    import signal

    import torch

    from workers.context import RayTrainContext
    from workers.search import run_search

    torch.set_num_threads(1)
    marker = Path(config["marker"])

    class KillingContext(RayTrainContext):
        def report(self, metrics, checkpoint_dir):
            super().report(metrics, checkpoint_dir)
            if metrics["epoch"] == config["kill_epoch"] and not marker.exists():
                marker.write_text("killed")
                os.kill(os.getpid(), signal.SIGKILL)

    run_search(config["search"], config["data"], KillingContext())


def raise_on_rank_one(config: dict) -> None:
    """A 2-worker Ray Train loop whose rank 1 raises after its first epoch; rank 0 goes on."""
    import time

    import torch

    from workers.context import RayTrainContext
    from workers.search import run_search

    torch.set_num_threads(1)

    class RaisingContext(RayTrainContext):
        def report(self, metrics, checkpoint_dir):
            super().report(metrics, checkpoint_dir)
            if self.rank == 1:
                Path(config["raised_at"]).write_text(repr(time.time()))
                raise RuntimeError("injected failure on rank 1")

    run_search(config["search"], config["data"], RaisingContext())
