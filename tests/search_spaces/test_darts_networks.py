"""Ops, cells and networks of the DARTS space: shapes, BatchNorm modes, drop path and sampling."""

import pytest
import torch
from torch import nn

from search_spaces.darts import (
    GENOTYPES,
    OPS,
    SEARCH_OPS,
    ArchitectureDistribution,
    EvalNetwork,
    NetworkConfig,
    SearchNetwork,
    reduction_indices,
)
from search_spaces.darts.cells import EvalCell, SearchCell

SMALL_CONFIG = NetworkConfig(chs=4, layers=5, num_classes=10)


@pytest.fixture(autouse=True, scope="module")
def single_torch_thread():
    # These tensors are tiny, so a second intra-op thread only adds hand-offs. On a loaded
    # 2-core machine those hand-offs made single tests take 20 s instead of 0.2 s.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("layers, expected", [(8, (2, 5)), (14, (4, 9)), (20, (6, 13))])
def test_reduction_indices_per_depth(layers, expected):
    assert set(reduction_indices(layers)) == set(expected)


@pytest.mark.parametrize("layers", [8, 14, 20])
def test_eval_network_reduces_at_reduction_indices(layers):
    config = NetworkConfig(chs=4, layers=layers, num_classes=10)
    with torch.device("meta"):
        network = EvalNetwork(GENOTYPES.get("DARTS_V2"), config)

    reduced = {index for index, cell in enumerate(network.cells) if cell.reduction}

    assert reduced == set(reduction_indices(layers))


def _cell_batch_norms(network: nn.Module, cell_type: type) -> list[nn.BatchNorm2d]:
    return [module for cell in network.modules() if isinstance(cell, cell_type)
            for module in cell.modules() if isinstance(module, nn.BatchNorm2d)]


def test_search_network_cell_batch_norms_not_affine():
    network = SearchNetwork(SMALL_CONFIG)
    batch_norms = _cell_batch_norms(network, SearchCell)

    assert batch_norms
    assert all(not bn.affine for bn in batch_norms)


def test_eval_network_batch_norms_affine():
    network = EvalNetwork(GENOTYPES.get("DARTS_V2"), SMALL_CONFIG, auxiliary=True)
    batch_norms = [module for module in network.modules() if isinstance(module, nn.BatchNorm2d)]

    assert _cell_batch_norms(network, EvalCell)
    assert all(bn.affine for bn in batch_norms)


def test_eval_network_eval_mode_ignores_drop_path():
    torch.manual_seed(0)
    genotype = GENOTYPES.get("UNAS_CIFAR10")
    network = EvalNetwork(genotype, SMALL_CONFIG, auxiliary=True).eval()
    reference = EvalNetwork(genotype, SMALL_CONFIG, auxiliary=True).eval()
    reference.load_state_dict(network.state_dict())
    network.set_drop_path_prob(0.3)
    reference.set_drop_path_prob(0.0)
    images = torch.randn(2, 3, 16, 16)

    with torch.no_grad():
        first, first_aux = network(images)
        second, _ = network(images)
        without_drop_path, _ = reference(images)

    assert torch.equal(first, second)
    assert torch.equal(first, without_drop_path)
    assert first_aux is None


def test_eval_network_train_mode_returns_auxiliary_logits():
    network = EvalNetwork(GENOTYPES.get("DARTS_V2"), SMALL_CONFIG, auxiliary=True).train()
    network.set_drop_path_prob(0.2)

    logits, aux_logits = network(torch.randn(2, 3, 16, 16))

    assert logits.shape == (2, 10)
    assert aux_logits is not None
    assert aux_logits.shape == (2, 10)


def test_eval_network_without_auxiliary_head_returns_none():
    network = EvalNetwork(GENOTYPES.get("DARTS_V2"), SMALL_CONFIG).train()

    _, aux_logits = network(torch.randn(2, 3, 16, 16))

    assert aux_logits is None


@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("name", OPS.names())
def test_op_forward_backward(name, stride, affine):
    torch.manual_seed(0)
    chs = 4
    op = OPS.get(name)(chs, stride, affine)
    images = torch.randn(2, chs, 8, 8, requires_grad=True)

    output = op(images)
    output.square().mean().backward()

    size = 8 // stride
    assert output.shape == (2, chs, size, size)
    assert torch.isfinite(output).all()
    assert images.grad is not None
    for parameter_name, parameter in op.named_parameters():
        assert parameter.grad is not None, f"{name} stride {stride}: no gradient on {parameter_name}"
        assert torch.isfinite(parameter.grad).all(), f"{name} stride {stride}: {parameter_name} gradient not finite"


def test_search_network_forward_per_example_samples():
    torch.manual_seed(0)
    network = SearchNetwork(SMALL_CONFIG)
    distribution = ArchitectureDistribution(SEARCH_OPS)
    images = torch.randn(3, 3, 8, 8)

    discrete = network(images, distribution.to_weights(distribution.sample_discrete(3)))
    relaxed = network(images, distribution.to_weights(distribution.sample_relaxed(3, tau=0.4)))
    relaxed.sum().backward()

    assert discrete.shape == (3, 10)
    assert relaxed.shape == (3, 10)
    assert torch.isfinite(discrete).all()
    assert torch.isfinite(relaxed).all()
    assert all(phi.grad is not None for phi in distribution.arch_logits)


def test_search_network_applies_each_example_its_own_sample():
    torch.manual_seed(0)
    network = SearchNetwork(SMALL_CONFIG).eval()
    distribution = ArchitectureDistribution(SEARCH_OPS)
    images = torch.randn(2, 3, 8, 8)
    sample = distribution.sample_discrete(2, generator=torch.Generator().manual_seed(1))

    with torch.no_grad():
        batched = network(images, distribution.to_weights(sample))
        single = [network(images[i:i + 1], distribution.to_weights([s[i:i + 1] for s in sample]))
                  for i in range(2)]

    for i in range(2):
        torch.testing.assert_close(batched[i:i + 1], single[i])


def _differs_across_batch(sample: list[torch.Tensor]) -> bool:
    flat = torch.cat(sample, dim=1)
    return any(not torch.equal(flat[0], flat[i]) for i in range(1, flat.shape[0]))


def test_distribution_discrete_samples_differ_across_batch():
    generator = torch.Generator().manual_seed(0)
    distribution = ArchitectureDistribution(SEARCH_OPS)

    sample = distribution.sample_discrete(4, generator=generator)

    assert all(s.shape[0] == 4 for s in sample)
    assert _differs_across_batch(sample)


def test_distribution_relaxed_samples_differ_across_batch():
    generator = torch.Generator().manual_seed(0)
    distribution = ArchitectureDistribution(SEARCH_OPS)

    sample = distribution.sample_relaxed(4, tau=0.4, generator=generator)

    assert all(s.shape[0] == 4 for s in sample)
    assert _differs_across_batch(sample)
    assert all(torch.allclose(s.sum(-1), torch.ones(4)) for s in sample)
