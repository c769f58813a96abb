"""Experiment outputs: tables as Markdown and CSV, figures as PNG (matplotlib, Agg backend), all written
atomically and never over an existing file unless ``overwrite``.

A *method table* has one row per method (base model, baselines, oracle and calibrated steering) with the
mean of each metric over the same cases and its change from the base model (``delta_<metric>``), as the
paper's tables 3-5 do. Scores are fractions in [0, 1] (Dice, precision, recall), shown with 3 decimals.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..data.io import atomic_write_bytes, atomic_write_text
from .calibration import summarise


def _cell(value, digits: int) -> str:
    if isinstance(value, float | np.floating):
        return "nan" if value != value else f"{value:.{digits}f}"
    if isinstance(value, tuple):
        return " ".join(_cell(v, digits) if not isinstance(v, float) else f"{v:g}" for v in value)
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    return str(value)


def columns_of(rows: Sequence[dict]) -> list[str]:
    """Union of the rows' keys in first-seen order (nested dicts left out)."""
    columns: list[str] = []
    for row in rows:
        for key, value in row.items():
            if key not in columns and not isinstance(value, dict):
                columns.append(key)
    return columns


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None, digits: int = 3) -> str:
    """Rows as a Markdown table; floats with ``digits`` decimals, tuples (settings) space-separated."""
    columns = list(columns or columns_of(rows))
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c, ""), digits) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def csv_text(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    columns = list(columns or columns_of(rows))
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row.get(c, ""), 6) if isinstance(row.get(c), tuple | list) else row.get(c, "") for c in columns])
    return buffer.getvalue()


def write_table(rows: Sequence[dict], out_dir: str | Path, name: str, title: str = "", overwrite: bool = False,
                columns: Sequence[str] | None = None) -> tuple[Path, Path]:  # fmt: skip
    """Write ``<name>.md`` (with ``title`` as a heading) and ``<name>.csv`` in ``out_dir``."""
    out_dir = Path(out_dir)
    heading = f"### {title}\n\n" if title else ""
    md = atomic_write_text(out_dir / f"{name}.md", heading + markdown_table(rows, columns), overwrite=overwrite)
    cs = atomic_write_text(out_dir / f"{name}.csv", csv_text(rows, columns), overwrite=overwrite)
    return md, cs


def method_row(method: str, rows: Sequence[dict], metrics: Sequence[str], margin: float = 0.01, primary: str = "dice_mean") -> dict:
    """One row of a method table from per-case rows (as :func:`~SegLensLogic.experiments.calibration.oracle`
    returns them): mean of every metric at the chosen settings, its change from the base model, and the fraction
    of cases whose ``primary`` score rose by ``margin`` or more."""
    out = {"method": method, "cases": len(rows)}
    for metric in metrics:
        values = [r["scores"][metric] for r in rows]
        out[metric] = float(np.mean(values)) if values else float("nan")
    for metric in metrics:
        base = [r["base_scores"][metric] for r in rows] if rows and "base_scores" in rows[0] else None
        if base is not None:
            out[f"delta_{metric}"] = out[metric] - float(np.mean(base))
    summary = summarise([{**r, "base": r["base_scores"][primary], "score": r["scores"][primary]} for r in rows], margin) if rows and "base_scores" in rows[0] else None
    if summary is not None:
        out["recovered"] = summary["recovered"]
    return out


# -- figures --------------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, overwrite: bool = False) -> Path:
    """Render ``fig`` to PNG in memory, then write it atomically."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    return atomic_write_bytes(path, buffer.getvalue(), overwrite=overwrite)


def plot_recovery(per_alpha: Sequence[dict], path: str | Path, metric: str = "dice_mean", title: str = "", overwrite: bool = False,
                  oracle_score: float | None = None, calibrated_score: float | None = None) -> Path:  # fmt: skip
    """Figure 6: mean ``metric`` of the failure cases against alpha (line) and the fraction recovered (bars)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    alphas = [r["setting"] for r in per_alpha]
    positions = np.arange(len(alphas))
    twin = ax.twinx()
    twin.bar(positions, [r["recovered"] for r in per_alpha], color="#9ecae1", alpha=0.6, label="fraction recovered")
    twin.set_ylim(0, 1)
    twin.set_ylabel("fraction of failures recovered")
    ax.plot(positions, [r[f"mean_{metric}"] for r in per_alpha], "o-", color="#08519c", label=f"mean {metric} (same alpha for all)")
    base = per_alpha[0][f"mean_{metric}"] - per_alpha[0]["delta"]
    ax.axhline(base, color="grey", ls=":", label="base model")
    if oracle_score is not None:
        ax.axhline(oracle_score, color="#d62728", ls="--", label="oracle (best alpha per case)")
    if calibrated_score is not None:
        ax.axhline(calibrated_score, color="#2ca02c", ls="-.", label="calibrated (alpha from other fold)")
    ax.set_zorder(twin.get_zorder() + 1)
    ax.patch.set_visible(False)
    ax.set_xticks(positions, [f"{a:g}" for a in alphas])
    ax.set_xlabel("alpha (scale of the most active latents)")
    ax.set_ylabel(f"mean {metric}")
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title(title or "Failure recovery by latent scaling", fontsize=10)
    return save_figure(fig, path, overwrite)


def plot_mode_effects(rows: Sequence[dict], path: str | Path, metric: str = "dice_ED", title: str = "", overwrite: bool = False) -> Path:
    """Figure 7: mean change of ``metric`` per error mode (groups) and intervention setting (bars)."""
    plt = _pyplot()
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    settings = [s for s in dict.fromkeys(r["setting"] for r in rows) if s[0] != "none"]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    width = 0.8 / max(len(settings), 1)
    cmap = plt.get_cmap("tab10")
    for i, setting in enumerate(settings):
        values = [next((r["delta"] for r in rows if r["mode"] == m and r["setting"] == setting), np.nan) for m in modes]
        ax.bar(np.arange(len(modes)) + (i - (len(settings) - 1) / 2) * width, values, width, color=cmap(i), label=f"{setting[0]} {setting[1]:g}")
    counts = {r["mode"]: r["cases"] for r in rows}
    ax.set_xticks(np.arange(len(modes)), [f"{m}\n(n={counts[m]})" for m in modes])
    ax.axhline(0, color="black", lw=0.8)
    ax.set_ylabel(f"mean change of {metric}")
    ax.legend(fontsize=7)
    ax.set_title(title or "Class-specific latent steering per error mode", fontsize=10)
    return save_figure(fig, path, overwrite)


def plot_curves(panels: dict[str, dict[str, tuple[Sequence[float], Sequence[float]]]], path: str | Path, xlabel: str, ylabel: str,
                title: str = "", overwrite: bool = False, xscale: str = "linear") -> Path:  # fmt: skip
    """Side-by-side panels of curves: ``{panel: {curve: (x, y)}}`` (figures 5 and 8), shared y axis."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), sharey=True, squeeze=False)
    for ax, (panel, curves) in zip(axes[0], panels.items()):
        for name, (x, y) in curves.items():
            ax.plot(x, y, "o-", ms=3, label=name)
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_xscale(xscale)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel(ylabel)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path, overwrite)


class Report:
    """An experiment's outputs: named tables and figures, written together into one folder with a README.md
    that holds every table (Markdown) and the notes saying how the numbers were obtained."""

    def __init__(self, name: str, title: str):
        self.name, self.title = name, title
        self.tables: dict[str, tuple[str, list[dict], list[str] | None]] = {}
        self.figures: dict[str, object] = {}
        self.notes: list[str] = []

    def table(self, name: str, title: str, rows: list[dict], columns: list[str] | None = None) -> None:
        self.tables[name] = (title, rows, columns)

    def figure(self, name: str, draw) -> None:
        """``draw(path, overwrite) -> Path`` renders the figure ``<name>.png``."""
        self.figures[name] = draw

    def write(self, out_dir: str | Path, overwrite: bool = False) -> list[Path]:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        body = [f"# {self.title}\n"] + [f"- {note}" for note in self.notes] + [""]
        for name, (title, rows, columns) in self.tables.items():
            if not rows:
                body.append(f"### {title}\n\n(no rows)\n")
                continue
            written += write_table(rows, out_dir, name, title, overwrite, columns)
            body.append(f"### {title}\n\n" + markdown_table(rows, columns))
        for name, draw in self.figures.items():
            path = draw(out_dir / f"{name}.png", overwrite)
            written.append(path)
            body.append(f"![{name}]({name}.png)\n")
        written.append(atomic_write_text(out_dir / "README.md", "\n".join(body), overwrite=overwrite))
        return written
