"""Shared fixtures: quiet, local-only Ray and MLflow settings for every test."""

import os

# Set before Ray or MLflow is imported anywhere in the test session.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="module")
def single_torch_thread():
    """Run a module's tests on one intra-op thread and restore the thread count afterwards.

    Tiny tensors gain nothing from more threads, and the "thread" latency clock needs exactly one.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
