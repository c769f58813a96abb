"""Rows of the latent table: filtering by category and population status, sorting by any column.

A row is a dict as ``SteeringSession.latent_table`` returns it: ``id``, ``label``, ``category``, ``holds`` (share of
the heatmap inside the labelled class on held-out cases, shown as a percentage; empty where unmeasured),
``replicates`` (whether an SAE trained from another seed finds the latent again: "yes" or "no"; with ``replicas``
above 1, how many of the compared seeds find it: "3 of 5"; empty where not compared), ``status``
(``universal`` / ``shared`` / ``specific``, None without alignments), ``shared_with`` (the partner populations a
shared latent matches, from the bundle's alignment files), ``slice_activation``, ``volume_activation``.
"""

from __future__ import annotations

ALL = "all"
COLUMNS = ("id", "label", "category", "holds", "replicates", "status", "shared_with", "slice_activation", "volume_activation")
HEADERS = ("Latent", "Label", "Category", "Holds %", "Other seed", "Status", "Shared with", "Slice", "Volume")
NUMERIC = ("id", "holds", "slice_activation", "volume_activation")


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
    numeric = column in NUMERIC
    present.sort(key=lambda row: row[column] if numeric else cell_text(row, column).lower(), reverse=descending)
    return present + absent


def display_value(row: dict, column: str):
    """What a numeric cell shows and sorts by: the value, ``holds`` as a whole percentage."""
    value = row.get(column)
    return None if value is None else round(100 * value) if column == "holds" else value


def cell_text(row: dict, column: str) -> str:
    value = row.get(column)
    if value is None:
        return ""
    if column == "holds":
        return f"{display_value(row, column)}"
    if column == "replicates":
        compared = row.get("replicas") or 1
        return ("yes" if value else "no") if compared == 1 else f"{int(value)} of {compared}"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)
