"""Spec validation: every problem reported at once, each naming the field, the value and the fix."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.spec import SpecError, load_spec, parse_spec

VALID = {
    "name": "tiny",
    "data": {"name": "digits"},
    "search": {"chs": 4, "layers": 3, "epochs": 2, "warmup_epochs": 1, "batch_size": 64},
    "evaluate": {"random_cells": 1, "recipe": {"chs": 4, "layers": 3, "epochs": 2, "warmup_epochs": 0}},
}


def _with(path: str, value):
    spec = copy.deepcopy(VALID)
    *parents, last = path.split(".")
    node = spec
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return spec


def _problems(data) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    return info.value.problems


def test_parse_spec_accepts_valid_spec():
    spec = parse_spec(VALID)
    assert spec.name == "tiny"
    assert spec.search.methods == ["rebar"]


BAD_SPECS = [
    ("search.epochs", 0, ["search.epochs", "0", "greater than 0"]),
    ("search.epochs", -3, ["search.epochs", "-3"]),
    ("search.methods", ["rebar", "magic"], ["search.methods.1", "'magic'", "reinforce"]),
    ("search.space", "nasbench", ["search.space", "'nasbench'", "darts"]),
    ("data.name", "mnist-ish", ["data.name", "'mnist-ish'", "cifar10"]),
    ("evaluate.named", ["DARTS_V3"], ["evaluate.named.0", "'DARTS_V3'", "DARTS_V2"]),
    ("search.batch_size", 5000, ["search.batch_size", "5000", "lower it"]),
    ("evaluate.recipe.batch_size", 4096, ["evaluate.recipe.batch_size", "4096"]),
    ("search.warmup_epochs", 2, ["warmup_epochs (2)", "epochs (2)"]),
    ("search.ops", ["sep_conv_3x3", "conv_9x9"], ["search.ops.1", "'conv_9x9'"]),
    ("search.workers", 3, ["search.batch_size", "3 workers"]),
    ("search.tau", -1.0, ["search.tau", "-1.0"]),
    ("search.seeds", [0, 0], ["search.seeds", "repeats"]),
    ("name", "has spaces", ["name", "'has spaces'"]),
    ("search.learning_rate", 0.1, ["search.learning_rate", "unknown field"]),
    ("data.test_fraction", 1.5, ["data.test_fraction", "1.5"]),
]


@pytest.mark.parametrize(("path", "value", "expected"), BAD_SPECS, ids=[case[0] + "=" + str(case[1]) for case in BAD_SPECS])
def test_parse_spec_rejects_bad_value_with_field_and_value(path, value, expected):
    problems = _problems(_with(path, value))
    assert len(problems) == 1, problems
    for fragment in expected:
        assert fragment in problems[0]


def test_parse_spec_reports_every_problem_at_once():
    data = _with("search.epochs", 0)
    data["data"]["name"] = "nope"
    data["evaluate"]["named"] = ["NOT_A_CELL"]
    data["search"]["color"] = "red"
    problems = _problems(data)
    joined = "\n".join(problems)
    assert "search.epochs" in joined
    assert "search.color" in joined
    # Semantic checks run only once the shape is valid; the shape errors come first, together.
    assert len(problems) == 2


def test_parse_spec_rejects_found_cells_without_search():
    data = copy.deepcopy(VALID)
    del data["search"]
    problems = _problems(data)
    assert any("evaluate.found" in problem for problem in problems)


def test_parse_spec_rejects_empty_job():
    problems = _problems({"name": "empty"})
    assert problems == ["search, evaluate: the job has nothing to do; add a search or an evaluate section"]


def test_load_spec_rejects_missing_file(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "absent.yaml")


def test_load_spec_rejects_malformed_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(path)


def test_job_id_is_stable_and_content_dependent():
    assert parse_spec(VALID).job_id() == parse_spec(copy.deepcopy(VALID)).job_id()
    assert parse_spec(VALID).job_id() != parse_spec(_with("search.epochs", 3)).job_id()
    # Where results are recorded does not change which job it is.
    assert parse_spec(VALID).job_id() == parse_spec(_with("tracking.uri", "sqlite:///elsewhere.db")).job_id()


def test_spec_error_pickles_with_its_problems():
    import pickle

    error = SpecError("two problems", ["a: bad", "b: bad"])
    restored = pickle.loads(pickle.dumps(error))
    assert restored.problems == ["a: bad", "b: bad"]
    assert restored.message == "two problems"


def test_validate_command_prints_every_error_and_exits_2(tmp_path, repo_root):
    path = tmp_path / "bad.yaml"
    data = _with("search.epochs", 0)
    data["search"]["methods"] = ["nope"]
    path.write_text(yaml.safe_dump(data))
    result = subprocess.run([sys.executable, "-m", "orchestrator", "validate", str(path)], capture_output=True,
                            text=True, cwd=repo_root)
    assert result.returncode == 2
    assert "search.epochs" in result.stderr


def test_validate_command_accepts_every_shipped_job(repo_root):
    specs = sorted(str(path) for path in Path(repo_root, "jobs").glob("*.yaml"))
    assert specs
    result = subprocess.run([sys.executable, "-m", "orchestrator", "validate", *specs], capture_output=True,
                            text=True, cwd=repo_root)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(": valid") == len(specs)


def test_run_command_with_invalid_spec_exits_2_before_any_work(tmp_path, repo_root):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_with("search.methods", ["nope"])))
    output = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "orchestrator", "run", str(path), "--output", str(output)],
                            capture_output=True, text=True, cwd=repo_root)
    assert result.returncode == 2
    assert "search.methods.0" in result.stderr
    assert not output.exists()
