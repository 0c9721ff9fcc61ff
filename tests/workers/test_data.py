"""Data loading from the real on-disk layouts, written small into tmp_path: CIFAR python batch
files and ImageNet class folders. Nothing here downloads."""

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from workers.config import DataConfig
from workers.data import DataError, check_data_available, describe_dataset, load_eval_data, load_search_data

CIFAR10_MEAN = np.array([0.4914, 0.4822, 0.4465], dtype=np.float32)
CIFAR10_STD = np.array([0.2470, 0.2435, 0.2616], dtype=np.float32)
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


@pytest.fixture(autouse=True)
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def write_cifar_batch(path: Path, images: np.ndarray, labels: list[int], label_key: str) -> None:
    """Writes images (N, 32, 32, 3) uint8 as a CIFAR python batch file (channel-major rows)."""
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    with path.open("wb") as file:
        pickle.dump({"data": rows, label_key: labels, "batch_label": "fake"}, file)


def make_cifar10(root: Path, per_batch: int = 4, test_count: int = 6, seed: int = 0) -> dict[str, np.ndarray]:
    """A fake cifar-10-batches-py folder; returns the test images and labels as written."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for index in range(1, 6):
        images = rng.integers(0, 256, (per_batch, 32, 32, 3), dtype=np.uint8)
        write_cifar_batch(folder / f"data_batch_{index}", images, rng.integers(0, 10, per_batch).tolist(), "labels")
    test_images = rng.integers(0, 256, (test_count, 32, 32, 3), dtype=np.uint8)
    test_labels = rng.integers(0, 10, test_count).tolist()
    write_cifar_batch(folder / "test_batch", test_images, test_labels, "labels")
    return {"images": test_images, "labels": np.array(test_labels)}


def make_imagenet(root: Path, classes: tuple[str, ...] = ("n01", "n02", "n03"), per_class: int = 3,
                  size: tuple[int, int] = (48, 36), seed: int = 0) -> dict[str, list[Path]]:
    """Fake train/ and val/ class folders of random PNG images (width, height = size)."""
    rng = np.random.default_rng(seed)
    files: dict[str, list[Path]] = {"train": [], "val": []}
    for split in ("train", "val"):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(per_class):
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                path = folder / f"{name}_{index}.png"
                Image.fromarray(pixels).save(path)
                files[split].append(path)
    return files


def small_imagenet_config(root: Path, **overrides) -> DataConfig:
    return DataConfig(name="imagenet", root=str(root), crop_size=32, resize_size=36, **overrides)


def normalise(pixels: np.ndarray, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 to a normalised (3, H, W) float tensor, computed without torchvision."""
    values = (pixels.astype(np.float32) / 255.0 - mean) / std
    return torch.from_numpy(values.transpose(2, 0, 1).copy())


# describe_dataset ------------------------------------------------------------------------------


def test_describe_dataset_imagenet_defaults():
    info = describe_dataset("imagenet")

    assert info.in_chs == 3
    assert info.image_size == 224
    assert info.num_classes == 1000


def test_describe_dataset_imagenet_counts_class_folders(tmp_path):
    make_imagenet(tmp_path, classes=("a", "b", "c", "d"), per_class=1)

    assert describe_dataset("imagenet", str(tmp_path)).num_classes == 4


def test_describe_dataset_cifar100_classes():
    assert describe_dataset("cifar100").num_classes == 100


def test_describe_dataset_unknown_name():
    with pytest.raises(DataError, match="valid names"):
        describe_dataset("mnist")


# CIFAR -----------------------------------------------------------------------------------------


def test_cifar10_loads_batch_files(tmp_path):
    written = make_cifar10(tmp_path, per_batch=4, test_count=6)

    train, test = load_eval_data(DataConfig(name="cifar10", root=str(tmp_path)), cutout=0)

    assert len(train) == 20
    assert len(test) == 6
    assert [test[i][1] for i in range(6)] == written["labels"].tolist()
    assert train[0][0].shape == (3, 32, 32)


def test_cifar100_reads_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    images = np.zeros((3, 32, 32, 3), dtype=np.uint8)
    write_cifar_batch(folder / "train", images, [5, 99, 0], "fine_labels")
    write_cifar_batch(folder / "test", images[:2], [42, 7], "fine_labels")

    train, test = load_eval_data(DataConfig(name="cifar100", root=str(tmp_path)), cutout=0)

    assert [train[i][1] for i in range(3)] == [5, 99, 0]
    assert [test[i][1] for i in range(2)] == [42, 7]


def test_cifar_test_images_untouched_by_augmentation(tmp_path):
    written = make_cifar10(tmp_path)
    config = DataConfig(name="cifar10", root=str(tmp_path))

    _, test = load_eval_data(config, cutout=16)

    for index in range(len(test)):
        expected = normalise(written["images"][index], CIFAR10_MEAN, CIFAR10_STD)
        first, second = test[index][0], test[index][0]
        assert torch.equal(first, second)
        torch.testing.assert_close(first, expected, rtol=0, atol=1e-5)


def test_cifar_training_images_augmented(tmp_path):
    make_cifar10(tmp_path)
    train, _ = load_eval_data(DataConfig(name="cifar10", root=str(tmp_path)), cutout=16)

    torch.manual_seed(0)
    np.random.seed(0)
    views = [train[0][0] for _ in range(8)]

    assert any(not torch.equal(views[0], view) for view in views[1:])
    # Cutout zeroes a square after normalisation, so exact zeros show it ran.
    assert all((view == 0).sum() > 0 for view in views)


def test_cifar_check_without_root():
    with pytest.raises(DataError, match="data_batch_1"):
        check_data_available(DataConfig(name="cifar10"))


def test_cifar_check_missing_folder(tmp_path):
    with pytest.raises(DataError) as error:
        check_data_available(DataConfig(name="cifar10", root=str(tmp_path)))

    message = str(error.value)
    assert str(tmp_path / "cifar-10-batches-py") in message
    assert "data_batch_1" in message
    assert "test_batch" in message


def test_cifar_check_missing_batch_file(tmp_path):
    make_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()

    with pytest.raises(DataError) as error:
        check_data_available(DataConfig(name="cifar10", root=str(tmp_path)))

    message = str(error.value)
    assert "missing data_batch_3" in message
    assert str(tmp_path / "cifar-10-batches-py") in message


def test_cifar_load_missing_batch_file(tmp_path):
    make_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()

    with pytest.raises(DataError, match="missing test_batch"):
        load_eval_data(DataConfig(name="cifar10", root=str(tmp_path)), cutout=0)


def test_cifar_load_corrupt_batch_file(tmp_path):
    make_cifar10(tmp_path)
    corrupt = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    corrupt.write_bytes(b"not a pickle")

    with pytest.raises(DataError) as error:
        load_eval_data(DataConfig(name="cifar10", root=str(tmp_path)), cutout=0)

    assert str(corrupt) in str(error.value)
    assert "'data'" in str(error.value)


def test_cifar_load_wrong_row_size(tmp_path):
    make_cifar10(tmp_path)
    wrong = tmp_path / "cifar-10-batches-py" / "test_batch"
    with wrong.open("wb") as file:
        pickle.dump({"data": np.zeros((3, 1024), dtype=np.uint8), "labels": [0, 1, 2]}, file)

    with pytest.raises(DataError) as error:
        load_eval_data(DataConfig(name="cifar10", root=str(tmp_path)), cutout=0)

    assert str(wrong) in str(error.value)
    assert "3072" in str(error.value)


def test_cifar_download_skipped_when_not_requested(tmp_path, monkeypatch):
    import torchvision

    def fail_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", fail_download)
    make_cifar10(tmp_path)

    train, _ = load_eval_data(DataConfig(name="cifar10", root=str(tmp_path), download=False), cutout=0)

    assert len(train) == 20


def test_cifar_search_data_splits_training_batches(tmp_path):
    make_cifar10(tmp_path, per_batch=4)

    train, validation = load_search_data(DataConfig(name="cifar10", root=str(tmp_path), validation_fraction=0.25))

    assert len(train) == 15
    assert len(validation) == 5
    assert set(train.indices).isdisjoint(validation.indices)


# ImageNet --------------------------------------------------------------------------------------


def test_imagenet_loads_class_folders(tmp_path):
    make_imagenet(tmp_path, classes=("n01", "n02"), per_class=3)

    train, test = load_eval_data(small_imagenet_config(tmp_path), cutout=0)

    assert len(train) == 6
    assert len(test) == 6
    assert sorted({test[i][1] for i in range(6)}) == [0, 1]
    assert train[0][0].shape == (3, 32, 32)


def test_imagenet_test_images_are_centre_crops(tmp_path):
    # 48x36 images: the shorter side already equals resize_size, so the expected test image is a
    # plain centre crop of the file's pixels.
    files = make_imagenet(tmp_path, classes=("n01", "n02"), per_class=2, size=(48, 36))

    _, test = load_eval_data(small_imagenet_config(tmp_path, color_jitter=0.4), cutout=16)

    for index, path in enumerate(sorted(files["val"])):
        pixels = np.asarray(Image.open(path).convert("RGB"))
        expected = normalise(pixels[2:34, 8:40], IMAGENET_MEAN, IMAGENET_STD)
        first, second = test[index][0], test[index][0]
        assert torch.equal(first, second)
        torch.testing.assert_close(first, expected, rtol=0, atol=1e-5)


def test_imagenet_test_images_resized_first(tmp_path):
    files = make_imagenet(tmp_path, classes=("n01",), per_class=1, size=(80, 72))

    _, test = load_eval_data(small_imagenet_config(tmp_path), cutout=0)

    image = Image.open(files["val"][0]).convert("RGB")
    resized = np.asarray(image.resize((40, 36), Image.Resampling.BILINEAR))
    expected = normalise(resized[2:34, 4:36], IMAGENET_MEAN, IMAGENET_STD)
    torch.testing.assert_close(test[0][0], expected, rtol=0, atol=1e-5)


def test_imagenet_color_jitter_changes_training_colours(tmp_path):
    # A uniform image stays uniform under crops, resizes and flips, so a colour change is jitter.
    colour = (120, 80, 200)
    for split in ("train", "val"):
        (tmp_path / split / "n01").mkdir(parents=True)
        Image.fromarray(np.full((36, 48, 3), colour, dtype=np.uint8)).save(tmp_path / split / "n01" / "a.png")
    plain = normalise(np.full((32, 32, 3), colour, dtype=np.uint8), IMAGENET_MEAN, IMAGENET_STD)

    torch.manual_seed(0)
    jittered, _ = load_eval_data(small_imagenet_config(tmp_path, color_jitter=0.4), cutout=0)
    unjittered, _ = load_eval_data(small_imagenet_config(tmp_path, color_jitter=0.0), cutout=0)

    assert all(not torch.allclose(jittered[0][0], plain, atol=1e-3) for _ in range(5))
    for _ in range(5):
        torch.testing.assert_close(unjittered[0][0], plain, rtol=0, atol=1e-5)


def test_imagenet_training_images_vary(tmp_path):
    make_imagenet(tmp_path, classes=("n01",), per_class=1)
    train, _ = load_eval_data(small_imagenet_config(tmp_path, color_jitter=0.0), cutout=0)

    torch.manual_seed(0)
    views = [train[0][0] for _ in range(6)]

    assert any(not torch.equal(views[0], view) for view in views[1:])


def test_imagenet_download_rejected(tmp_path):
    make_imagenet(tmp_path, per_class=1)
    config = DataConfig(name="imagenet", root=str(tmp_path), download=True)

    with pytest.raises(DataError, match="ImageNet cannot be downloaded"):
        check_data_available(config)
    with pytest.raises(DataError, match="ImageNet cannot be downloaded"):
        load_eval_data(config, cutout=0)


def test_imagenet_check_without_root():
    with pytest.raises(DataError, match="train/<class>"):
        check_data_available(DataConfig(name="imagenet"))


def test_imagenet_check_missing_val(tmp_path):
    make_imagenet(tmp_path, per_class=1)
    for path in sorted((tmp_path / "val").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (tmp_path / "val").rmdir()

    with pytest.raises(DataError) as error:
        check_data_available(DataConfig(name="imagenet", root=str(tmp_path)))

    assert str(tmp_path / "val") in str(error.value)
    assert "val/<class>/<image>" in str(error.value)


def test_imagenet_check_flat_val_folder(tmp_path):
    make_imagenet(tmp_path, per_class=1)
    for folder in (tmp_path / "val").iterdir():
        for image in folder.iterdir():
            image.rename(tmp_path / "val" / image.name)
        folder.rmdir()

    with pytest.raises(DataError) as error:
        check_data_available(DataConfig(name="imagenet", root=str(tmp_path)))

    assert "has no class folders" in str(error.value)
    assert str(tmp_path / "val") in str(error.value)


def test_imagenet_check_mismatched_classes(tmp_path):
    make_imagenet(tmp_path, classes=("n01", "n02"), per_class=1)
    (tmp_path / "val" / "n02").rename(tmp_path / "val" / "n09")

    with pytest.raises(DataError) as error:
        check_data_available(DataConfig(name="imagenet", root=str(tmp_path)))

    message = str(error.value)
    assert "only in train: ['n02']" in message
    assert "only in val: ['n09']" in message


def test_imagenet_load_empty_class_folder(tmp_path):
    make_imagenet(tmp_path, classes=("n01", "n02"), per_class=1)
    for image in (tmp_path / "train" / "n02").iterdir():
        image.unlink()

    with pytest.raises(DataError) as error:
        load_eval_data(small_imagenet_config(tmp_path), cutout=0)

    assert str(tmp_path / "train") in str(error.value)


def test_imagenet_search_data_uses_train_folder(tmp_path):
    make_imagenet(tmp_path, classes=("n01", "n02"), per_class=5)

    train, validation = load_search_data(small_imagenet_config(tmp_path, validation_fraction=0.2))

    assert len(train) == 8
    assert len(validation) == 2
    assert train.dataset.root == str(tmp_path / "train")


# digits ----------------------------------------------------------------------------------------


def test_digits_cutout_training_only():
    config = DataConfig()
    plain_train, plain_test = load_eval_data(config, cutout=0)

    np.random.seed(0)
    train, test = load_eval_data(config, cutout=4)

    assert torch.equal(test[0][0], plain_test[0][0])
    assert not torch.equal(train[0][0], plain_train[0][0])


def test_digits_check_needs_no_folder():
    check_data_available(DataConfig(name="digits", root=None))
