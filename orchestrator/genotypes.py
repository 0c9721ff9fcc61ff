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
