"""Tests of the search-step benchmark on a tiny supernet. Its gradient checks pass for the product's
step and fail for a step with another objective."""

import dataclasses
import json

import pytest
import torch

from bench import search_step as bench
from workers.search import search_step

TINY = ["--cells", "3", "--channels", "4", "--image-size", "8", "--batch", "4", "--repeats", "1"]
SETTING = bench.Setting(cells=3, channels=4, image_size=8, batch=4)


@pytest.fixture(autouse=True)
def restore_torch_state():
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    yield
    torch.set_num_threads(threads)
    torch.set_default_dtype(dtype)


def test_json_reports_matching_gradients(capsys):
    status = bench.main(TINY + ["--json"])
    result = json.loads(capsys.readouterr().out)
    assert status == 0
    assert result["speedup"] > 0
    assert result["max_grad_diff"] < bench.GRADIENT_TOLERANCE
    assert result["max_grad_diff_same_layout"] == 0.0
    assert result["gradients_match"] is True
    assert result["setting"]["cells"] == 3


def test_float64_check_skippable(capsys):
    status = bench.main(TINY + ["--json", "--skip-float64-check"])
    result = json.loads(capsys.readouterr().out)
    assert status == 0
    assert result["max_grad_diff"] is None


def gap_weight_step(gap_weight: float):
    def step(state, config, train_batch, val_batch):
        return search_step(state, dataclasses.replace(config, gap_weight=gap_weight), train_batch, val_batch)
    return step


def test_float64_flags_other_objective():
    config = bench.search_config(SETTING, seed=0)
    grads = bench.float64_gradients(SETTING, config, seed=0, product_step=gap_weight_step(0.45))
    difference, _ = bench.largest_difference(grads["product"], grads["literal"])
    assert difference > 100 * bench.GRADIENT_TOLERANCE


def test_exit_status_one_on_difference(monkeypatch, capsys):
    monkeypatch.setattr(bench, "search_step", gap_weight_step(0.45))
    status = bench.main(TINY + ["--json"])
    result = json.loads(capsys.readouterr().out)
    assert status == 1
    assert result["gradients_match"] is False
    assert result["max_grad_diff_same_layout"] > bench.GRADIENT_TOLERANCE
