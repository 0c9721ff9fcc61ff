"""The evaluation loop on real data (digits, and small fake ImageNet folders), in one process."""

import dataclasses
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from search_spaces import proxyless
from search_spaces.darts import get_genotype
from search_spaces.darts.counting import count_params_m
from search_spaces.errors import UnasError
from workers.config import DataConfig, EvalRecipe
from workers.context import CHECKPOINT_FILE, RunContext
from workers import evaluate
from workers.evaluate import (
    build_eval_network,
    check_recipe,
    paper_recipe,
    recipe_lr,
    resolve_loader_workers,
    run_evaluation,
    train_epoch,
)
from workers.genotype_spaces import ProxylessSpace

GENOTYPE = get_genotype("UNAS_CIFAR10")


@pytest.fixture(autouse=True)
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class CpuContext(RunContext):
    """Runs on the CPU even where a GPU exists, so weights compare bit for bit."""

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")


class Interrupted(Exception):
    pass


def tiny_recipe(**overrides) -> EvalRecipe:
    settings = dict(chs=4, layers=3, epochs=3, batch_size=512, lr=0.05, warmup_epochs=0, drop_path=0.2,
                    auxiliary_weight=0.4, cutout=4, seed=0)
    settings.update(overrides)
    return EvalRecipe(**settings)


def make_imagenet(root: Path, classes: int, per_class: int, size: int = 40) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in range(classes):
            folder = root / split / f"n{label:02d}"
            folder.mkdir(parents=True)
            for index in range(per_class):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.png")


def expected_lr(base: float, base_min: float, scale: float, warmup: int, epochs: int, epoch: int) -> float:
    """Warm-up from base / warmup to base, then half a cosine from base towards base_min."""
    if epoch < warmup:
        return scale * base * (epoch + 1) / warmup
    fraction = (epoch - warmup) / (epochs - warmup)
    return scale * (base_min + (base - base_min) * (1 + math.cos(math.pi * fraction)) / 2)


def fixed_batches(count: int, batch: int, classes: int = 10, size: int = 8, seed: int = 0) -> list:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 1, size, size, generator=generator),
             torch.randint(0, classes, (batch,), generator=generator)) for _ in range(count)]


def network_weights(checkpoint_root: Path) -> dict[str, torch.Tensor]:
    latest = sorted(checkpoint_root.glob("epoch_*"))[-1]
    return torch.load(latest / CHECKPOINT_FILE, weights_only=False)["network"]


# Learning rate -------------------------------------------------------------------------------


@pytest.mark.parametrize("warmup, reference_batch", [(2, 0), (0, 256)])
def test_run_evaluation_lr_matches_closed_form(warmup, reference_batch):
    recipe = tiny_recipe(epochs=6, warmup_epochs=warmup, lr=0.08, lr_min=0.01, reference_batch_size=reference_batch,
                         cutout=0, drop_path=0.0)
    context = CpuContext()

    run_evaluation(GENOTYPE, recipe, DataConfig(), context)

    scale = 512 / reference_batch if reference_batch else 1.0
    used = [metrics["lr"] for metrics in context.history]
    expected = [expected_lr(0.08, 0.01, scale, warmup, 6, epoch) for epoch in range(6)]
    assert used == pytest.approx(expected, rel=1e-12)


def test_run_evaluation_lr_epoch_zero():
    with_warmup, without_warmup = CpuContext(), CpuContext()

    run_evaluation(GENOTYPE, tiny_recipe(epochs=4, warmup_epochs=2, lr=0.1), DataConfig(), with_warmup)
    run_evaluation(GENOTYPE, tiny_recipe(epochs=4, warmup_epochs=0, lr=0.1), DataConfig(), without_warmup)

    assert with_warmup.history[0]["lr"] == pytest.approx(0.05)
    assert with_warmup.history[1]["lr"] == pytest.approx(0.1)
    assert with_warmup.history[2]["lr"] == pytest.approx(0.1)
    assert without_warmup.history[0]["lr"] == 0.1


def test_run_evaluation_drop_path_ramps_linearly():
    context = CpuContext()

    run_evaluation(GENOTYPE, tiny_recipe(epochs=4, drop_path=0.2), DataConfig(), context)

    assert [metrics["drop_path_prob"] for metrics in context.history] == pytest.approx([0.0, 0.05, 0.1, 0.15])


# Recipes ---------------------------------------------------------------------------------------


def test_paper_recipe_imagenet_values():
    recipe = paper_recipe("imagenet")

    assert recipe.epochs == 250
    assert recipe.batch_size == 128
    assert recipe.lr == 0.1
    assert recipe.warmup_epochs == 5
    assert recipe.weight_decay == 3e-5
    assert recipe.label_smoothing == 0.1
    assert recipe.reference_batch_size == 128
    assert recipe.cutout == 0


def test_paper_recipe_cifar_values():
    cifar10, cifar100 = paper_recipe("cifar10"), paper_recipe("cifar100")

    assert cifar10.epochs == 600
    assert cifar10.lr == 0.05
    assert cifar10.warmup_epochs == 30
    assert cifar10.cutout == 16
    assert cifar10.grad_clip == 5.0
    assert cifar10.auxiliary_weight == 0.4
    assert cifar10.label_smoothing == 0.0
    assert cifar10.drop_path == 0.2
    assert cifar100.drop_path == 0.3


def test_paper_recipe_proxyless_values():
    recipe = dataclasses.asdict(paper_recipe("imagenet", "proxyless"))

    expected = {"epochs": 300, "batch_size": 512, "lr": 0.2, "lr_min": 0.0, "reference_batch_size": 512,
                "momentum": 0.9, "warmup_epochs": 5, "weight_decay": 5e-5, "label_smoothing": 0.1, "cutout": 0,
                "drop_path": 0.0, "auxiliary_weight": 0.0}
    assert {name: recipe[name] for name in expected} == expected


@pytest.mark.parametrize("batch_size", [512, 1024, 256])
def test_proxyless_recipe_lr_matches_closed_form(batch_size):
    recipe = paper_recipe("imagenet", "proxyless", batch_size=batch_size)

    used = [recipe_lr(recipe, epoch) for epoch in range(300)]

    expected = [expected_lr(0.2, 0.0, batch_size / 512, 5, 300, epoch) for epoch in range(300)]
    assert used == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert max(used) == pytest.approx(0.2 * batch_size / 512)


def test_paper_recipe_unknown_space():
    with pytest.raises(UnasError, match="no published recipe for 'cifar10' in the 'proxyless' space"):
        paper_recipe("cifar10", "proxyless")


def test_paper_recipe_overrides():
    recipe = paper_recipe("imagenet", batch_size=1024, warmup_epochs=3)

    assert recipe.batch_size == 1024
    assert recipe.warmup_epochs == 3
    assert recipe.lr == 0.1


def test_paper_recipe_unknown_field():
    with pytest.raises(UnasError, match="unknown field.*learning_rate"):
        paper_recipe("cifar10", learning_rate=0.1)


def test_check_recipe_rejects_long_warmup():
    with pytest.raises(UnasError, match="warmup_epochs"):
        check_recipe(tiny_recipe(epochs=3, warmup_epochs=3), world_size=1, train_examples=1000)


def test_check_recipe_rejects_uneven_batch():
    with pytest.raises(UnasError, match="multiple of 3"):
        check_recipe(tiny_recipe(batch_size=64), world_size=3, train_examples=1000)


def test_run_evaluation_rejects_oversized_batch():
    with pytest.raises(UnasError, match="batch_size: 5000"):
        run_evaluation(GENOTYPE, tiny_recipe(batch_size=5000), DataConfig(), CpuContext())


def test_resolve_loader_workers():
    cifar = DataConfig(name="cifar10", root="unused")

    assert resolve_loader_workers(tiny_recipe(loader_workers=3), DataConfig()) == 3
    assert resolve_loader_workers(tiny_recipe(loader_workers=-1), DataConfig()) == 0
    assert resolve_loader_workers(tiny_recipe(loader_workers=-1), cifar) >= 0


# Network ---------------------------------------------------------------------------------------


def test_build_eval_network_imagenet_stem(tmp_path):
    make_imagenet(tmp_path, classes=3, per_class=1)
    data = DataConfig(name="imagenet", root=str(tmp_path))

    network = build_eval_network(GENOTYPE, tiny_recipe(), data).eval()

    assert network.config.stem == "imagenet"
    assert network.config.num_classes == 3
    assert network.config.in_chs == 3
    logits, _ = network(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 3)


def test_build_eval_network_cifar_stem():
    network = build_eval_network(GENOTYPE, tiny_recipe(), DataConfig(name="cifar10", root="unused"))

    assert network.config.stem == "cifar"
    assert network.config.num_classes == 10


def test_test_network_drop_path_off():
    torch.manual_seed(0)
    network = build_eval_network(GENOTYPE, tiny_recipe(auxiliary_weight=0.0), DataConfig())
    network.set_drop_path_prob(0.5)
    batches = fixed_batches(2, 16)
    images = batches[0][0]

    first = evaluate.test_network(network, batches, torch.device("cpu"))
    second = evaluate.test_network(network, batches, torch.device("cpu"))

    assert first == second
    assert torch.equal(network(images)[0], network(images)[0])
    # Two training-mode forwards under different seeds differ, so drop path is active at this probability.
    network.train()
    torch.manual_seed(1)
    train_a = network(images)[0]
    torch.manual_seed(2)
    train_b = network(images)[0]
    assert not torch.equal(train_a, train_b)


def test_label_smoothing_training_loss_only():
    torch.manual_seed(0)
    recipe = tiny_recipe(auxiliary_weight=0.0, drop_path=0.0, label_smoothing=0.1)
    network = build_eval_network(GENOTYPE, recipe, DataConfig())
    # lr 0 leaves the weights as they are, so the reported loss can be recomputed afterwards.
    optimizer = torch.optim.SGD(network.parameters(), lr=0.0)
    batches = fixed_batches(3, 16)

    train_metrics = train_epoch(network, optimizer, recipe, batches, torch.device("cpu"), world_size=1)
    test_metrics = evaluate.test_network(network, batches, torch.device("cpu"))

    # Checked before the training-mode forwards below, which move the BatchNorm running statistics.
    with torch.no_grad():
        test_nll = [-torch.log_softmax(network(images)[0], dim=1).gather(1, labels[:, None]).mean().item()
                    for images, labels in batches]
    assert test_metrics["test_loss"] == pytest.approx(np.mean(test_nll), rel=1e-5)

    network.train()
    smoothed, plain_train = [], []
    with torch.no_grad():
        for images, labels in batches:
            log_probs = torch.log_softmax(network(images)[0], dim=1)
            nll = -log_probs.gather(1, labels[:, None]).squeeze(1)
            uniform = -log_probs.mean(dim=1)
            smoothed.append((0.9 * nll + 0.1 * uniform).mean().item())
            plain_train.append(nll.mean().item())
    assert train_metrics["train_loss"] == pytest.approx(np.mean(smoothed), rel=1e-5)
    assert train_metrics["train_loss"] != pytest.approx(np.mean(plain_train), rel=1e-3)


def test_proxyless_space_unas_params_at_full_size():
    space = ProxylessSpace()
    recipe = paper_recipe("imagenet", "proxyless")
    data = DataConfig(name="imagenet")  # no class folders: 1000 classes
    unas = proxyless.get_genotype("UNAS")

    sizes = space.network_sizes(unas, recipe, data)
    network = space.build_network(unas, recipe, data)

    assert sizes["params_m"] == pytest.approx(5.966, abs=5e-4)
    assert count_params_m(network) == pytest.approx(sizes["params_m"], rel=1e-12)
    assert set(sizes) == {"params_m", "madds_m"}


def test_proxyless_space_network_follows_fields_and_data():
    space = ProxylessSpace(width_mult=0.25, layers_per_stage=1, stem_stride=1)
    genotype = space.random_genotype(0)

    network = space.build_network(genotype, paper_recipe("imagenet", "proxyless"), DataConfig()).eval()
    logits, aux_logits = network(torch.randn(2, 1, 8, 8))

    assert len(genotype.layers) == 6
    assert network.config.in_chs == 1
    assert network.config.num_classes == 10
    assert network.config.stem_stride == 1
    assert logits.shape == (2, 10)
    assert aux_logits is None


# Whole runs ------------------------------------------------------------------------------------


def test_run_evaluation_proxyless_lr_matches_closed_form():
    space = ProxylessSpace(width_mult=0.25, layers_per_stage=1, stem_stride=1)
    recipe = paper_recipe("imagenet", "proxyless", epochs=5, warmup_epochs=2, batch_size=256, lr_min=0.01, seed=0)
    context = CpuContext()

    outcome = run_evaluation(space.random_genotype(0), recipe, DataConfig(), context,
                             build_network=space.build_network)

    used = [metrics["lr"] for metrics in context.history]
    expected = [expected_lr(0.2, 0.01, 256 / 512, 2, 5, epoch) for epoch in range(5)]
    assert used == pytest.approx(expected, rel=1e-12)
    assert outcome.epochs == 5
    assert outcome.test_error == context.history[-1]["test_error"]



def test_run_evaluation_digits_accuracy():
    recipe = EvalRecipe(chs=8, layers=5, epochs=6, batch_size=64, lr=0.05, warmup_epochs=1, drop_path=0.2,
                        auxiliary_weight=0.4, cutout=0, seed=0)
    context = CpuContext()

    outcome = run_evaluation(GENOTYPE, recipe, DataConfig(), context)

    assert outcome.epochs == 6
    assert outcome.test_error <= 0.10
    assert outcome.test_error == context.history[-1]["test_error"]
    assert outcome.min_test_error == min(metrics["test_error"] for metrics in context.history)


def test_run_evaluation_resume_matches_uninterrupted(tmp_path):
    recipe = tiny_recipe(epochs=3, warmup_epochs=1)

    straight = run_evaluation(GENOTYPE, recipe, DataConfig(), CpuContext(tmp_path / "straight"))

    def stop_after_first_epoch(metrics):
        if metrics["epoch"] == 1:
            raise Interrupted()

    with pytest.raises(Interrupted):
        run_evaluation(GENOTYPE, recipe, DataConfig(), CpuContext(tmp_path / "resumed", stop_after_first_epoch))
    resumed_context = CpuContext(tmp_path / "resumed")
    resumed = run_evaluation(GENOTYPE, recipe, DataConfig(), resumed_context)

    assert [metrics["epoch"] for metrics in resumed_context.history] == [2, 3]
    assert resumed.test_error == straight.test_error
    assert resumed.min_test_error == straight.min_test_error
    straight_weights = network_weights(tmp_path / "straight")
    resumed_weights = network_weights(tmp_path / "resumed")
    assert straight_weights.keys() == resumed_weights.keys()
    for name, tensor in straight_weights.items():
        assert torch.equal(tensor, resumed_weights[name]), name


def test_run_evaluation_interrupted_leaves_no_temp_folder(tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    def interrupt(metrics):
        raise Interrupted()

    with pytest.raises(Interrupted):
        run_evaluation(GENOTYPE, tiny_recipe(epochs=2), DataConfig(), CpuContext(tmp_path / "ckpt", interrupt))

    assert list(scratch.iterdir()) == []
    assert len(list((tmp_path / "ckpt").glob("epoch_*"))) == 1


def test_run_evaluation_imagenet_folders(tmp_path):
    make_imagenet(tmp_path, classes=2, per_class=4)
    data = DataConfig(name="imagenet", root=str(tmp_path), crop_size=32, resize_size=36)
    recipe = tiny_recipe(epochs=2, batch_size=4, label_smoothing=0.1, cutout=0, drop_path=0.0, loader_workers=1)
    context = CpuContext()

    outcome = run_evaluation(GENOTYPE, recipe, data, context)

    assert outcome.epochs == 2
    assert len(context.history) == 2
    assert all(math.isfinite(metrics["train_loss"]) for metrics in context.history)
