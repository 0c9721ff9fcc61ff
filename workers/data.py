"""Data sets for search and evaluation, split reproducibly by the job's seed.

The digits set (1,797 8x8 images) ships inside scikit-learn, so a job on it needs no
download. CIFAR-10/100 are read from a local folder in torchvision's python layout, and
ImageNet from `train/` and `val/` class folders (torchvision's ImageFolder layout). Nothing
is fetched unless the config sets download=True, and ImageNet cannot be downloaded at all.
"""

import logging
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset, TensorDataset

from search_spaces.errors import UnasError
from workers.config import DataConfig

logger = logging.getLogger(__name__)

DATASETS = ("digits", "cifar10", "cifar100", "imagenet")
IMAGENET_CLASSES = 1000
_CIFAR_MEAN = {"cifar10": (0.4914, 0.4822, 0.4465), "cifar100": (0.5071, 0.4865, 0.4409)}
_CIFAR_STD = {"cifar10": (0.2470, 0.2435, 0.2616), "cifar100": (0.2673, 0.2564, 0.2762)}
_CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
# (training batch files, test batch files) of the python versions on the CIFAR home page.
_CIFAR_FILES = {
    "cifar10": (tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",)),
    "cifar100": (("train",), ("test",)),
}
_CIFAR_LABEL_KEYS = {"cifar10": "labels", "cifar100": "fine_labels"}
_CIFAR_CLASSES = {"cifar10": 10, "cifar100": 100}
_CIFAR_PIXELS = 3 * 32 * 32
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_IMAGENET_LAYOUT = ("<root>/train/<class>/<image> and <root>/val/<class>/<image> with the same class "
                    "folders in both (torchvision's ImageFolder layout; the flat ILSVRC validation folder "
                    "has to be sorted into class folders first)")


class DataError(UnasError):
    """A data set that is missing, malformed or too small for the request."""


@dataclass(frozen=True)
class DataInfo:
    in_chs: int
    image_size: int
    num_classes: int


def describe_dataset(name: str, root: str | None = None) -> DataInfo:
    """Input shape and class count; for ImageNet, `root` lets the class folders set the count."""
    if name == "digits":
        return DataInfo(in_chs=1, image_size=8, num_classes=10)
    if name in _CIFAR_FOLDERS:
        return DataInfo(in_chs=3, image_size=32, num_classes=_CIFAR_CLASSES[name])
    if name == "imagenet":
        return DataInfo(in_chs=3, image_size=224, num_classes=_imagenet_class_count(root))
    raise DataError(f"data.name: unknown data set {name!r}; valid names: {', '.join(DATASETS)}")


def check_data_available(config: DataConfig) -> None:
    """Raises DataError before any work starts when a data folder is missing or malformed.

    Only folder and file names are checked here; the contents are checked when loaded.
    """
    if config.name not in DATASETS:
        raise DataError(f"data.name: unknown data set {config.name!r}; valid names: {', '.join(DATASETS)}")
    if config.name == "imagenet":
        if config.download:
            raise DataError("data.download: ImageNet cannot be downloaded automatically (it needs an account "
                            f"at image-net.org); place it under data.root as {_IMAGENET_LAYOUT} and set "
                            "data.download: false")
        _check_imagenet_folder(config.root)
        return
    if config.name == "digits" or config.download:
        return
    _check_cifar_folder(config.name, config.root)


# CIFAR ---------------------------------------------------------------------------------------


def _cifar_layout(name: str) -> str:
    train_files, test_files = _CIFAR_FILES[name]
    return f"<root>/{_CIFAR_FOLDERS[name]}/ with the batch files {', '.join(train_files + test_files)}"


def _check_cifar_folder(name: str, root: str | None) -> None:
    expected = f"expected {_cifar_layout(name)} (torchvision's {name} python layout)"
    if root is None:
        raise DataError(f"data.root: {name} needs a folder, {expected}; set data.root or data.download: true")
    folder = Path(root) / _CIFAR_FOLDERS[name]
    if not folder.is_dir():
        raise DataError(f"data.root: {str(folder)!r} does not exist, {expected}; point data.root at the folder "
                        f"that contains {_CIFAR_FOLDERS[name]}/ or set data.download: true")
    train_files, test_files = _CIFAR_FILES[name]
    missing = [file for file in train_files + test_files if not (folder / file).is_file()]
    if missing:
        raise DataError(f"data.root: {str(folder)!r} is missing {', '.join(missing)}, {expected}; "
                        f"restore the files or set data.download: true")


def _read_cifar_batch(path: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Returns the images (N, 32, 32, 3) uint8 and the labels (N,) of one pickled batch file."""
    label_key = _CIFAR_LABEL_KEYS[name]
    expected = f"expected a pickled dict with 'data' (N x {_CIFAR_PIXELS} uint8) and '{label_key}' (N labels)"
    try:
        with path.open("rb") as file:
            # The batch files were pickled by Python 2; latin1 turns their str keys into str.
            entry = pickle.load(file, encoding="latin1")
        data = np.asarray(entry["data"], dtype=np.uint8)
        labels = np.asarray(entry[label_key], dtype=np.int64)
    except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError, IndexError) as error:
        raise DataError(f"data.root: {str(path)!r} is not a valid {name} batch file "
                        f"({type(error).__name__}: {error}), {expected}") from error
    if data.ndim != 2 or data.shape[1] != _CIFAR_PIXELS or labels.shape != (data.shape[0],):
        raise DataError(f"data.root: {str(path)!r} has data of shape {data.shape} and {labels.size} labels, "
                        f"{expected}")
    if labels.size and (labels.min() < 0 or labels.max() >= _CIFAR_CLASSES[name]):
        raise DataError(f"data.root: {str(path)!r} has labels outside 0..{_CIFAR_CLASSES[name] - 1}, {expected}")
    # The rows are stored channel-major (1024 red, 1024 green, 1024 blue values).
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _read_cifar_split(folder: Path, name: str, files: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    parts = [_read_cifar_batch(folder / file, name) for file in files]
    return np.concatenate([images for images, _ in parts]), np.concatenate([labels for _, labels in parts])


def _download_cifar(name: str, root: str) -> None:
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    logger.info("downloading %s into %s unless it is already there", name, root)
    try:
        cls(root, train=True, download=True)
    except (OSError, RuntimeError) as error:
        raise DataError(f"data.download: downloading {name} into {root!r} failed ({error}); check the network "
                        f"or place {_cifar_layout(name)} there yourself") from error


class ImageArrayDataset(Dataset):
    """(image, label) pairs from an (N, H, W, 3) uint8 array; the transform receives PIL images."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.images[index])
        return self.transform(image), int(self.labels[index])


def _cifar_train_test(config: DataConfig, train_transform, test_transform) -> tuple[Dataset, Dataset]:
    root = config.root or "data"
    if config.download:
        _download_cifar(config.name, root)
    _check_cifar_folder(config.name, root)
    folder = Path(root) / _CIFAR_FOLDERS[config.name]
    train_files, test_files = _CIFAR_FILES[config.name]
    train = ImageArrayDataset(*_read_cifar_split(folder, config.name, train_files), train_transform)
    test = ImageArrayDataset(*_read_cifar_split(folder, config.name, test_files), test_transform)
    return train, test


def _cifar_transforms(name: str, augment: bool, cutout: int):
    from torchvision import transforms

    steps = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if augment else []
    steps += [transforms.ToTensor(), transforms.Normalize(_CIFAR_MEAN[name], _CIFAR_STD[name])]
    if augment and cutout > 0:
        steps.append(Cutout(cutout))
    return transforms.Compose(steps)


# ImageNet ------------------------------------------------------------------------------------


def _class_folders(folder: Path) -> list[str]:
    return sorted(entry.name for entry in folder.iterdir() if entry.is_dir())


def _imagenet_class_count(root: str | None) -> int:
    """Counts the class folders under root/train/; returns 1000 when there is no such folder yet."""
    if root is None or not (Path(root) / "train").is_dir():
        return IMAGENET_CLASSES
    return len(_class_folders(Path(root) / "train")) or IMAGENET_CLASSES


def _check_imagenet_folder(root: str | None) -> None:
    expected = f"expected {_IMAGENET_LAYOUT}"
    if root is None:
        raise DataError(f"data.root: imagenet needs a folder, {expected}; set data.root")
    classes = {}
    for split in ("train", "val"):
        folder = Path(root) / split
        if not folder.is_dir():
            raise DataError(f"data.root: {str(folder)!r} does not exist, {expected}")
        classes[split] = _class_folders(folder)
        if not classes[split]:
            raise DataError(f"data.root: {str(folder)!r} has no class folders, {expected}")
    if classes["train"] != classes["val"]:
        only_train = sorted(set(classes["train"]) - set(classes["val"]))
        only_val = sorted(set(classes["val"]) - set(classes["train"]))
        raise DataError(f"data.root: the class folders of {str(Path(root) / 'train')!r} and "
                        f"{str(Path(root) / 'val')!r} differ (only in train: {only_train[:5]}, only in val: "
                        f"{only_val[:5]}), {expected}")


def _image_folder(folder: Path, transform) -> Dataset:
    from torchvision.datasets import ImageFolder

    try:
        return ImageFolder(str(folder), transform=transform)
    except FileNotFoundError as error:
        # ImageFolder raises this for a class folder without a single image file.
        raise DataError(f"data.root: {str(folder)!r} is malformed ({error}), expected {_IMAGENET_LAYOUT}") from error


def _imagenet_transforms(config: DataConfig, augment: bool, cutout: int):
    """Training: random resized crop, flip and colour jitter. Test: resize, then centre crop."""
    from torchvision import transforms

    if augment:
        steps = [transforms.RandomResizedCrop(config.crop_size), transforms.RandomHorizontalFlip()]
        if config.color_jitter > 0:
            # Hue moves half as far as the rest, as in DARTS's train_imagenet.py (0.4 and hue 0.2).
            strength = config.color_jitter
            steps.append(transforms.ColorJitter(strength, strength, strength, hue=min(0.5, strength / 2)))
    else:
        steps = [transforms.Resize(config.resize_size), transforms.CenterCrop(config.crop_size)]
    steps += [transforms.ToTensor(), transforms.Normalize(_IMAGENET_MEAN, _IMAGENET_STD)]
    if augment and cutout > 0:
        steps.append(Cutout(cutout))
    return transforms.Compose(steps)


def _check_imagenet_sizes(config: DataConfig) -> None:
    if config.crop_size <= 0 or config.resize_size <= 0:
        raise DataError(f"data.crop_size, data.resize_size: {config.crop_size}, {config.resize_size} are not "
                        f"allowed; both must be positive")
    if config.color_jitter < 0:
        raise DataError(f"data.color_jitter: {config.color_jitter} is negative; use 0 to turn jitter off")


def _imagenet_train_test(config: DataConfig, train_transform, test_transform) -> tuple[Dataset, Dataset]:
    check_data_available(config)
    train = _image_folder(Path(config.root) / "train", train_transform)
    test = _image_folder(Path(config.root) / "val", test_transform)
    return train, test


# Digits and shared pieces --------------------------------------------------------------------


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
    """Cuts a seeded permutation into (1 - fraction, fraction) parts."""
    order = np.random.default_rng(seed).permutation(count)
    cut = count - int(round(count * fraction))
    return order[:cut], order[cut:]


def _digits_train_test(config: DataConfig) -> tuple[Dataset, Dataset]:
    full = _load_digits()
    train_idx, test_idx = _split_indices(len(full), config.test_fraction, config.split_seed)
    return Subset(full, train_idx.tolist()), Subset(full, test_idx.tolist())


def _search_pool(config: DataConfig) -> Dataset:
    """Loads the training images that the search splits into its own train and validation parts."""
    if config.name == "digits":
        pool, _ = _digits_train_test(config)
        return pool
    if config.name == "imagenet":
        _check_imagenet_sizes(config)
        pool, _ = _imagenet_train_test(config, _imagenet_transforms(config, True, 0), None)
        return pool
    if config.name in _CIFAR_FOLDERS:
        pool, _ = _cifar_train_test(config, _cifar_transforms(config.name, True, 0), None)
        return pool
    raise DataError(f"data.name: unknown data set {config.name!r}; valid names: {', '.join(DATASETS)}")


def load_search_data(config: DataConfig) -> tuple[Dataset, Dataset]:
    """Returns the search's (train, validation) split of the training data. Test data is not used."""
    pool = _search_pool(config)
    train_idx, val_idx = _split_indices(len(pool), config.validation_fraction, config.split_seed + 1)
    logger.info("search data %s: %d train / %d validation examples", config.name, len(train_idx), len(val_idx))
    return Subset(pool, train_idx.tolist()), Subset(pool, val_idx.tolist())


def load_eval_data(config: DataConfig, cutout: int) -> tuple[Dataset, Dataset]:
    """(train, test) for training a cell from scratch; cutout and colour jitter touch training images only."""
    if config.name == "digits":
        train, test = _digits_train_test(config)
        if cutout > 0:
            train = TransformDataset(train, Cutout(cutout))
        return train, test
    if config.name == "imagenet":
        _check_imagenet_sizes(config)
        return _imagenet_train_test(config, _imagenet_transforms(config, True, cutout),
                                    _imagenet_transforms(config, False, 0))
    if config.name in _CIFAR_FOLDERS:
        return _cifar_train_test(config, _cifar_transforms(config.name, True, cutout),
                                 _cifar_transforms(config.name, False, 0))
    raise DataError(f"data.name: unknown data set {config.name!r}; valid names: {', '.join(DATASETS)}")


def is_in_memory(name: str) -> bool:
    """True for data sets held as tensors, where loader worker processes only add overhead."""
    return name == "digits"
