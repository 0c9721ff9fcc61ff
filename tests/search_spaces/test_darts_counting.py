"""Parameter and multiply-add counts of the DARTS space against the published UNAS figures."""

import pytest
import torch
from torch import nn

from search_spaces.darts import GENOTYPES, EvalNetwork, NetworkConfig
from search_spaces.darts.counting import (
    count_madds_m,
    count_params_m,
    describe_network,
    select_imagenet_channels,
)

# Published sizes of the evaluation networks: CIFAR-10 and CIFAR-100 params (C = 36, 20 cells),
# then the ImageNet channel count C (14 cells, 224x224), params, paper-convention and
# conv+linear multiply-adds, all in millions.
REFERENCE = {
    "UNAS_CIFAR10": (3.331, 3.383, 50, 5.220, 588.1, 573.5),
    "UNAS_CIFAR100": (4.015, 4.067, 46, 5.292, 589.4, 573.4),
    "UNAS_IMAGENET": (3.815, 3.867, 46, 5.074, 563.8, 548.6),
    "DARTS_V2": (3.349, 3.401, 50, 5.079, 588.8, 573.5),
    "DARTS_V1": (3.169, 3.221, 50, 4.854, 561.9, 547.5),
    "PDARTS": (3.434, 3.486, 48, 4.944, 557.4, 542.8),
}


@pytest.fixture(autouse=True, scope="module")
def single_torch_thread():
    # The forwards here are single small images, so a second intra-op thread only adds
    # hand-offs, which made tests many times slower on a loaded 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_reference_table_covers_every_genotype():
    assert set(REFERENCE) == set(GENOTYPES)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_describe_network_cifar_params(name):
    cifar10_params_m, cifar100_params_m, *_ = REFERENCE[name]
    genotype = GENOTYPES.get(name)

    cifar10 = describe_network(genotype, "cifar10")
    cifar100 = describe_network(genotype, "cifar100")

    assert cifar10["params_m"] == pytest.approx(cifar10_params_m, rel=0.002)
    assert cifar100["params_m"] == pytest.approx(cifar100_params_m, rel=0.002)
    assert (cifar10["channels"], cifar10["layers"]) == (36, 20)
    assert (cifar100["channels"], cifar100["layers"]) == (36, 20)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_describe_network_imagenet_figures(name):
    _, _, channels, params_m, madds_paper_m, madds_m = REFERENCE[name]

    described = describe_network(GENOTYPES.get(name), "imagenet")

    assert described["channels"] == channels
    assert described["layers"] == 14
    assert described["params_m"] == pytest.approx(params_m, rel=0.005)
    assert described["madds_paper_m"] == pytest.approx(madds_paper_m, rel=0.01)
    assert described["madds_m"] == pytest.approx(madds_m, rel=0.01)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_count_madds_imagenet_published_digits(name):
    # Rounded to the published 0.1M, these figures tell the counting conventions apart.
    # Leaving out the global pool, for example, changes them by less than the 1% tolerance
    # above, but moves four of the six off their published digits.
    _, _, channels, _, madds_paper_m, madds_m = REFERENCE[name]
    config = NetworkConfig(chs=channels, layers=14, num_classes=1000, stem="imagenet")
    with torch.device("meta"):
        model = EvalNetwork(GENOTYPES.get(name), config)

    assert count_madds_m(model, 224, "paper") == pytest.approx(madds_paper_m, abs=0.05)
    assert count_madds_m(model, 224, "conv_linear") == pytest.approx(madds_m, abs=0.05)


def test_describe_network_returns_exact_keys():
    described = describe_network(GENOTYPES.get("DARTS_V2"), "cifar10")

    assert set(described) == {"params_m", "madds_m", "madds_paper_m", "channels", "layers"}


def test_describe_network_rejects_unknown_dataset():
    with pytest.raises(ValueError) as error:
        describe_network(GENOTYPES.get("DARTS_V2"), "mnist")

    message = str(error.value)
    assert "'mnist'" in message
    for valid in ("cifar10", "cifar100", "imagenet"):
        assert valid in message


def test_select_imagenet_channels_largest_under_budget():
    genotype = GENOTYPES.get("DARTS_V2")
    budget_m = 450.0

    chs = select_imagenet_channels(genotype, budget_m=budget_m)

    def paper_madds_m(channels: int) -> float:
        config = NetworkConfig(chs=channels, layers=14, num_classes=1000, stem="imagenet")
        with torch.device("meta"):
            return count_madds_m(EvalNetwork(genotype, config), 224, "paper")

    assert chs % 2 == 0
    assert chs < 50  # the choice at the default 600M budget
    assert paper_madds_m(chs) < budget_m
    assert paper_madds_m(chs + 2) >= budget_m


def test_select_imagenet_channels_rejects_unreachable_budget():
    with pytest.raises(ValueError, match="budget_m"):
        select_imagenet_channels(GENOTYPES.get("DARTS_V2"), budget_m=10.0)


def test_count_madds_conv_linear_counts_grouped_conv():
    model = nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1, bias=False),  # 8*8*8 outputs * 4*9 = 18432
        nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False),  # 512 outputs * 2*9 = 9216
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False),  # 128 outputs * 9 = 1152
        nn.Flatten(),
        nn.Linear(128, 10),  # 1280
    )

    madds_m = count_madds_m(model, (4, 8, 8), "conv_linear")

    assert madds_m * 1e6 == pytest.approx(18432 + 9216 + 1152 + 1280)


def test_count_madds_paper_extra_ops():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1, bias=True),  # 4*8*8 = 256 outputs: 256*3 MACs + 256 bias ops
        nn.BatchNorm2d(4),  # 2 * 256
        nn.ReLU(),  # 256
        nn.MaxPool2d(3, stride=2, padding=1),  # 256 input elements
        nn.AvgPool2d(3, stride=1, padding=1),  # 4*4*4 = 64 input elements
        nn.AdaptiveAvgPool2d(1),  # 64 input elements
        nn.Flatten(),
        nn.Linear(4, 2),  # 8
    )

    conv_linear = count_madds_m(model, 8, "conv_linear") * 1e6
    paper = count_madds_m(model, 8, "paper") * 1e6

    assert conv_linear == pytest.approx(256 * 3 + 8)
    assert paper == pytest.approx(256 * 3 + 256 + 2 * 256 + 256 + 256 + 64 + 64 + 8)


def test_count_madds_rejects_unknown_convention():
    with pytest.raises(ValueError, match="'flops'"):
        count_madds_m(nn.Linear(2, 2), 1, "flops")


def test_count_madds_same_on_meta_and_cpu():
    genotype = GENOTYPES.get("PDARTS")
    config = NetworkConfig(chs=8, layers=5, num_classes=10)
    cpu_model = EvalNetwork(genotype, config)
    with torch.device("meta"):
        meta_model = EvalNetwork(genotype, config)

    for convention in ("conv_linear", "paper"):
        assert count_madds_m(meta_model, 32, convention) == count_madds_m(cpu_model, 32, convention)


def test_count_madds_restores_training_mode():
    model = EvalNetwork(GENOTYPES.get("DARTS_V2"), NetworkConfig(chs=8, layers=5, num_classes=10))
    model.train()

    count_madds_m(model, 16, "paper")

    assert model.training


def test_counts_exclude_auxiliary_head():
    genotype = GENOTYPES.get("DARTS_V2")
    config = NetworkConfig(chs=8, layers=5, num_classes=10)
    plain = EvalNetwork(genotype, config)
    with_head = EvalNetwork(genotype, config, auxiliary=True)
    with_head.train()

    assert count_params_m(with_head) == count_params_m(plain)
    assert count_madds_m(with_head, 32, "paper") == count_madds_m(plain, 32, "paper")
