"""Tests of the UNAS search loop in a plain process, on tiny supernets over the digits data."""

import copy
import dataclasses
import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

import workers.search as search_module
from search_spaces.darts import SEARCH_OPS, NetworkConfig, genotype_from_json, overlap_penalty
from search_spaces.darts.cells import MixedEdge
from search_spaces.errors import UnasError
from workers.config import DataConfig, SearchConfig
from workers.context import RunContext, load_checkpoint
from workers.search import OBJECTIVE_TERMS, SearchState, create_search_state, run_search, search_step

# A 359 / 360 train / validation split of the digits: 5 steps of 64 examples per epoch.
DATA = DataConfig(name="digits", test_fraction=0.6, validation_fraction=0.5)
# relax has the most state to checkpoint: a control variate network and its optimizer.
SEARCH = SearchConfig(chs=4, layers=3, epochs=3, warmup_epochs=1, batch_size=64, estimator="relax",
                      weight_lr=3e-3, arch_lr=3e-2)
STEPS_PER_EPOCH = 359 // 64


@pytest.fixture(autouse=True, scope="module")
def single_thread() -> Iterator[None]:
    """Runs on one intra-op thread: bitwise-equal results need the same reduction order, and tiny
    tensors gain nothing from two threads on a loaded machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class StopAfterEpoch(Exception):
    """Raised from a report callback to interrupt a search at an epoch boundary."""


@dataclasses.dataclass
class SearchRun:
    genotype_json: str | None
    history: list[dict]
    folder: Path

    def final_logits(self) -> list[torch.Tensor]:
        state = load_checkpoint(latest_checkpoint(self.folder))["distribution"]
        return [state[key] for key in sorted(state)]


def latest_checkpoint(folder: Path) -> Path:
    return sorted(folder.glob("epoch_*"))[-1]


def search(folder: Path, config: SearchConfig = SEARCH, stop_after: int | None = None) -> SearchRun:
    """Runs (or resumes) a search whose checkpoints go to folder, optionally stopping after an epoch."""

    def stop(metrics: dict) -> None:
        if metrics["epoch"] == stop_after:
            raise StopAfterEpoch

    context = RunContext(folder, on_report=stop if stop_after is not None else None)
    try:
        genotype = run_search(config, DATA, context)
    except StopAfterEpoch:
        return SearchRun(None, context.history, folder)
    return SearchRun(genotype.to_json(), context.history, folder)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> SearchRun:
    return search(tmp_path_factory.mktemp("uninterrupted"))


def assert_logits_equal(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(got) == len(expected)
    for index, (a, b) in enumerate(zip(got, expected)):
        assert torch.equal(a, b), f"architecture logits {index} differ: {a} != {b}"


def assert_logits_trained(logits: list[torch.Tensor]) -> None:
    assert all(torch.isfinite(phi).all() for phi in logits)
    assert any(phi.abs().max() > 0 for phi in logits), "the architecture logits are still all zero"


def test_search_same_seed_gives_identical_logits(uninterrupted, tmp_path):
    again = search(tmp_path)
    assert_logits_trained(uninterrupted.final_logits())
    assert again.genotype_json == uninterrupted.genotype_json
    assert_logits_equal(again.final_logits(), uninterrupted.final_logits())


def test_search_resumed_after_epoch_matches_uninterrupted(uninterrupted, tmp_path):
    stopped = search(tmp_path, stop_after=2)
    assert stopped.genotype_json is None
    assert [metrics["epoch"] for metrics in stopped.history] == [1, 2]
    assert latest_checkpoint(tmp_path).name == "epoch_00002"

    resumed = search(tmp_path)
    assert [metrics["epoch"] for metrics in resumed.history] == [3]
    assert resumed.genotype_json == uninterrupted.genotype_json
    assert_logits_equal(resumed.final_logits(), uninterrupted.final_logits())
    assert resumed.history[-1]["train_loss"] == uninterrupted.history[-1]["train_loss"]


def test_search_metrics_have_every_key(uninterrupted):
    last = uninterrupted.history[-1]
    expected = {"epoch", "train_loss", "train_acc", "objective", "entropy", "skip_count_normal",
                "skip_count_reduce", "weight_lr", "arch_lr", "warmup", "epoch_time_s", "genotype", *OBJECTIVE_TERMS}
    assert expected <= set(last)
    assert genotype_from_json(last["genotype"]).to_json() == uninterrupted.genotype_json
    for key in ("train_loss", "val_ce", "train_ce", "gap", "objective", "entropy"):
        assert math.isfinite(last[key]), key
    warmup = uninterrupted.history[0]
    assert warmup["warmup"] == 1
    assert last["warmup"] == 0
    assert "objective" not in warmup


def test_search_scales_learning_rates_by_global_batch(uninterrupted):
    scale = SEARCH.batch_size / SEARCH.reference_batch_size
    warmup = uninterrupted.history[0]
    assert warmup["weight_lr"] == pytest.approx(scale * SEARCH.weight_lr)
    assert warmup["arch_lr"] == pytest.approx(scale * SEARCH.arch_lr)
    last = uninterrupted.history[-1]
    # The cosine over 2 search epochs is halfway after the first of them.
    assert last["weight_lr"] == pytest.approx(scale * (SEARCH.weight_lr + SEARCH.weight_lr_min) / 2)
    assert last["arch_lr"] == pytest.approx(scale * (SEARCH.arch_lr + SEARCH.arch_lr_min) / 2)


def test_search_rejects_nonpositive_reference_batch(tmp_path):
    config = dataclasses.replace(SEARCH, reference_batch_size=0)
    with pytest.raises(UnasError, match="reference_batch_size"):
        search(tmp_path, config)


@pytest.mark.parametrize("estimator", ["reinforce", "relaxed", "rebar", "relax"])
def test_search_estimator_changes_logits(estimator, tmp_path):
    result = search(tmp_path, dataclasses.replace(SEARCH, estimator=estimator, epochs=2))
    assert_logits_trained(result.final_logits())
    last = result.history[-1]
    assert math.isfinite(last["objective"])
    assert last["train_loss"] < 3.0


def test_search_per_minibatch_sampling(tmp_path):
    result = search(tmp_path, dataclasses.replace(SEARCH, estimator="rebar", per_example=False, epochs=2))
    assert_logits_trained(result.final_logits())
    assert math.isfinite(result.history[-1]["objective"])


def test_search_softened_logits(tmp_path):
    result = search(tmp_path, dataclasses.replace(SEARCH, estimator="rebar", softening_eps=0.08, epochs=2))
    assert_logits_trained(result.final_logits())
    assert math.isfinite(result.history[-1]["objective"])


def test_search_without_gap_and_overlap_terms(tmp_path):
    config = dataclasses.replace(SEARCH, estimator="rebar", gap_term=False, overlap_term=False, epochs=2)
    result = search(tmp_path, config)
    assert_logits_trained(result.final_logits())
    last = result.history[-1]
    # Without the gap term the objective is the validation cross-entropy of the discrete sample.
    assert last["objective"] == pytest.approx(last["val_ce"], rel=1e-5)


class NanAfter(Dataset):
    """A data set whose images turn to NaN once `clean_reads` items have been read."""

    def __init__(self, base: Dataset, clean_reads: int):
        self.base = base
        self.clean_reads = clean_reads
        self.reads = 0

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        image, label = self.base[index]
        self.reads += 1
        if self.reads > self.clean_reads:
            image = torch.full_like(image, float("nan"))
        return image, label


def test_search_non_finite_loss_stops_and_keeps_checkpoint(tmp_path, monkeypatch):
    load = search_module.load_search_data

    def load_poisoned(data: DataConfig):
        train_set, val_set = load(data)
        # The first epoch reads STEPS_PER_EPOCH full batches; the next read is poisoned.
        return NanAfter(train_set, STEPS_PER_EPOCH * SEARCH.batch_size), val_set

    monkeypatch.setattr(search_module, "load_search_data", load_poisoned)
    with pytest.raises(FloatingPointError) as raised:
        search(tmp_path)
    message = str(raised.value)
    assert f"at step {STEPS_PER_EPOCH}" in message
    assert "train cross-entropy" in message
    assert "last good checkpoint is kept" in message

    assert [folder.name for folder in tmp_path.glob("epoch_*")] == ["epoch_00001"]
    state = load_checkpoint(latest_checkpoint(tmp_path))
    assert state["epoch"] == 1
    assert all(torch.isfinite(value).all() for value in state["network"].values() if value.is_floating_point())


def test_search_checkpoint_holds_genotype_file(uninterrupted):
    text = (latest_checkpoint(uninterrupted.folder) / search_module.GENOTYPE_FILE).read_text()
    assert json.loads(text) == json.loads(uninterrupted.genotype_json)


def every_op_forward(edge: MixedEdge, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The reference MixedEdge: every op computed, also those with an all-zero weight."""
    return sum(weights[:, k].view(-1, 1, 1, 1) * op(x) for k, op in enumerate(edge.ops))


def literal_step(state: SearchState, config: SearchConfig, train_batch, val_batch) -> None:
    """The reference procedure: graphs everywhere, a full backward, a separate weight step."""
    (x_t, y_t), (x_v, y_v) = train_batch, val_batch

    def objective(sample: list[torch.Tensor]) -> torch.Tensor:
        weights = state.distribution.to_weights(sample)
        ce_train = F.cross_entropy(state.network(x_t, weights), y_t, reduction="none")
        ce_val = F.cross_entropy(state.network(x_v, weights), y_v, reduction="none")
        loss = ce_train + config.gap_weight * (ce_val - ce_train).abs() + config.overlap_weight * overlap_penalty(sample)
        return loss if config.per_example else loss.mean().view(1)

    num_samples = x_t.shape[0] if config.per_example else 1
    result = state.estimator.estimate(state.distribution.normalized_logits(), objective, num_samples,
                                      state.generator)
    state.arch_optimizer.zero_grad(set_to_none=True)
    result.surrogate.backward()
    if hasattr(state.estimator, "step_control_variate"):
        state.estimator.step_control_variate()
    state.arch_optimizer.step()
    state.weight_optimizer.zero_grad(set_to_none=True)
    logits = state.network(x_t, state.distribution.to_weights(result.weight_sample))
    F.cross_entropy(logits, y_t).backward()
    torch.nn.utils.clip_grad_norm_(state.network.parameters(), config.grad_clip)
    state.weight_optimizer.step()


def step_outcome(state: SearchState) -> dict[str, torch.Tensor]:
    """Gradients and updated values of the architecture logits and the supernet weights."""
    outcome = {}
    for prefix, module in (("arch", state.distribution), ("weights", state.network)):
        for name, param in module.named_parameters():
            outcome[f"{prefix}.{name}.grad"] = param.grad.clone()
            outcome[f"{prefix}.{name}"] = param.detach().clone()
    return outcome


@pytest.mark.parametrize("estimator, per_example", [
    ("reinforce", True), ("relaxed", True), ("rebar", True), ("relax", True), ("rebar", False), ("reinforce", False),
])
def test_search_step_matches_literal_step(estimator, per_example, monkeypatch):
    config = dataclasses.replace(SEARCH, estimator=estimator, per_example=per_example)
    network_config = NetworkConfig(config.chs, config.layers, num_classes=10, in_chs=1)
    state = create_search_state(config, network_config, SEARCH_OPS, torch.device("cpu"), rank=0)
    generator = torch.Generator().manual_seed(5)
    layout = search_module.supernet_memory_format(torch.device("cpu"))
    batches = [(torch.randn(16, 1, 8, 8, generator=generator).contiguous(memory_format=layout),
                torch.randint(10, (16,), generator=generator)) for _ in range(2)]
    initial = copy.deepcopy(state.state_dict())

    outcomes = []
    for take_step in (search_step, literal_step):
        state.load_state_dict(copy.deepcopy(initial))
        # A first step gives the relax control variate and Adam some state, so the second step
        # checks them too.
        for _ in range(2):
            with monkeypatch.context() as patch:
                if take_step is literal_step:
                    patch.setattr(MixedEdge, "forward", every_op_forward)
                take_step(state, config, *batches)
        outcomes.append(step_outcome(state))

    product, literal = outcomes
    assert product.keys() == literal.keys()
    for name, expected in literal.items():
        scale = expected.abs().max().item()
        difference = (product[name] - expected).abs().max().item()
        assert difference <= 1e-5 * max(scale, 1e-8), f"{name}: differs by {difference:.3g} (max {scale:.3g})"
