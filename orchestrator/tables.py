"""Result tables in the layout of Tables 4-6 of the UNAS paper (Vahdat et al., CVPR 2020),
built from the MLflow runs alone.

One row per search method (found cells over seeds), per named genotype and for the random
cells as a group: final test error mean +- std and best, params, multiply-adds, search cost
and method.
"""

import logging
from pathlib import Path

import pandas as pd

from orchestrator.plan import GROUP_FOUND, GROUP_NAMED, GROUP_RANDOM, STAGE_EVALUATE, STAGE_SEARCH
from orchestrator.tracking import (
    TAG_GROUP,
    TAG_JOB_ID,
    TAG_KEY,
    TAG_LABEL,
    TAG_SOURCE_KEY,
    TAG_SPACE,
    TAG_STAGE,
    Tracker,
)

logger = logging.getLogger(__name__)

COLUMNS = ["row", "search_method", "cells", "finished", "test_error_mean_pct", "test_error_std_pct",
           "test_error_best_pct", "params_m", "madds_m", "search_cost_gpu_days", "search_wall_h"]


def fetch_job_runs(tracker: Tracker, job_id: str) -> pd.DataFrame:
    import mlflow

    mlflow.set_tracking_uri(tracker.tracking_uri)
    return mlflow.search_runs([tracker.experiment_id], filter_string=f"tags.`{TAG_JOB_ID}` = '{job_id}'",
                              max_results=5000)


def _column(runs: pd.DataFrame, name: str) -> pd.Series:
    return runs[name] if name in runs.columns else pd.Series([None] * len(runs), index=runs.index, dtype=object)


def build_results_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Summarises a job's evaluation runs; search cost comes from the runs of the source searches."""
    if runs.empty:
        return pd.DataFrame(columns=COLUMNS)
    stage = _column(runs, f"tags.{TAG_STAGE}")
    evals = runs[stage == STAGE_EVALUATE]
    searches = runs[stage == STAGE_SEARCH]
    if evals.empty:
        return pd.DataFrame(columns=COLUMNS)
    rows = []
    for (group, label), cells in evals.groupby([f"tags.{TAG_GROUP}", _row_label(evals)], sort=False):
        rows.append(_summarise(group, label, cells, searches))
    table = pd.DataFrame(rows, columns=COLUMNS)
    order = {GROUP_FOUND: 0, GROUP_NAMED: 1, GROUP_RANDOM: 2}
    return table.sort_values("row", key=lambda s: s.map(lambda r: (order.get(r.split(":")[0], 3), r))).reset_index(drop=True)


def _row_label(evals: pd.DataFrame) -> pd.Series:
    group = evals[f"tags.{TAG_GROUP}"]
    label = evals[f"tags.{TAG_LABEL}"]
    # Random cells form one row; found cells one row per method; named genotypes one row each.
    return label.where(group != GROUP_RANDOM, "random")


def _summarise(group: str, label: str, cells: pd.DataFrame, searches: pd.DataFrame) -> dict:
    finished = cells[cells["status"] == "FINISHED"]
    errors = finished.get("metrics.final_test_error", pd.Series(dtype=float)).dropna() * 100
    params = finished.get("metrics.params_m", pd.Series(dtype=float)).dropna()
    madds = cells.get("metrics.madds_m", pd.Series(dtype=float)).dropna()
    cost_gpu_days, wall_h = None, None
    if group == GROUP_FOUND:
        keys = set(cells[f"tags.{TAG_SOURCE_KEY}"])
        sources = searches[searches[f"tags.{TAG_KEY}"].isin(keys)]
        if len(sources):
            cost_gpu_days = float(sources["metrics.gpu_days"].mean()) if "metrics.gpu_days" in sources else None
            wall_h = float(sources["metrics.wall_time_s"].mean() / 3600) if "metrics.wall_time_s" in sources else None
    # Runs from before the space tag existed are all DARTS cells.
    published = "published network" if (_column(cells, f"tags.{TAG_SPACE}") == "proxyless").any() else "published cell"
    method = {GROUP_FOUND: f"UNAS ({label})", GROUP_NAMED: published, GROUP_RANDOM: "random"}.get(group, group)
    return {
        "row": f"{group}:{label}",
        "search_method": method,
        "cells": len(cells),
        "finished": len(finished),
        "test_error_mean_pct": float(errors.mean()) if len(errors) else None,
        "test_error_std_pct": float(errors.std(ddof=0)) if len(errors) else None,
        "test_error_best_pct": float(errors.min()) if len(errors) else None,
        "params_m": float(params.mean()) if len(params) else None,
        "madds_m": float(madds.mean()) if len(madds) else None,
        "search_cost_gpu_days": cost_gpu_days,
        "search_wall_h": wall_h,
    }


CELL_COLUMNS = ["key", "group", "label", "status", "test_accuracy_pct", "test_error_pct", "min_test_error_pct",
                "params_m"]


def build_cells_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Builds one row per evaluation run: every trained cell with its final test accuracy."""
    if runs.empty:
        return pd.DataFrame(columns=CELL_COLUMNS)
    evals = runs[_column(runs, f"tags.{TAG_STAGE}") == STAGE_EVALUATE]
    if evals.empty:
        return pd.DataFrame(columns=CELL_COLUMNS)
    final_error = _column(evals, "metrics.final_test_error").astype(float)
    table = pd.DataFrame({
        "key": evals[f"tags.{TAG_KEY}"],
        "group": evals[f"tags.{TAG_GROUP}"],
        "label": evals[f"tags.{TAG_LABEL}"],
        "status": evals["status"],
        "test_accuracy_pct": (1 - final_error) * 100,
        "test_error_pct": final_error * 100,
        "min_test_error_pct": _column(evals, "metrics.final_min_test_error").astype(float) * 100,
        "params_m": _column(evals, "metrics.params_m").astype(float),
    })
    return table.sort_values("key").reset_index(drop=True)


def format_cells_markdown(cells: pd.DataFrame) -> str:
    lines = ["| cell | status | test accuracy (%) | final test error (%) | min test error (%) | params (M) |",
             "|" + "---|" * 6]
    for row in cells.itertuples(index=False):
        lines.append(f"| {row.key} | {row.status} | {_fmt(row.test_accuracy_pct, 2)} | {_fmt(row.test_error_pct, 2)} | "
                     f"{_fmt(row.min_test_error_pct, 2)} | {_fmt(row.params_m, 3)} |")
    return "\n".join(lines) + "\n"


def format_markdown(table: pd.DataFrame) -> str:
    header = ("| row | search method | cells (finished) | test error (%) | best (%) | params (M) | "
              "multiply-adds (M) | search cost (GPU-days) | search wall time (h) |")
    lines = [header, "|" + "---|" * 9]
    for row in table.itertuples(index=False):
        error = (f"{row.test_error_mean_pct:.2f} ± {row.test_error_std_pct:.2f}"
                 if pd.notna(row.test_error_mean_pct) else "-")
        lines.append(f"| {row.row} | {row.search_method} | {row.cells} ({row.finished}) | {error} | "
                     f"{_fmt(row.test_error_best_pct, 2)} | {_fmt(row.params_m, 3)} | {_fmt(row.madds_m, 1)} | "
                     f"{_fmt(row.search_cost_gpu_days, 4)} | {_fmt(row.search_wall_h, 3)} |")
    return "\n".join(lines) + "\n"


def _fmt(value, digits: int) -> str:
    return "-" if value is None or pd.isna(value) else f"{value:.{digits}f}"


def write_tables(table: pd.DataFrame, cells: pd.DataFrame, folder: Path) -> list[Path]:
    """results.md (both tables), results.parquet (the summary) and cells.parquet (every cell)."""
    folder.mkdir(parents=True, exist_ok=True)
    markdown_path = folder / "results.md"
    markdown_path.write_text(format_markdown(table) + "\n" + format_cells_markdown(cells))
    table.to_parquet(folder / "results.parquet", index=False)
    cells.to_parquet(folder / "cells.parquet", index=False)
    return [markdown_path, folder / "results.parquet", folder / "cells.parquet"]
