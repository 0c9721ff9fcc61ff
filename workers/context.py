"""Run contexts, the targets of a worker loop's metrics and checkpoints: a plain process or a Ray Train worker.

The loops only see `RunContext`, so the same code runs under Ray, in a Tune trial and in a
single process for tests and debugging.
"""

import contextlib
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "state.pt"


class RunContext:
    """A single-process context: checkpoints go to a folder, metrics to a list and a callback."""

    rank = 0
    world_size = 1

    def __init__(self, checkpoint_root: str | Path | None = None,
                 on_report: Callable[[dict[str, Any]], None] | None = None):
        self.checkpoint_root = Path(checkpoint_root) if checkpoint_root else None
        self.on_report = on_report
        self.history: list[dict[str, Any]] = []

    @property
    def device(self) -> torch.device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        self.history.append(dict(metrics))
        if checkpoint_dir is not None and self.checkpoint_root is not None:
            target = self.checkpoint_root / f"epoch_{metrics['epoch']:05d}"
            shutil.copytree(checkpoint_dir, target, dirs_exist_ok=True)
            # Older epochs go only once the new one is complete on disk.
            for older in sorted(self.checkpoint_root.glob("epoch_*"))[:-1]:
                shutil.rmtree(older, ignore_errors=True)
        if self.on_report is not None:
            self.on_report(metrics)

    def report_with_checkpoint(self, metrics: dict[str, Any], state: Callable[[], dict[str, Any]],
                               extra_files: dict[str, str] | None = None) -> None:
        """Report an epoch's metrics with a checkpoint of state() and extra_files, written by rank 0 alone.

        state is called on rank 0 only, so other ranks never build the state dict.
        """
        folder = save_checkpoint(state(), extra_files) if self.rank == 0 else None
        try:
            self.report(metrics, folder)
        finally:
            # The report has copied the checkpoint by now, or it failed and stops the run.
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        if self.checkpoint_root is None or not self.checkpoint_root.is_dir():
            yield None
            return
        epochs = sorted(self.checkpoint_root.glob("epoch_*"))
        yield epochs[-1] if epochs else None


class RayTrainContext(RunContext):
    """Reports through ray.train; every rank reports, rank 0 alone attaches the checkpoint."""

    def __init__(self):
        super().__init__()
        import ray.train

        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()

    @property
    def device(self) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        import ray.train

        checkpoint = None
        if checkpoint_dir is not None and self.rank == 0:
            checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir))
        ray.train.report(metrics, checkpoint=checkpoint)

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as folder:
            yield Path(folder)


def configure_worker_logging(level: int = logging.INFO) -> None:
    """Shows the loops' progress lines from inside Ray worker processes.

    Only this project's loggers get a handler: Ray's own INFO lines stay at Ray's setting.
    """
    package_logger = logging.getLogger("workers")
    if not package_logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        package_logger.addHandler(handler)
        package_logger.propagate = False
    package_logger.setLevel(level)


def save_checkpoint(state: dict[str, Any], extra_files: dict[str, str] | None = None) -> Path:
    """Writes the state (and small text files) into a fresh temporary folder and returns it."""
    folder = Path(tempfile.mkdtemp(prefix="unas-ckpt-"))
    torch.save(state, folder / CHECKPOINT_FILE)
    for name, text in (extra_files or {}).items():
        (folder / name).write_text(text)
    return folder


def load_checkpoint(folder: Path) -> dict[str, Any]:
    return torch.load(folder / CHECKPOINT_FILE, map_location="cpu", weights_only=False)


def capture_rng_state(generator: torch.Generator | None = None) -> dict[str, Any]:
    import random

    import numpy as np

    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def restore_rng_state(state: dict[str, Any], generator: torch.Generator | None = None) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])
