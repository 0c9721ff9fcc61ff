"""Time one UNAS search step: the product's step against a literal step of the reference procedure.

Setting (the CIFAR search of UNAS, by default): a supernet of 8 cells with C = 16, random 32x32
RGB inputs, 10 classes, 16 train and 16 validation images per step, one architecture sample per
example, the rebar estimator, and the objective CE_train + 0.5 |CE_val - CE_train| + 0.2 overlap
penalty.

- product: ``workers.search.search_step``, as the search loop runs it (channels-last on the CPU).
- literal: the reference procedure in PyTorch's default NCHW layout, as the reference code
  runs it. Every op of every edge is computed in every forward, including those with a zero
  architecture weight. The estimator's two forwards on the discrete sample keep their autograd
  graph. ``surrogate.backward()`` backpropagates the architecture objective into every leaf,
  then a separate forward and backward of CE_train on the detached relaxed sample give the
  weight gradient.
- literal_same_layout: the same literal step in the product's channels-last layout. Its ratio
  to the product is the gain of the procedure alone.

All variants start every step from the same network, logits, optimizer and random state, so they
draw the same Gumbel noise. Gradients (architecture logits and weights, after clipping) are
checked twice, and the script exits with status 1 when either difference reaches 1e-4:

- the product against the literal step, both in float64 (``max_grad_diff``). In float64 the two
  layouts' convolution kernels round far below the tolerance, so a difference that remains comes
  from the procedure.
- the product against literal_same_layout in float32, where the two run the same kernels and
  must agree to the bit.

In float32 the NCHW literal is not compared with a tolerance. Between the two layouts the literal
step's own weight gradients differ by up to 6.65e-2 relative (measured at the default setting),
and the script prints that figure.

Step times are medians over repeats, with the variants interleaved and their order rotated.

Run from the repository root: ``python3 bench/search_step.py [--json]``.
"""

import argparse
import contextlib
import copy
import dataclasses
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from search_spaces.darts import SEARCH_OPS, NetworkConfig, overlap_penalty  # noqa: E402
from search_spaces.darts.cells import MixedEdge  # noqa: E402
from workers.config import SearchConfig  # noqa: E402
from workers.search import SearchState, create_search_state, search_step, supernet_memory_format  # noqa: E402

IN_CHANNELS = 3
NUM_CLASSES = 10
GRADIENT_TOLERANCE = 1e-4  # largest relative gradient difference accepted

Batch = tuple[torch.Tensor, torch.Tensor]
StepFn = Callable[[SearchState, SearchConfig, Batch, Batch], object]
Variants = dict[str, tuple[StepFn, SearchState, tuple[Batch, Batch]]]


@dataclasses.dataclass(frozen=True)
class Setting:
    """The supernet and batch of the timed step; the defaults are the CIFAR search of UNAS."""

    cells: int = 8
    channels: int = 16
    image_size: int = 32
    batch: int = 16


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per variant (default 3)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed steps per variant before timing; the first one is gradient-checked (default 1)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1, steadier than 2 on a loaded machine)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, inputs and noise (default 0)")
    parser.add_argument("--skip-float64-check", action="store_true",
                        help="skip the float64 comparison with the literal step, which takes about 100 s. "
                             "max_grad_diff is then null and the exit status ignores it")
    defaults = Setting()
    parser.add_argument("--cells", type=int, default=defaults.cells, help="cells of the supernet (default 8)")
    parser.add_argument("--channels", type=int, default=defaults.channels, help="initial channels C (default 16)")
    parser.add_argument("--image-size", type=int, default=defaults.image_size, help="input height and width (default 32)")
    parser.add_argument("--batch", type=int, default=defaults.batch, help="train and validation images per step (default 16)")
    args = parser.parse_args(argv)
    if min(args.repeats, args.warmup, args.threads) < 1:
        parser.error("--repeats, --warmup and --threads must be at least 1")
    if args.cells < 3 or args.channels < 2 or args.channels % 2 or args.image_size < 4 or args.batch < 2:
        parser.error("--cells needs at least 3, --channels an even number of at least 2, "
                     "--image-size at least 4 and --batch at least 2")
    return args


def search_config(setting: Setting, seed: int) -> SearchConfig:
    return SearchConfig(chs=setting.channels, layers=setting.cells, estimator="rebar", tau=0.4, per_example=True,
                        gap_term=True, gap_weight=0.5, overlap_term=True, overlap_weight=0.2,
                        batch_size=setting.batch, grad_clip=5.0, seed=seed)


def random_batch(setting: Setting, generator: torch.Generator) -> Batch:
    images = torch.randn(setting.batch, IN_CHANNELS, setting.image_size, setting.image_size, generator=generator)
    return images, torch.randint(NUM_CLASSES, (setting.batch,), generator=generator)


def in_layout(batch: Batch, memory_format: torch.memory_format) -> Batch:
    return batch[0].contiguous(memory_format=memory_format), batch[1]


def _every_op_forward(edge: MixedEdge, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    out = None
    for k, op in enumerate(edge.ops):
        term = weights[:, k].view(-1, 1, 1, 1) * op(x)
        out = term if out is None else out + term
    return out


@contextlib.contextmanager
def every_op_edges() -> Iterator[None]:
    """Makes every MixedEdge compute all its ops, as the reference supernet does."""
    original = MixedEdge.forward
    MixedEdge.forward = _every_op_forward
    try:
        yield
    finally:
        MixedEdge.forward = original


def literal_step(state: SearchState, config: SearchConfig, train_batch: Batch, val_batch: Batch) -> None:
    """Take one step of the reference procedure, op for op."""
    (x_t, y_t), (x_v, y_v) = train_batch, val_batch

    def objective(sample: list[torch.Tensor]) -> torch.Tensor:
        weights = state.distribution.to_weights(sample)
        ce_train = F.cross_entropy(state.network(x_t, weights), y_t, reduction="none")
        ce_val = F.cross_entropy(state.network(x_v, weights), y_v, reduction="none")
        gap = (ce_val - ce_train).abs()
        return ce_train + config.gap_weight * gap + config.overlap_weight * overlap_penalty(sample)

    with every_op_edges():
        result = state.estimator.estimate(state.distribution.normalized_logits(), objective, x_t.shape[0],
                                          state.generator)
        state.arch_optimizer.zero_grad(set_to_none=True)
        result.surrogate.backward()
        state.arch_optimizer.step()

        state.weight_optimizer.zero_grad(set_to_none=True)
        logits = state.network(x_t, state.distribution.to_weights(result.weight_sample))
        F.cross_entropy(logits, y_t).backward()
        torch.nn.utils.clip_grad_norm_(state.network.parameters(), config.grad_clip)
        state.weight_optimizer.step()


def gradients(state: SearchState) -> dict[str, torch.Tensor]:
    named = [(f"arch.{name}", p) for name, p in state.distribution.named_parameters()]
    named += [(f"weights.{name}", p) for name, p in state.network.named_parameters()]
    return {name: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for name, p in named}


def largest_difference(candidate: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> tuple[float, str]:
    """Return the largest per-tensor max |candidate - reference| / max |reference|, and its tensor's name."""
    worst, worst_name = 0.0, ""
    for name, expected in reference.items():
        difference = (candidate[name] - expected).abs().max().item()
        scale = expected.abs().max().item()
        relative = difference / scale if scale > 0 else difference
        if relative >= worst:
            worst, worst_name = relative, name
    return worst, worst_name


def timed_step(step: StepFn, state: SearchState, snapshot: dict, config: SearchConfig,
               batches: tuple[Batch, Batch]) -> float:
    state.load_state_dict(copy.deepcopy(snapshot))
    started = time.perf_counter()
    step(state, config, *batches)
    return time.perf_counter() - started


def build_variants(setting: Setting, config: SearchConfig, seed: int) -> tuple[Variants, dict]:
    """Build the three variants (step, state, batches) and the snapshot that every step starts from."""
    cpu = torch.device("cpu")
    network_config = NetworkConfig(config.chs, config.layers, NUM_CLASSES, in_chs=IN_CHANNELS)
    product_layout = supernet_memory_format(cpu)
    state = create_search_state(config, network_config, SEARCH_OPS, cpu, rank=0)
    reference_state = create_search_state(config, network_config, SEARCH_OPS, cpu, rank=0)
    reference_state.network.to(memory_format=torch.contiguous_format)
    snapshot = copy.deepcopy(state.state_dict())

    data_generator = torch.Generator().manual_seed(seed)
    train_batch = random_batch(setting, data_generator)
    val_batch = random_batch(setting, data_generator)
    batches = {layout: (in_layout(train_batch, layout), in_layout(val_batch, layout))
               for layout in (product_layout, torch.contiguous_format)}
    # Every step loads the snapshot into its state, so two variants can share one.
    variants = {
        "product": (search_step, state, batches[product_layout]),
        "literal": (literal_step, reference_state, batches[torch.contiguous_format]),
        "literal_same_layout": (literal_step, state, batches[product_layout]),
    }
    return variants, snapshot


def first_step_gradients(variants: Variants, snapshot: dict, config: SearchConfig,
                         names: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor]]:
    grads = {}
    for name in names:
        step, state, batches = variants[name]
        timed_step(step, state, snapshot, config, batches)
        grads[name] = gradients(state)
    return grads


def float64_gradients(setting: Setting, config: SearchConfig, seed: int,
                      product_step: StepFn = search_step) -> dict[str, dict[str, torch.Tensor]]:
    """Compute the first step's gradients of the product and of the NCHW literal step in float64."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        variants, snapshot = build_variants(setting, config, seed)
        variants["product"] = (product_step, *variants["product"][1:])
        for name in ("product", "literal"):
            step, state, (train_batch, val_batch) = variants[name]
            as_double = tuple((images.double(), labels) for images, labels in (train_batch, val_batch))
            variants[name] = (step, state, as_double)
        return first_step_gradients(variants, snapshot, config, ("product", "literal"))
    finally:
        torch.set_default_dtype(previous)


def time_variants(variants: Variants, snapshot: dict, config: SearchConfig, args: argparse.Namespace) -> dict[str, list[float]]:
    for _ in range(args.warmup - 1):
        for step, state, batches in variants.values():
            timed_step(step, state, snapshot, config, batches)
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for repeat in range(args.repeats):
        rotation = repeat % len(names)
        for name in names[rotation:] + names[:rotation]:
            step, state, batches = variants[name]
            times[name].append(timed_step(step, state, snapshot, config, batches))
    return times


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    setting = Setting(args.cells, args.channels, args.image_size, args.batch)
    config = search_config(setting, args.seed)
    variants, snapshot = build_variants(setting, config, args.seed)
    grads = first_step_gradients(variants, snapshot, config, tuple(variants))
    times = time_variants(variants, snapshot, config, args)
    grads64 = None if args.skip_float64_check else float64_gradients(setting, config, args.seed)
    return summarize(args, setting, times, grads, grads64)


def summarize(args: argparse.Namespace, setting: Setting, times: dict[str, list[float]],
              grads: dict[str, dict[str, torch.Tensor]], grads64: dict[str, dict[str, torch.Tensor]] | None) -> dict:
    median = {name: statistics.median(values) for name, values in times.items()}
    same_layout, same_layout_tensor = largest_difference(grads["product"], grads["literal_same_layout"])
    max_grad_diff, worst_tensor = largest_difference(grads64["product"], grads64["literal"]) if grads64 else (None, None)
    return {
        "speedup": median["literal"] / median["product"],
        "max_grad_diff": max_grad_diff,
        "max_grad_diff_tensor": worst_tensor,
        "speedup_same_layout": median["literal_same_layout"] / median["product"],
        "max_grad_diff_same_layout": same_layout,
        "max_grad_diff_same_layout_tensor": same_layout_tensor,
        "gradients_match": same_layout < GRADIENT_TOLERANCE and (max_grad_diff is None or max_grad_diff < GRADIENT_TOLERANCE),
        "float32_layout_rounding": {
            "product_vs_literal": largest_difference(grads["product"], grads["literal"])[0],
            "literal_vs_literal_same_layout": largest_difference(grads["literal_same_layout"], grads["literal"])[0],
        },
        "images_per_s": {name: setting.batch / seconds for name, seconds in median.items()},
        "step_s_median": median,
        "step_s_all": times,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "threads": args.threads,
        "setting": {**dataclasses.asdict(setting), "classes": NUM_CLASSES, "estimator": "rebar", "per_example": True},
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {platform.processor() or 'unknown CPU'}",
    }


def print_text(result: dict) -> None:
    rate = result["images_per_s"]
    seconds = result["step_s_median"]
    print(f"one search step, median of {result['repeats']} (torch {result['torch']}, {result['threads']} thread(s)):")
    for name in ("product", "literal", "literal_same_layout"):
        print(f"  {name:20s} {seconds[name]:7.2f} s/step  {rate[name]:6.2f} images/s")
    print(f"speedup over the literal step (NCHW):             {result['speedup']:.2f}x")
    print(f"speedup over the literal step in the same layout: {result['speedup_same_layout']:.2f}x")
    if result["max_grad_diff"] is None:
        print("largest relative gradient difference to the literal step in float64: not computed (--skip-float64-check)")
    else:
        print(f"largest relative gradient difference to the literal step in float64: {result['max_grad_diff']:.2e} "
              f"({result['max_grad_diff_tensor']})")
    print(f"largest relative gradient difference to the same-layout literal in float32: "
          f"{result['max_grad_diff_same_layout']:.2e} ({result['max_grad_diff_same_layout_tensor']})")
    verdict = "match" if result["gradients_match"] else "DIFFER"
    print(f"gradients {verdict} (tolerance {GRADIENT_TOLERANCE:g})")
    rounding = result["float32_layout_rounding"]
    print(f"float32 layout rounding, not checked: product vs NCHW literal {rounding['product_vs_literal']:.2e}, "
          f"literal vs itself across layouts {rounding['literal_vs_literal_same_layout']:.2e}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    if args.json:
        print(json.dumps(result))
    else:
        print_text(result)
    return 0 if result["gradients_match"] else 1


if __name__ == "__main__":
    sys.exit(main())
