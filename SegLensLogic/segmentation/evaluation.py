"""Evaluating a segmenter on a labelled cohort: one row of scores per case, their mean, Markdown and CSV."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..data.cases import read_case
from ..data.cohort import Cohort
from ..storage import atomic_write_text
from ..errors import SegLensError
from .inference import predict_volume
from .scores import segmentation_scores
from ..networks.segmenter import Segmenter


def evaluate_cohort(
    model: Segmenter, cohort: Cohort, batch_size: int | None = None, log: Callable[[str], None] | None = None
) -> list[dict]:
    """Segment every labelled case of ``cohort`` and score it.

    Returns:
        One dict per case (``case`` plus the columns of :func:`~SegLensLogic.segmentation.scores.segmentation_scores`),
        followed by a ``mean`` row.
    """
    rows = []
    for case in cohort:
        if case.label is None:
            if log:
                log(f"  {case.case_id}: no label map, skipped")
            continue
        images = read_case(case, modalities=model.config.modalities, allow_missing=model.config.accepts_missing_modalities)
        prediction = predict_volume(model, images, batch_size=batch_size)
        scores = segmentation_scores(prediction.labels, images.label, model.config.class_names)
        rows.append({"case": case.case_id, **scores})
        if log:
            log(f"  {case.case_id}: mean Dice {scores['dice_mean']:.3f}")
    if not rows:
        raise SegLensError(f"cohort '{cohort.name}' has no labelled case to evaluate")
    columns = [k for k in rows[0] if k != "case"]
    rows.append({"case": "mean", **{k: float(np.mean([r[k] for r in rows])) for k in columns}})
    return rows


def format_table(rows: list[dict], digits: int = 3) -> str:
    """Rows of scores as a Markdown table."""
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = [f"{row[c]:.{digits}f}" if isinstance(row[c], float) else str(row[c]) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(rows: list[dict], path: str | Path, overwrite: bool = False) -> Path:
    """Rows of scores as CSV, written atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buffer.getvalue(), overwrite=overwrite)
