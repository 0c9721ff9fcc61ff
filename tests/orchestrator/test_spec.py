"""Spec validation: every problem reported at once, each naming the field, the value and the fix."""

import copy
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.spec import SpecError, load_spec, parse_spec
from workers.evaluate import paper_recipe

VALID = {
    "name": "tiny",
    "data": {"name": "digits"},
    "search": {"chs": 4, "layers": 3, "epochs": 2, "warmup_epochs": 1, "batch_size": 64},
    "evaluate": {"random_cells": 1, "recipe": {"chs": 4, "layers": 3, "epochs": 2, "warmup_epochs": 0}},
}


PROXYLESS = {
    "name": "tiny-proxyless",
    "data": {"name": "digits"},
    "search": {"space": "proxyless", "width_mult": 0.25, "layers_per_stage": 1, "stem_stride": 1, "epochs": 2,
               "warmup_epochs": 1, "batch_size": 64},
    "evaluate": {"found": True, "random_cells": 1, "recipe": {"epochs": 2, "warmup_epochs": 0}},
}


def _with(path: str, value, base: dict = VALID):
    spec = copy.deepcopy(base)
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


def _left_out_recipe_fields(data: dict, published) -> tuple[dict, dict]:
    """Return the recipe fields a spec leaves out, as parsed and as in a published recipe.

    The seed comes from evaluate.seeds, and loader_workers defaults to -1 (sized from the CPUs).
    """
    recipe = parse_spec(data).evaluate.recipe.model_dump()
    published = dataclasses.asdict(published)
    names = set(published) - set(data["evaluate"]["recipe"]) - {"seed", "loader_workers"}
    return {name: recipe[name] for name in names}, {name: published[name] for name in names}


def test_parse_spec_fills_proxyless_recipe_from_published():
    parsed, published = _left_out_recipe_fields(PROXYLESS, paper_recipe("imagenet", "proxyless"))
    assert parsed == published
    assert parsed["lr"] == 0.2


def test_parse_spec_keeps_cell_recipe_defaults():
    parsed, published = _left_out_recipe_fields(VALID, paper_recipe("cifar10"))
    assert parsed == published
    assert parsed["lr"] == 0.05


def test_parse_spec_accepts_named_proxyless_at_full_size():
    data = _with("search.layers_per_stage", 4, PROXYLESS)
    data["search"]["width_mult"] = 1.0
    data["evaluate"]["named"] = ["UNAS", "PROXYLESS_GPU"]

    spec = parse_spec(data)

    assert spec.evaluate.named == ["UNAS", "PROXYLESS_GPU"]


BAD_PROXYLESS_SPECS = [
    ("evaluate.named", ["DARTS_V2"], ["evaluate.named.0", "'DARTS_V2'", "darts space", "PROXYLESS_GPU, UNAS"]),
    ("evaluate.named", ["UNAS"], ["evaluate.named.0", "'UNAS'", "full-size", "layers_per_stage 1",
                                  "layers_per_stage 4"]),
    ("evaluate.named", ["MOBILENET"], ["evaluate.named.0", "'MOBILENET'", "not a known genotype", "UNAS"]),
    ("evaluate.recipe.chs", 8, ["evaluate.recipe.chs", "8", "search.width_mult", "remove it"]),
    ("evaluate.recipe.layers", 5, ["evaluate.recipe.layers", "5", "remove it"]),
    ("evaluate.recipe.drop_path", 0.2, ["evaluate.recipe.drop_path", "0.2", "no drop path", "set it to 0"]),
    ("evaluate.recipe.auxiliary_weight", 0.4, ["evaluate.recipe.auxiliary_weight", "0.4", "no auxiliary head"]),
    ("search.width_mult", -1.0, ["search", "width_mult must be positive", "-1.0"]),
]


@pytest.mark.parametrize(("path", "value", "expected"), BAD_PROXYLESS_SPECS,
                         ids=[case[0] + "=" + str(case[1]) for case in BAD_PROXYLESS_SPECS])
def test_parse_spec_rejects_bad_proxyless_evaluation(path, value, expected):
    problems = _problems(_with(path, value, PROXYLESS))
    assert len(problems) == 1, problems
    for fragment in expected:
        assert fragment in problems[0]


def test_parse_spec_rejects_proxyless_name_in_cell_job():
    problems = _problems(_with("evaluate.named", ["UNAS"]))
    assert problems == ["evaluate.named.0: 'UNAS' is a genotype of the proxyless space, but this job evaluates "
                        "the darts space (search.space); valid: " + ", ".join(
                            ["UNAS_CIFAR10", "UNAS_CIFAR100", "UNAS_IMAGENET", "DARTS_V2", "DARTS_V1", "PDARTS"])]


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
