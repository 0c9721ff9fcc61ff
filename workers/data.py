"""Data sets for search and evaluation, split reproducibly by the job's seed.

The digits set (1,797 8x8 images) ships inside scikit-learn, so a job on it needs no
download. CIFAR-10/100 are read from a local folder in torchvision's layout; nothing is
fetched unless the config says download=True.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from search_spaces.errors import UnasError
from workers.config import DataConfig

logger = logging.getLogger(__name__)

DATASETS = ("digits", "cifar10", "cifar100")
_CIFAR_MEAN = {"cifar10": (0.4914, 0.4822, 0.4465), "cifar100": (0.5071, 0.4865, 0.4409)}
_CIFAR_STD = {"cifar10": (0.2470, 0.2435, 0.2616), "cifar100": (0.2673, 0.2564, 0.2762)}
_CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


class DataError(UnasError):
    """A data set that is missing, malformed or too small for the request."""


@dataclass(frozen=True)
class DataInfo:
    in_chs: int
    image_size: int
    num_classes: int


def describe_dataset(name: str) -> DataInfo:
    if name == "digits":
        return DataInfo(in_chs=1, image_size=8, num_classes=10)
    if name in _CIFAR_FOLDERS:
        return DataInfo(in_chs=3, image_size=32, num_classes=10 if name == "cifar10" else 100)
    raise DataError(f"data.name: unknown data set {name!r}; valid names: {', '.join(DATASETS)}")


def check_data_available(config: DataConfig) -> None:
    """Raises before any work starts when a data folder is missing and no download was asked for."""
    if config.name == "digits" or config.download:
        return
    if config.root is None:
        raise DataError(f"data.root: {config.name} needs a folder; set data.root or data.download: true")
    folder = Path(config.root) / _CIFAR_FOLDERS[config.name]
    if not folder.is_dir():
        raise DataError(
            f"data.root: {config.root!r} has no {_CIFAR_FOLDERS[config.name]}/ folder (torchvision's "
            f"{config.name} layout); point data.root at it or set data.download: true"
        )


class TransformDataset(Dataset):
    """Applies a per-example transform to an (image, label) data set."""

    def __init__(self, base: Dataset, transform):
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        image, label = self.base[index]
        return self.transform(image), label


class Cutout:
    """Zeroes one square of the image at a random centre (training images only)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        y, x = np.random.randint(height), np.random.randint(width)
        top, bottom = max(0, y - self.size // 2), min(height, y + self.size // 2)
        left, right = max(0, x - self.size // 2), min(width, x + self.size // 2)
        image = image.clone()
        image[..., top:bottom, left:right] = 0.0
        return image


def _load_digits() -> TensorDataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    # Fixed constants rather than split statistics keep every split's inputs on the same scale.
    images = (images - 0.305) / 0.378
    return TensorDataset(images, torch.tensor(digits.target, dtype=torch.long))


def _split_indices(count: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded permutation cut into (1 - fraction, fraction) parts."""
    order = np.random.default_rng(seed).permutation(count)
    cut = count - int(round(count * fraction))
    return order[:cut], order[cut:]


def _digits_train_test(config: DataConfig) -> tuple[Dataset, Dataset]:
    full = _load_digits()
    train_idx, test_idx = _split_indices(len(full), config.test_fraction, config.split_seed)
    return Subset(full, train_idx.tolist()), Subset(full, test_idx.tolist())


def _cifar_train_test(config: DataConfig, train_transform, test_transform) -> tuple[Dataset, Dataset]:
    import torchvision

    check_data_available(config)
    cls = torchvision.datasets.CIFAR10 if config.name == "cifar10" else torchvision.datasets.CIFAR100
    root = config.root or "data"
    train = cls(root, train=True, download=config.download, transform=train_transform)
    test = cls(root, train=False, download=config.download, transform=test_transform)
    return train, test


def _cifar_transforms(name: str, augment: bool, cutout: int):
    from torchvision import transforms

    steps = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if augment else []
    steps += [transforms.ToTensor(), transforms.Normalize(_CIFAR_MEAN[name], _CIFAR_STD[name])]
    if augment and cutout > 0:
        steps.append(Cutout(cutout))
    return transforms.Compose(steps)


def load_search_data(config: DataConfig) -> tuple[Dataset, Dataset]:
    """The search's (train, validation) split of the training data; test data is never touched."""
    if config.name == "digits":
        pool, _ = _digits_train_test(config)
    else:
        pool, _ = _cifar_train_test(config, _cifar_transforms(config.name, True, 0), None)
    train_idx, val_idx = _split_indices(len(pool), config.validation_fraction, config.split_seed + 1)
    logger.info("search data %s: %d train / %d validation examples", config.name, len(train_idx), len(val_idx))
    return Subset(pool, train_idx.tolist()), Subset(pool, val_idx.tolist())


def load_eval_data(config: DataConfig, cutout: int) -> tuple[Dataset, Dataset]:
    """(train, test) for training a cell from scratch; cutout applies to training images only."""
    if config.name == "digits":
        train, test = _digits_train_test(config)
        if cutout > 0:
            train = TransformDataset(train, Cutout(cutout))
        return train, test
    return _cifar_train_test(
        config, _cifar_transforms(config.name, True, cutout), _cifar_transforms(config.name, False, 0)
    )
