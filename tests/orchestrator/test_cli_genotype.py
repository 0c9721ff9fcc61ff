"""`unas genotype show` and `unas genotype sample` through the command line."""

import json

import pytest

from e2e_helpers import run_cli


def test_genotype_show_json_imagenet_figures():
    result = run_cli("genotype", "show", "UNAS_CIFAR10", "--dataset", "imagenet", "--json", timeout_s=300)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert set(summary) == {"params_m", "madds_m", "madds_paper_m", "channels", "layers"}
    assert summary["channels"] == 50
    assert summary["layers"] == 14
    assert summary["params_m"] == pytest.approx(5.220, rel=0.005)
    assert summary["madds_paper_m"] == pytest.approx(588.1, rel=0.01)


def test_genotype_show_draws_png(tmp_path):
    drawing = tmp_path / "cells.png"
    result = run_cli("genotype", "show", "DARTS_V2", "--draw", str(drawing), timeout_s=300)
    assert result.returncode == 0, result.stderr
    assert "params: 3.349 M" in result.stdout
    assert drawing.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_genotype_sample_round_trips_through_show(tmp_path):
    path = tmp_path / "random.json"
    sampled = run_cli("genotype", "sample", "--seed", "7", "--output", str(path), timeout_s=300)
    assert sampled.returncode == 0, sampled.stderr
    shown = run_cli("genotype", "show", str(path), "--json", timeout_s=300)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["layers"] == 20


def test_genotype_show_rejects_unknown_name():
    result = run_cli("genotype", "show", "NOT_A_CELL", timeout_s=300)
    assert result.returncode == 2
    assert "'NOT_A_CELL'" in result.stderr
    assert "UNAS_CIFAR10" in result.stderr


def test_genotype_show_proxyless_params():
    result = run_cli("genotype", "show", "PROXYLESS_GPU", "--space", "proxyless", "--json", timeout_s=300)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["params_m"] == pytest.approx(7.120, rel=0.005)
    assert len(summary["layers"]) == 21
