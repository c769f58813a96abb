"""Rows of the latent table: filtering by category and population status, sorting by any column.

A row is a dict as ``SteeringSession.latent_table`` returns it: ``id``, ``label``, ``category``, ``status``
(``shared`` / ``specific`` / None without alignments), ``slice_activation``, ``volume_activation``.
"""

from __future__ import annotations

ALL = "all"
COLUMNS = ("id", "label", "category", "status", "slice_activation", "volume_activation")
HEADERS = ("Latent", "Label", "Category", "Status", "Slice", "Volume")


def choices(rows: list[dict], key: str) -> list[str]:
    """``["all", ...]`` plus the distinct non-empty values of ``key`` (for a filter combo box), sorted."""
    return [ALL] + sorted({str(row[key]) for row in rows if row.get(key) not in (None, "")})


def filter_rows(rows: list[dict], category: str = ALL, status: str = ALL) -> list[dict]:
    """Rows whose category and status match (``"all"`` matches everything)."""
    return [
        row
        for row in rows
        if (category == ALL or str(row.get("category")) == category) and (status == ALL or str(row.get("status")) == status)
    ]


def sort_rows(rows: list[dict], column: str = "slice_activation", descending: bool = True) -> list[dict]:
    """Rows sorted by ``column``; missing values sort last in either direction."""
    if column not in COLUMNS:
        raise ValueError(f"unknown column '{column}'; columns: {', '.join(COLUMNS)}")
    present = [row for row in rows if row.get(column) is not None]
    absent = [row for row in rows if row.get(column) is None]
    numeric = column in ("id", "slice_activation", "volume_activation")
    present.sort(key=lambda row: row[column] if numeric else str(row[column]).lower(), reverse=descending)
    return present + absent


def cell_text(row: dict, column: str) -> str:
    value = row.get(column)
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)
