"""The ProxylessNAS space: backbone, genotypes, supernet, eval network, distribution and counting."""

import dataclasses
import math

import pytest
import torch
from torch import nn

from search_spaces.errors import GenotypeError
from search_spaces.proxyless import (
    GENOTYPES,
    MBCONV_OPS,
    SEARCH_OPS,
    SKIP,
    ArchitectureDistribution,
    EvalNetwork,
    Genotype,
    MixedLayer,
    ProxylessConfig,
    SearchNetwork,
    choice_counts,
    count_madds_m,
    count_params_m,
    describe_network,
    genotype_from_dict,
    genotype_from_json,
    genotype_to_sample,
    layer_specs,
    load_genotype,
    random_genotype,
    searched_layer_count,
)
from search_spaces.proxyless.backbone import LayerSpec
from search_spaces.proxyless.ops import MBConv

# Published parameter counts at 1000 classes, in millions.
PUBLISHED_PARAMS_M = {"UNAS": 5.966, "PROXYLESS_GPU": 7.120}

# Small enough for fast CPU forwards: 8x8 single-channel digits, 10 classes.
SMALL_CONFIG = ProxylessConfig(num_classes=10, in_chs=1, width_mult=0.25, layers_per_stage=2, stem_stride=1)


@pytest.fixture(autouse=True, scope="module")
def single_torch_thread():
    # The tensors are tiny, so extra intra-op threads only add hand-offs on a loaded machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _valid_layers() -> list[str]:
    return list(GENOTYPES.get("UNAS").layers)


# ---------------------------------------------------------------------------------------------
# Backbone and known genotypes


def test_layer_specs_full_backbone():
    specs = layer_specs(ProxylessConfig())

    assert len(specs) == 21
    changes = {i + 1: (s.out_chs, s.stride) for i, s in enumerate(specs) if s.in_chs != s.out_chs or s.stride != 1}
    assert changes == {1: (32, 2), 5: (56, 2), 9: (112, 2), 13: (128, 1), 17: (256, 2), 21: (432, 1)}
    assert specs[0].in_chs == 24


def test_layer_specs_skip_allowed_only_where_shape_kept():
    specs = layer_specs(ProxylessConfig())

    no_skip = [i + 1 for i, spec in enumerate(specs) if not spec.skip_allowed]

    assert no_skip == [1, 5, 9, 13, 17, 21]


def test_layer_specs_skip_rule_ignores_width_rounding():
    # At width 0.25 the 112 and 128 stages both round to 32 channels; layer 13 still may not skip.
    specs = layer_specs(ProxylessConfig(width_mult=0.25))

    assert specs[12].in_chs == specs[12].out_chs
    assert not specs[12].skip_allowed


def test_searched_layer_count_reduced_depth():
    assert searched_layer_count(4) == 21
    assert searched_layer_count(2) == 11
    assert choice_counts(2) == [6, 7, 6, 7, 6, 7, 6, 7, 6, 7, 6]


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS_M))
def test_known_genotype_params_match_published(name):
    params_m = describe_network(GENOTYPES.get(name))["params_m"]

    assert params_m == pytest.approx(PUBLISHED_PARAMS_M[name], rel=0.005)


def test_registry_lookup_lists_valid_names():
    with pytest.raises(KeyError) as error:
        GENOTYPES.get("MOBILENET_V9")

    assert "UNAS" in str(error.value)
    assert "PROXYLESS_GPU" in str(error.value)


def test_known_genotypes_skip_only_where_allowed():
    for name in GENOTYPES:
        genotype = GENOTYPES.get(name)
        assert [genotype.layers[i] for i in (0, 4, 8, 12, 16, 20)].count(SKIP) == 0, name


# ---------------------------------------------------------------------------------------------
# Genotype values and validation


@pytest.mark.parametrize("name", GENOTYPES.names())
def test_genotype_json_round_trip(name):
    genotype = GENOTYPES.get(name)

    assert genotype_from_json(genotype.to_json()) == genotype


def test_genotype_save_load_round_trip(tmp_path):
    genotype = random_genotype(3)
    path = tmp_path / "genotype.json"

    genotype.save(path)

    assert load_genotype(path) == genotype


def test_genotype_is_immutable():
    genotype = GENOTYPES.get("UNAS")

    with pytest.raises(dataclasses.FrozenInstanceError):
        genotype.layers = ()  # type: ignore[misc]


def test_genotype_rejects_unknown_op():
    layers = _valid_layers()
    layers[3] = "mbconv_k9_e6"

    with pytest.raises(GenotypeError) as error:
        genotype_from_dict({"layers": layers})

    message = str(error.value)
    assert "layer 4" in message
    assert "'mbconv_k9_e6'" in message
    assert "mbconv_k3_e3" in message  # the valid ops are listed


@pytest.mark.parametrize("layer", [1, 5, 9, 13, 17, 21])
def test_genotype_rejects_skip_where_shape_changes(layer):
    layers = _valid_layers()
    layers[layer - 1] = SKIP

    with pytest.raises(GenotypeError) as error:
        genotype_from_dict({"layers": layers})

    message = str(error.value)
    assert f"layer {layer}:" in message
    assert "'skip'" in message
    assert "changes the channel count or the stride" in message


@pytest.mark.parametrize("count", [20, 22])
def test_genotype_rejects_wrong_layer_count(count):
    layers = (_valid_layers() * 2)[:count]

    with pytest.raises(GenotypeError) as error:
        genotype_from_dict({"layers": layers})

    assert "expected 21 layers" in str(error.value)
    assert f"got {count}" in str(error.value)


def test_genotype_layer_count_follows_reduced_depth():
    genotype = random_genotype(0, layers_per_stage=2)

    assert genotype_from_dict(genotype.to_dict(), layers_per_stage=2) == genotype
    with pytest.raises(GenotypeError, match="expected 21 layers"):
        genotype_from_dict(genotype.to_dict())


@pytest.mark.parametrize("data", [["mbconv_k3_e3"], {"ops": []}, {"layers": "skip"}])
def test_genotype_rejects_malformed_json_object(data):
    with pytest.raises(GenotypeError, match="layers"):
        genotype_from_dict(data)


def test_genotype_rejects_invalid_json_text():
    with pytest.raises(GenotypeError, match="not valid JSON"):
        genotype_from_json("{layers: [")


def test_genotype_describe_uses_paper_labels():
    described = GENOTYPES.get("PROXYLESS_GPU").describe().split(" | ")

    assert described[:2] == ["MB3 5x5", "skip"]
    assert described[-1] == "MB6 7x7"


# ---------------------------------------------------------------------------------------------
# Random genotypes and the distribution


def test_random_genotype_same_seed_same_network():
    assert random_genotype(7) == random_genotype(7)
    assert random_genotype(7) != random_genotype(8)


@pytest.mark.parametrize("seed", range(5))
def test_random_genotype_is_valid(seed):
    genotype = random_genotype(seed, layers_per_stage=2)

    assert genotype_from_dict(genotype.to_dict(), layers_per_stage=2) == genotype


def test_random_genotype_skip_prob_bounds():
    never = random_genotype(0, skip_prob=0.0)
    always = random_genotype(0, skip_prob=1.0)

    assert never.skip_count == 0
    assert always.skip_count == 15


def test_distribution_samples_have_layer_shapes():
    distribution = ArchitectureDistribution(layers_per_stage=2)
    generator = torch.Generator().manual_seed(0)

    discrete = distribution.sample_discrete(5, generator)
    relaxed = distribution.sample_relaxed(5, 0.4, generator)

    assert [tuple(s.shape) for s in discrete] == [(5, c) for c in choice_counts(2)]
    assert [tuple(s.shape) for s in relaxed] == [(5, c) for c in choice_counts(2)]
    assert all(torch.equal(s.sum(-1), torch.ones(5)) for s in discrete)
    assert all(torch.allclose(s.sum(-1), torch.ones(5)) for s in relaxed)


def test_distribution_uniform_log_prob_and_entropy():
    distribution = ArchitectureDistribution(layers_per_stage=2, softening_eps=0.08)
    sample = distribution.sample_discrete(3, torch.Generator().manual_seed(0))
    expected = -sum(math.log(c) for c in choice_counts(2))

    assert torch.allclose(distribution.log_prob(sample), torch.full((3,), expected))
    assert distribution.entropy().item() == pytest.approx(-expected, rel=1e-5)


def test_distribution_genotype_is_argmax():
    distribution = ArchitectureDistribution(layers_per_stage=2)
    with torch.no_grad():
        distribution.arch_logits[1][SEARCH_OPS.index(SKIP)] = 3.0
        distribution.arch_logits[2][MBCONV_OPS.index("mbconv_k7_e6")] = 3.0

    genotype = distribution.genotype()

    assert genotype.layers[1] == SKIP
    assert genotype.layers[2] == "mbconv_k7_e6"
    assert genotype.layers[0] == MBCONV_OPS[0]


def test_distribution_softening_keeps_probability_floor():
    eps = 0.08
    distribution = ArchitectureDistribution(layers_per_stage=2, softening_eps=eps)
    with torch.no_grad():
        distribution.arch_logits[1][0] = 50.0

    probs = torch.softmax(distribution.normalized_logits()[1], -1)

    floor = eps / (1 + len(SEARCH_OPS) * eps)
    assert probs.min().item() == pytest.approx(floor, rel=1e-4)


def test_genotype_to_sample_round_trip():
    distribution = ArchitectureDistribution(layers_per_stage=2)
    genotype = random_genotype(4, layers_per_stage=2)

    assert distribution.genotype_of(genotype_to_sample(genotype, 2)) == genotype


# ---------------------------------------------------------------------------------------------
# Networks


def test_mbconv_params_and_madds_match_formula():
    in_chs, out_chs, kernel, expansion, size = 16, 24, 5, 6, 14
    mid = in_chs * expansion
    block = MBConv(in_chs, out_chs, kernel, expansion, stride=2)
    out_size = size // 2

    params = in_chs * mid + 2 * mid + kernel * kernel * mid + 2 * mid + mid * out_chs + 2 * out_chs
    madds = size * size * in_chs * mid + out_size * out_size * (kernel * kernel * mid + mid * out_chs)
    assert count_params_m(block) * 1e6 == params
    assert count_madds_m(block, size, in_chs) * 1e6 == pytest.approx(madds)


def test_mbconv_expansion_one_has_no_expand_conv():
    block = MBConv(40, 24, 3, 1, stride=1)

    assert isinstance(block.expand, nn.Identity)
    assert not block.has_residual


def _per_example_sample(batch_size: int, seed: int) -> list[torch.Tensor]:
    distribution = ArchitectureDistribution(SMALL_CONFIG.layers_per_stage)
    return distribution.sample_discrete(batch_size, torch.Generator().manual_seed(seed))


def test_search_network_forward_per_example_samples():
    torch.manual_seed(0)
    network = SearchNetwork(SMALL_CONFIG).eval()
    x = torch.randn(4, 1, 8, 8)
    sample = _per_example_sample(4, seed=1)

    with torch.no_grad():
        batched = network(x, sample)
        # Eval-mode BatchNorm makes examples independent, so each one can be run alone.
        alone = torch.cat([network(x[i:i + 1], [s[i:i + 1] for s in sample]) for i in range(4)])

    assert batched.shape == (4, 10)
    assert torch.allclose(batched, alone, atol=1e-5)


def test_search_network_backward_reaches_logits():
    network = SearchNetwork(SMALL_CONFIG)
    distribution = ArchitectureDistribution(SMALL_CONFIG.layers_per_stage)
    sample = distribution.sample_relaxed(1, 0.4, torch.Generator().manual_seed(0))

    network(torch.randn(3, 1, 8, 8), sample).square().mean().backward()

    assert all(phi.grad is not None and torch.isfinite(phi.grad).all() for phi in distribution.arch_logits)


def test_mixed_layer_skips_ops_with_zero_weight():
    spec = LayerSpec(16, 16, 1, skip_allowed=True)
    layer = MixedLayer(spec, skip_drop_prob=0.0)
    calls = [0] * len(layer.ops)
    for k, op in enumerate(layer.ops):
        op.register_forward_hook(lambda *args, k=k: calls.__setitem__(k, calls[k] + 1))
    weights = torch.zeros(2, len(SEARCH_OPS))
    weights[0, 2] = 1.0
    weights[1, 5] = 1.0

    layer(torch.randn(2, 16, 4, 4), weights)

    assert calls == [0, 0, 1, 0, 0, 1, 0]


def test_mixed_layer_skip_dropout_only_in_training():
    spec = LayerSpec(8, 8, 1, skip_allowed=True)
    layer = MixedLayer(spec, skip_drop_prob=0.5)
    weights = torch.zeros(1, len(SEARCH_OPS))
    weights[0, SEARCH_OPS.index(SKIP)] = 1.0
    x = torch.ones(64, 8, 2, 2)

    eval_out = layer.eval()(x, weights)
    torch.manual_seed(0)
    train_out = layer.train()(x, weights)

    assert torch.equal(eval_out, x)
    per_example = train_out.flatten(1)
    assert set(per_example.unique().tolist()) == {0.0, 2.0}
    assert torch.equal(per_example.min(1).values, per_example.max(1).values)  # whole examples drop


def test_search_network_one_hot_matches_eval_network():
    torch.manual_seed(0)
    genotype = random_genotype(2, layers_per_stage=2)
    supernet = SearchNetwork(SMALL_CONFIG).eval()
    eval_network = EvalNetwork(genotype, SMALL_CONFIG).eval()
    eval_state = {}
    for name, value in supernet.state_dict().items():
        if not name.startswith("layers."):
            eval_state[name] = value
    for index, op in enumerate(genotype.layers):
        mixed = supernet.layers[index]
        chosen = mixed.ops[mixed.op_names.index(op)]
        for name, value in chosen.state_dict().items():
            eval_state[f"layers.{index}.{name}"] = value
    eval_network.load_state_dict(eval_state)
    x = torch.randn(3, 1, 8, 8)

    with torch.no_grad():
        expected = eval_network(x)
        actual = supernet(x, genotype_to_sample(genotype, 2))

    assert torch.allclose(actual, expected, atol=1e-5)


@pytest.mark.parametrize("name", GENOTYPES.names())
def test_eval_network_forward_backward(name):
    config = ProxylessConfig(num_classes=10, in_chs=1, width_mult=0.25, stem_stride=1)
    network = EvalNetwork(GENOTYPES.get(name), config)
    x = torch.randn(4, 1, 8, 8)

    logits = network(x)
    nn.functional.cross_entropy(logits, torch.arange(4)).backward()

    assert logits.shape == (4, 10)
    assert torch.isfinite(logits).all()
    for param_name, param in network.named_parameters():
        assert param.grad is not None, param_name
        assert torch.isfinite(param.grad).all(), param_name


def test_eval_network_rejects_invalid_genotype():
    with pytest.raises(GenotypeError, match="layer 1"):
        EvalNetwork(Genotype((SKIP,) * 21), ProxylessConfig())


def test_eval_network_skipped_layers_have_no_params():
    genotype = random_genotype(0, skip_prob=1.0)
    network = EvalNetwork(genotype, ProxylessConfig(num_classes=10, width_mult=0.25))

    skipped = [layer for layer, op in zip(network.layers, genotype.layers) if op == SKIP]

    assert len(skipped) == 15
    assert all(sum(p.numel() for p in layer.parameters()) == 0 for layer in skipped)


def test_describe_network_counts_active_layers():
    description = describe_network(GENOTYPES.get("PROXYLESS_GPU"))

    assert description["active_layers"] == 13
    assert description["layers"] == list(GENOTYPES.get("PROXYLESS_GPU").layers)
    assert description["madds_m"] > 0


def test_config_rejects_invalid_values():
    with pytest.raises(ValueError, match="stem_stride"):
        ProxylessConfig(stem_stride=3)
    with pytest.raises(ValueError, match="width_mult"):
        ProxylessConfig(width_mult=0)
