"""`unas genotype show`: a genotype by name or file, with its network's size on a data set."""

from pathlib import Path
from typing import Any

from search_spaces.darts import GENOTYPES, Genotype, get_genotype, load_genotype
from search_spaces.darts.counting import describe_network
from search_spaces.darts.drawing import draw_genotype
from search_spaces.errors import GenotypeError


def resolve_genotype(name_or_path: str) -> Genotype:
    """Looks up a registered name, or loads the genotype JSON file at that path."""
    if name_or_path in GENOTYPES:
        return get_genotype(name_or_path)
    path = Path(name_or_path)
    if path.is_file():
        return load_genotype(path)
    raise GenotypeError(f"genotype {name_or_path!r} is neither a known name nor a file; "
                        f"known names: {', '.join(GENOTYPES.names())}")


def show_genotype(name_or_path: str, dataset: str, draw_path: str | None = None) -> dict[str, Any]:
    genotype = resolve_genotype(name_or_path)
    summary = describe_network(genotype, dataset)
    lines = [
        genotype.describe(),
        f"data set: {dataset}",
        f"layers: {summary['layers']}, channels: {summary['channels']}",
        f"params: {summary['params_m']:.3f} M (auxiliary head excluded)",
        f"multiply-adds: {summary['madds_m']:.1f} M (conv+linear), {summary['madds_paper_m']:.1f} M (paper convention)",
    ]
    if draw_path:
        draw_genotype(genotype, draw_path)
        lines.append(f"drawing: {draw_path}")
    return {**summary, "text": "\n".join(lines)}


def show_proxyless_genotype(name_or_path: str, latency: bool = False) -> dict[str, Any]:
    """Params, multiply-adds and (when asked) the latency on this device of a proxyless network."""
    from search_spaces import proxyless
    from workers.latency import describe_proxyless

    if name_or_path in proxyless.GENOTYPES:
        genotype = proxyless.get_genotype(name_or_path)
    elif Path(name_or_path).is_file():
        genotype = proxyless.load_genotype(name_or_path)
    else:
        raise GenotypeError(f"proxyless genotype {name_or_path!r} is neither a known name nor a file; "
                            f"known names: {', '.join(proxyless.GENOTYPES.names())}")
    summary = describe_proxyless(genotype, latency=latency)
    lines = [genotype.describe(), f"params: {summary['params_m']:.3f} M",
             f"multiply-adds: {summary['madds_m']:.1f} M (conv+linear, 224x224)"]
    if latency:
        lines.append(f"latency: {summary['latency_ms']:.2f} ms on {summary['latency_device']} "
                     f"(batch {summary['latency_batch_size']})")
    return {**summary, "text": "\n".join(lines)}
