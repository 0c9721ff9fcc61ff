"""Drawings of DARTS-space genotypes: the normal and reduction cells side by side in one PNG.

The figure is a bare ``matplotlib.figure.Figure`` rendered by the Agg backend rather than a
pyplot figure, so drawing needs no display and no graphviz, and leaves pyplot's global state alone.
"""

import math
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.patches import Circle, FancyArrowPatch

from search_spaces.darts.genotype import CELL_TYPES, NUM_NODES, Genotype
from search_spaces.darts.ops import SHORT_NAMES

NODE_RADIUS = 0.42
ELLIPSE_HALF_WIDTH = 5.0
ELLIPSE_HALF_HEIGHT = 2.8
# Angles (degrees) of states 0..5 and of the cell output on the ellipse. Going round it the
# order is c_{k-2}, 2, 4, c_k, 5, 3, c_{k-1}, so the cell reads left to right. Because every
# state lies on a convex curve, each straight edge misses every third state by at least
# twice NODE_RADIUS.
STATE_ANGLES_DEG = (150.0, 210.0, 105.0, 255.0, 60.0, 300.0, 0.0)
# Two edges between the same pair of states bend to opposite sides by this distance at their
# middle, so that neither the arrows nor their labels overlap. A fixed distance, not a fixed
# curvature, keeps long edges from swinging into other states.
PARALLEL_EDGE_BULGE = 0.32
# Fractions along an edge where its label may sit, tried in this order.
LABEL_POSITIONS = (0.5, 0.4, 0.6, 0.3, 0.7, 0.22, 0.78)
# Clearance, in drawing units, that a label keeps from other edges, states and labels when
# its edge leaves room for it.
LABEL_CLEARANCE = 0.5
# Radii that labels keep clear of around a state (its circle plus room for arrowheads) and
# around an already placed label.
STATE_KEEP_OUT = NODE_RADIUS + 0.35
LABEL_KEEP_OUT = 0.3

_TITLES = {"normal": "normal cell", "reduce": "reduction cell"}
_INPUT_LABELS = ("$c_{k-2}$", "$c_{k-1}$")
_COLOURS = {"input": "#cfe2f3", "node": "#fff2cc", "output": "#d9ead3"}

Point = tuple[float, float]


@dataclass(frozen=True)
class _Edge:
    """One arrow of a drawn cell; rad is matplotlib's arc3 curvature, 0 for a straight line."""

    start: Point
    end: Point
    rad: float
    label: str | None


def _state_positions() -> list[Point]:
    """(x, y) of states 0..5 and, last, of the cell output."""
    positions = []
    for angle_deg in STATE_ANGLES_DEG:
        angle = math.radians(angle_deg)
        positions.append((ELLIPSE_HALF_WIDTH * math.cos(angle), ELLIPSE_HALF_HEIGHT * math.sin(angle)))
    return positions


def _point_on_edge(start: Point, end: Point, rad: float, t: float) -> Point:
    # arc3 draws a quadratic Bezier whose control point sits rad * (dy, -dx) from the chord's
    # midpoint. With equal axis scaling the display-space curve matches this data-space one.
    (x0, y0), (x1, y1) = start, end
    dx, dy = x1 - x0, y1 - y0
    control_x = (x0 + x1) / 2 + rad * dy
    control_y = (y0 + y1) / 2 - rad * dx
    a, b, c = (1 - t) ** 2, 2 * t * (1 - t), t ** 2
    return a * x0 + b * control_x + c * x1, a * y0 + b * control_y + c * y1


def _sample_edge(edge: _Edge, count: int = 24) -> list[Point]:
    return [_point_on_edge(edge.start, edge.end, edge.rad, i / (count - 1)) for i in range(count)]


def _place_label(edge: _Edge, obstacles: list[tuple[Point, float]], good_enough: float) -> Point:
    """Pick the point along the edge nearest its middle that keeps good_enough clearance.

    obstacles are (centre, radius) discs: points on the other edges, the states (widened to
    keep arrowheads visible) and the labels placed so far. When no candidate is clear by
    good_enough, the clearest one wins.
    """
    def clearance(point: Point) -> float:
        return min(math.dist(point, centre) - radius for centre, radius in obstacles)

    candidates = [_point_on_edge(edge.start, edge.end, edge.rad, t) for t in LABEL_POSITIONS]
    for candidate in candidates:
        if clearance(candidate) >= good_enough:
            return candidate
    return max(candidates, key=clearance)


def _draw_state(ax, centre: Point, label: str, kind: str) -> Circle:
    circle = Circle(centre, NODE_RADIUS, facecolor=_COLOURS[kind], edgecolor="black", linewidth=1.2, zorder=3)
    ax.add_patch(circle)
    ax.text(*centre, label, ha="center", va="center", fontsize=12, zorder=4)
    return circle


def _draw_arrow(ax, start: Circle, end: Circle, rad: float) -> None:
    arrow = FancyArrowPatch(
        start.center, end.center, patchA=start, patchB=end, arrowstyle="-|>", mutation_scale=14,
        connectionstyle=f"arc3,rad={rad}", linewidth=1.1, color="#444444", zorder=2,
    )
    ax.add_patch(arrow)


def _draw_label(ax, point: Point, label: str) -> None:
    ax.text(*point, label, ha="center", va="center", fontsize=10, zorder=5,
            bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.9})


def _cell_edges(genotype: Genotype, cell_type: str, positions: list[Point]) -> list[_Edge]:
    """List the labelled (input, op) edges of a cell, then the unlabelled edges into its output."""
    edges = []
    for index, node in enumerate(genotype.cell(cell_type)):
        same_source = node[0].input == node[1].input
        for edge_index, edge in enumerate(node):
            start, end = positions[edge.input], positions[index + 2]
            # An arc3 curve passes rad * length / 2 from its chord's middle.
            rad = 2 * PARALLEL_EDGE_BULGE / math.dist(start, end) if same_source else 0.0
            if edge_index == 1:
                rad = -rad
            label = SHORT_NAMES.get(edge.op, edge.op)
            edges.append(_Edge(start, end, rad, label))
    for node in range(NUM_NODES):
        edges.append(_Edge(positions[node + 2], positions[-1], 0.0, None))
    return edges


def _draw_cell(ax, genotype: Genotype, cell_type: str) -> None:
    positions = _state_positions()
    circles = {}
    for state in range(2):
        circles[positions[state]] = _draw_state(ax, positions[state], _INPUT_LABELS[state], "input")
    for node in range(NUM_NODES):
        circles[positions[node + 2]] = _draw_state(ax, positions[node + 2], str(node + 2), "node")
    circles[positions[-1]] = _draw_state(ax, positions[-1], "$c_{k}$", "output")

    edges = _cell_edges(genotype, cell_type, positions)
    samples = [_sample_edge(edge) for edge in edges]
    placed_labels: list[Point] = []
    for index, edge in enumerate(edges):
        _draw_arrow(ax, circles[edge.start], circles[edge.end], edge.rad)
        if edge.label is None:
            continue
        obstacles = [(point, 0.0) for other, points in enumerate(samples) if other != index for point in points]
        obstacles += [(position, STATE_KEEP_OUT) for position in positions]
        obstacles += [(label, LABEL_KEEP_OUT) for label in placed_labels]
        point = _place_label(edge, obstacles, good_enough=LABEL_CLEARANCE)
        _draw_label(ax, point, edge.label)
        placed_labels.append(point)

    ax.set_title(_TITLES[cell_type], fontsize=13)
    ax.set_aspect("equal")
    margin = 0.7
    ax.set_xlim(-ELLIPSE_HALF_WIDTH - margin, ELLIPSE_HALF_WIDTH + margin)
    ax.set_ylim(-ELLIPSE_HALF_HEIGHT - margin, ELLIPSE_HALF_HEIGHT + margin)
    ax.axis("off")


def draw_genotype(genotype: Genotype, path: str | Path) -> None:
    """Write a PNG of the normal and reduction cells of a genotype, side by side.

    Edges carry the short op names (sep3, skip, ...). In the reduction cell the ops on edges
    from c_{k-2} and c_{k-1} have stride 2. The parent directory of path must exist.
    """
    figure = Figure(figsize=(16, 5.5), layout="constrained")
    axes = figure.subplots(1, len(CELL_TYPES))
    for ax, cell_type in zip(axes, CELL_TYPES):
        _draw_cell(ax, genotype, cell_type)
    figure.savefig(path, format="png", dpi=110)
