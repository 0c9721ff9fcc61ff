"""Genotypes of the DARTS space: JSON round trips, validation messages, random cells, drawing."""

import json

import pytest
import torch

from search_spaces.darts import (
    CELL_TYPES,
    GENOTYPES,
    NUM_NODES,
    SEARCH_OPS,
    ArchitectureDistribution,
    genotype_from_dict,
    genotype_from_json,
    load_genotype,
    random_genotype,
)
from search_spaces.darts.distribution import categorical_layout
from search_spaces.darts.drawing import draw_genotype
from search_spaces.errors import GenotypeError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _valid_dict() -> dict:
    return GENOTYPES.get("DARTS_V2").to_dict()


@pytest.mark.parametrize("name", GENOTYPES.names())
def test_genotype_json_round_trip(name):
    genotype = GENOTYPES.get(name)

    assert genotype_from_json(genotype.to_json()) == genotype


@pytest.mark.parametrize("name", GENOTYPES.names())
def test_genotype_save_load_round_trip(name, tmp_path):
    genotype = GENOTYPES.get(name)
    path = tmp_path / f"{name}.json"

    genotype.save(path)

    assert load_genotype(path) == genotype


def test_genotype_rejects_unknown_op():
    data = _valid_dict()
    data["reduce"][2][1] = ["conv_9x9", 1]

    with pytest.raises(GenotypeError) as error:
        genotype_from_dict(data)

    message = str(error.value)
    assert "reduce cell" in message
    assert "node 4" in message
    assert "edge 1" in message
    assert "'conv_9x9'" in message
    assert "sep_conv_3x3" in message  # the valid ops are listed


def test_genotype_rejects_op_outside_allowed_ops():
    data = _valid_dict()
    data["normal"][0][0] = ["sep_conv_7x7", 0]

    with pytest.raises(GenotypeError) as error:
        genotype_from_dict(data, allowed_ops=SEARCH_OPS[:5])

    message = str(error.value)
    assert "normal cell node 2 edge 0" in message
    assert "'sep_conv_7x7'" in message


@pytest.mark.parametrize("bad_input", [3, -1])
def test_genotype_rejects_input_out_of_range(bad_input):
    data = _valid_dict()
    data["normal"][1][0] = ["skip_connect", bad_input]

    with pytest.raises(GenotypeError) as error:
        genotype_from_dict(data)

    message = str(error.value)
    assert "normal cell" in message
    assert "node 3" in message
    assert "edge 0" in message
    assert f"input {bad_input}" in message
    assert "0..2" in message


def test_genotype_rejects_wrong_node_count():
    data = _valid_dict()
    data["reduce"] = data["reduce"][:3]

    with pytest.raises(GenotypeError) as error:
        genotype_from_dict(data)

    message = str(error.value)
    assert "reduce cell" in message
    assert f"expected {NUM_NODES} nodes" in message
    assert "got 3" in message


def test_genotype_rejects_wrong_edge_count():
    data = _valid_dict()
    data["normal"][3] = [["skip_connect", 0]]

    with pytest.raises(GenotypeError) as error:
        genotype_from_dict(data)

    message = str(error.value)
    assert "normal cell" in message
    assert "node 5" in message
    assert "expected 2 edges" in message
    assert "skip_connect" in message


def test_genotype_rejects_malformed_edge():
    data = _valid_dict()
    data["normal"][0][1] = ["sep_conv_3x3"]

    with pytest.raises(GenotypeError) as error:
        genotype_from_dict(data)

    message = str(error.value)
    assert "normal cell node 2 edge 1" in message
    assert "['sep_conv_3x3']" in message


def test_genotype_rejects_non_object():
    with pytest.raises(GenotypeError) as error:
        genotype_from_json(json.dumps([1, 2]))

    message = str(error.value)
    assert "object" in message
    assert "list" in message


def test_genotype_rejects_missing_cell():
    data = _valid_dict()
    del data["reduce"]

    with pytest.raises(GenotypeError) as error:
        genotype_from_dict(data)

    message = str(error.value)
    assert "missing" in message
    assert "'reduce'" in message


def test_genotype_rejects_invalid_json():
    with pytest.raises(GenotypeError, match="not valid JSON"):
        genotype_from_json("{normal: ")


def test_random_genotype_same_seed_same_genotype():
    assert random_genotype(7, SEARCH_OPS) == random_genotype(7, SEARCH_OPS)


def test_random_genotype_different_seeds_differ():
    genotypes = {random_genotype(seed, SEARCH_OPS) for seed in range(10)}

    assert len(genotypes) == 10


@pytest.mark.parametrize("op_names", [SEARCH_OPS, SEARCH_OPS[:5]])
def test_random_genotype_always_valid(op_names):
    for seed in range(100):
        genotype = random_genotype(seed, op_names)

        assert genotype_from_dict(genotype.to_dict(), allowed_ops=op_names) == genotype


def test_distribution_genotype_is_argmax():
    distribution = ArchitectureDistribution(SEARCH_OPS)
    expected: dict[str, list[list[list]]] = {cell_type: [[] for _ in range(NUM_NODES)] for cell_type in CELL_TYPES}
    pending_input = None
    with torch.no_grad():
        for index, ((cell_type, node, _, kind), phi) in enumerate(zip(categorical_layout(), distribution.arch_logits)):
            # A different winning choice per categorical, so a mixed-up order cannot pass.
            choice = (3 * index + node) % phi.numel()
            phi.copy_(torch.randn(phi.numel()) * 0.1)
            phi[choice] = 5.0
            if kind == "input":
                pending_input = choice
            else:
                expected[cell_type][node].append([SEARCH_OPS[choice], pending_input])

    assert distribution.genotype() == genotype_from_dict(expected)


def test_draw_genotype_writes_png(tmp_path):
    path = tmp_path / "cells.png"

    draw_genotype(GENOTYPES.get("PDARTS"), path)

    data = path.read_bytes()
    assert len(data) > 10_000
    assert data.startswith(PNG_SIGNATURE)
