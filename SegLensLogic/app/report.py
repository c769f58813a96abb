"""The HTML audit report: one self-contained file a researcher opens in a browser.

:func:`render_report` takes plain result structures (dicts, lists, numbers, numpy arrays) and writes one HTML file
with every figure embedded as a base64 PNG: no scripts, no style sheets or fonts from elsewhere, no network request.
Each section is drawn only from its own inputs; a section whose inputs are absent is replaced by a note saying so.

``results`` keys (all optional except ``title``; numbers are fractions in ``[0, 1]`` unless said otherwise)::

    title: str; subtitle: str; notes: [str]
    cohorts: [{"name", "population", "n_cases", "source", "shifted_factors": {factor: {...}} | [factor]}]
    models: [{"name", "cohort", "arch", "dice": {cohort name: mean Dice}}]
    sae_quality: [{"model", "d_sae", "k", "explained_variance", "l0", "dead_fraction", "dice_recovered",
                   "seed", "seed_floor", "resampling_floor" (optional)}]
    latent_galleries: [{"model", "categories": {category: [{"id", "description", "image": PNG | array,
                        "heatmap": array (optional, over "image"), "confidence"}]}}]
    shared_matrix: {"names": [model names], "shared_fraction": n x n, "seed_noise_floor": float | [float per row] | None,
                    "floors": [{"name", "method", "seed_floor", "resampling_floor"}] (optional),
                    "description": str (optional: replaces the standard text above the matrix)}
    diffing: [{"reference", "population", "feature", "method", "n_live", "n_feature", "n_specific", "precision",
               "chance_precision", "chance_precision_95", "recall", "n_shared", "shared_on_feature",
               "reproducible_n_specific", "reproducible_precision", "reproducible_recall", "seed_floor", "used"}]
             # planted-feature rows (SegLensLogic.experiments.footprint); rows with "expected_categories" instead are
             # scored by category (planted_shift_scores) and shown as such
    failure_recovery: [{"population", "case", "dice_before", "dice_oracle", "dice_calibrated", ...}]
    adaptation: [{"population", "method", "dice_before", "dice_oracle", "dice_calibrated", ...}]
    steered_cases: [{"case_id", "image": 2D array, "before": 2D labels, "after": 2D labels, "truth": 2D labels
                     (optional), "dice_before", "dice_after", "recipe": str, "colours": [[r, g, b], ...]}]

Images: a ``numpy`` array (2D, drawn in grey), PNG ``bytes``, or a path to a PNG file.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputFileError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DEFAULT_COLOURS = [[0, 0, 0], [255, 0, 0], [0, 200, 0], [255, 220, 0]]

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1180px;
       color: #1d2330; line-height: 1.45; padding: 0 1em; }
h1 { margin-bottom: 0.1em; } h2 { border-bottom: 2px solid #d8dde6; padding-bottom: 0.2em; margin-top: 2em; }
.subtitle { color: #5a6475; margin-top: 0; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #d8dde6; padding: 0.3em 0.6em; text-align: right; }
th { background: #f1f4f8; } td.text, th.text { text-align: left; }
.note { background: #fff8e5; border-left: 4px solid #f0b400; padding: 0.5em 0.8em; color: #5a4a00; }
.gallery { display: flex; flex-wrap: wrap; gap: 0.8em; }
.categories { display: flex; flex-wrap: wrap; gap: 0 2em; } .categories h4 { margin: 0.6em 0 0.4em; }
figure { margin: 0; width: 170px; font-size: 0.82em; }
figure img { width: 170px; height: auto; image-rendering: pixelated; border: 1px solid #d8dde6; }
.wide img { width: auto; max-width: 100%; }
.good { color: #11703a; } .bad { color: #a4161a; }
nav a { margin-right: 1em; }
"""


# -- images -----------------------------------------------------------------------------------------------------------
def _figure_png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=fig.dpi, bbox_inches="tight", pad_inches=0.02)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buffer.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def array_png(image: np.ndarray, heatmap: np.ndarray | None = None, size_px: int = 170) -> bytes:
    """A 2D image (grey, robustly windowed) with an optional heatmap (hot, transparent where 0) as PNG bytes."""
    plt = _pyplot()
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2:
        raise ValueError(f"report images are 2D slices, got shape {image.shape}")
    fig = plt.figure(figsize=(size_px / 100, size_px / 100 * image.shape[0] / max(image.shape[1], 1)), dpi=100)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.axis("off")
    lo, hi = (np.percentile(image[image != 0], [1, 99.5]) if (image != 0).any() else (0.0, 1.0))
    ax.imshow(image, cmap="gray", vmin=lo, vmax=max(hi, lo + 1e-6), interpolation="nearest")
    if heatmap is not None:
        heat = np.ma.masked_less_equal(np.asarray(heatmap, dtype=np.float32), 0)
        if heat.count():
            ax.imshow(heat, cmap="hot", alpha=0.6, interpolation="nearest")
    return _figure_png(fig)


def overlay_png(image: np.ndarray, labels: np.ndarray, colours: Sequence[Sequence[int]] = DEFAULT_COLOURS, size_px: int = 220) -> bytes:
    """A 2D image in grey with a label map in colour (``colours[k]`` RGB 0-255 for class ``k``; 0 transparent)."""
    plt = _pyplot()
    image = np.asarray(image, dtype=np.float32)
    labels = np.asarray(labels)
    if labels.shape != image.shape:
        raise ValueError(f"labels {labels.shape} and image {image.shape} differ in shape")
    fig = plt.figure(figsize=(size_px / 100, size_px / 100 * image.shape[0] / max(image.shape[1], 1)), dpi=100)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.axis("off")
    lo, hi = (np.percentile(image[image != 0], [1, 99.5]) if (image != 0).any() else (0.0, 1.0))
    ax.imshow(image, cmap="gray", vmin=lo, vmax=max(hi, lo + 1e-6), interpolation="nearest")
    rgba = np.zeros(labels.shape + (4,), dtype=np.float32)
    for index in range(1, len(colours)):
        rgba[labels == index, :3] = np.asarray(colours[index], dtype=np.float32) / 255
        rgba[labels == index, 3] = 0.55
    ax.imshow(rgba, interpolation="nearest")
    return _figure_png(fig)


def matrix_png(matrix: np.ndarray, names: Sequence[str], floor: float | Sequence[float | None] | None) -> bytes:
    """The shared-latent matrix as an annotated heatmap; cells at or below the seed noise floor (one for all rows, or
    one per row) are hatched."""
    plt = _pyplot()
    matrix = np.asarray(matrix, dtype=np.float64)
    n = len(names)
    row_floors = list(floor) if isinstance(floor, (list, tuple, np.ndarray)) else [floor] * n
    if len(row_floors) != n:
        raise ValueError(f"{len(row_floors)} floors for a {n} x {n} matrix")
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * n, 0.9 + 0.8 * n), dpi=100)
    shown = ax.imshow(matrix, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(n), names, rotation=30, ha="right")
    ax.set_yticks(range(n), names)
    for i in range(n):
        for j in range(n):
            value = matrix[i, j]
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black", fontsize=9)
            if row_floors[i] is not None and i != j and value <= row_floors[i]:
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="//", edgecolor="red", linewidth=0))
    fig.colorbar(shown, ax=ax, fraction=0.046, label="fraction of latents shared")
    return _figure_png(fig)


def _png_bytes(image: Any, heatmap: Any = None) -> bytes:
    if isinstance(image, (bytes, bytearray)):
        data = bytes(image)
        if not data.startswith(PNG_MAGIC):
            raise ValueError("image bytes are not a PNG")
        return data
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise InputFileError(path, "report image not found")
        data = path.read_bytes()
        if not data.startswith(PNG_MAGIC):
            raise InputFileError(path, "is not a PNG image")
        return data
    return array_png(np.asarray(image), heatmap)


def _img(png: bytes, alt: str, css_class: str = "") -> str:
    encoded = base64.b64encode(png).decode("ascii")
    cls = f' class="{css_class}"' if css_class else ""
    return f'<img{cls} alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'


# -- text and tables --------------------------------------------------------------------------------------------------
def _e(value: Any) -> str:
    return html.escape(str(value))


def _fmt(value: Any) -> str:
    if value is None:
        return "&ndash;"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return "&ndash;" if not np.isfinite(value) else f"{float(value):.3f}"
    if isinstance(value, (list, tuple)):
        return _e(", ".join(str(v) for v in value))
    return _e(value)


def _plain(value: Any) -> str:
    """A number as plain text (3 decimals), "-" for None."""
    return "-" if value is None or (isinstance(value, float) and not np.isfinite(value)) else f"{float(value):.3f}"


def _table(rows: Iterable[dict], columns: Sequence[tuple[str, str]]) -> str:
    """An HTML table of ``rows`` with ``columns`` = (key, header); text columns align left."""
    rows = list(rows)
    head = "".join(
        f'<th class="text">{_e(title)}</th>' if _is_text(rows, key) else f"<th>{_e(title)}</th>" for key, title in columns
    )
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="text">{_fmt(row.get(key))}</td>' if _is_text(rows, key) else f"<td>{_fmt(row.get(key))}</td>"
            for key, _ in columns
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _is_text(rows: list[dict], key: str) -> bool:
    return any(isinstance(row.get(key), (str, list, tuple)) for row in rows)


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


# -- scoring ----------------------------------------------------------------------------------------------------------
def planted_shift_scores(specific: Iterable[int], category_of: dict[int, str | None], expected_categories: Iterable[str]) -> dict:
    """Score a diffing against the planted shift of a synthetic cohort.

    Args:
        specific: latents of the shifted population's SAE that the alignment calls population-specific.
        category_of: latent -> interpretation category (every latent of that SAE; ``dead`` ones are ignored).
        expected_categories: categories tied to the factors the cohort shifted
            (:func:`SegLensLogic.data.phantoms.planted_shift_categories`).

    Returns:
        ``{"n_specific", "n_expected", "n_hits", "precision", "recall"}``: precision is the share of specific latents
        whose category is tied to a shifted factor; recall is the share of latents in those categories that are
        specific. None where the denominator is 0.
    """
    expected = set(expected_categories)
    alive = {j for j, c in category_of.items() if c not in (None, "dead")}
    specific = {int(j) for j in specific} & alive
    tied = {j for j in alive if category_of[j] in expected}
    hits = specific & tied
    return {
        "n_specific": len(specific),
        "n_expected": len(tied),
        "n_hits": len(hits),
        "precision": len(hits) / len(specific) if specific else None,
        "recall": len(hits) / len(tied) if tied else None,
    }


# -- sections ---------------------------------------------------------------------------------------------------------
def _section_cohorts(results: dict) -> str | None:
    cohorts, models = results.get("cohorts"), results.get("models")
    if not cohorts and not models:
        return None
    parts = []
    if cohorts:
        rows = []
        for cohort in cohorts:
            factors = cohort.get("shifted_factors") or []
            rows.append({**cohort, "shifted_factors": list(factors) or "none (reference)"})
        parts.append(_table(rows, [("name", "cohort"), ("population", "population"), ("source", "source"),
                                   ("n_cases", "cases"), ("shifted_factors", "factors shifted vs adult")]))  # fmt: skip
    if models:
        cohort_names = sorted({name for model in models for name in (model.get("dice") or {})})
        rows = [{"name": m.get("name"), "cohort": m.get("cohort"), "arch": m.get("arch"),
                 **{f"dice:{c}": (m.get("dice") or {}).get(c) for c in cohort_names}} for m in models]  # fmt: skip
        columns = [("name", "model"), ("cohort", "trained on"), ("arch", "architecture")]
        columns += [(f"dice:{c}", f"Dice on {c}") for c in cohort_names]
        parts.append("<p>Mean Dice over the tumour (or structure) classes, per evaluation cohort.</p>" + _table(rows, columns))
    else:
        parts.append(_note("No model evaluations were given."))
    return "".join(parts)


def _section_sae(results: dict) -> str | None:
    rows = results.get("sae_quality")
    if not rows:
        return None
    columns = [("model", "model"), ("d_sae", "latents"), ("k", "k")]
    columns += [("seed", "seed")] if any("seed" in r for r in rows) else []
    columns += [("explained_variance", "explained variance"), ("l0", "L0"), ("dead_fraction", "dead fraction"), ("dice_recovered", "Dice recovered")]
    floors = any(r.get("seed_floor") is not None for r in rows)
    if floors:
        columns += [("seed_floor", "seed floor"), ("resampling_floor", "resampling floor")]
    return (
        "<p>Explained variance and L0 on held-out activations; dead: latents that never fire on the cohort's activations; Dice "
        "recovered: Dice with SAE reconstructions spliced in at the hook over the model's own Dice."
        + (" Seed floor: the share of the SAE's live latents that another seed on the same activations finds again; resampling "
           "floor: that the same seed on resampled activations finds again (the diffing rule's)." if floors else "")
        + "</p>" + _table(rows, columns)
    )


def _section_galleries(results: dict) -> str | None:
    galleries = results.get("latent_galleries")
    if not galleries:
        return None
    parts = []
    for gallery in galleries:
        parts.append(f"<h3>{_e(gallery.get('model', 'SAE'))}</h3>")
        categories = gallery.get("categories") or {}
        if not categories:
            parts.append(_note("No labelled latents for this SAE."))
        blocks = []
        for category, latents in categories.items():
            figures = []
            for latent in latents:
                caption = f"latent {latent.get('id')}"
                if latent.get("confidence") is not None:
                    caption += f" ({latent['confidence']:.2f})"
                if latent.get("description"):
                    caption += f": {latent['description']}"
                image = latent.get("image")
                img = _img(_png_bytes(image, latent.get("heatmap")), caption) if image is not None else ""
                figures.append(f"<figure>{img}<figcaption>{_e(caption)}</figcaption></figure>")
            blocks.append(f"<div><h4>{_e(category)} ({len(latents)})</h4><div class='gallery'>{''.join(figures)}</div></div>")
        parts.append(f"<div class='categories'>{''.join(blocks)}</div>")  # categories side by side, wrapping
    return "".join(parts)


def _section_shared(results: dict) -> str | None:
    shared = results.get("shared_matrix")
    if not shared or shared.get("shared_fraction") is None:
        return None
    names = list(shared["names"])
    matrix = np.asarray(shared["shared_fraction"], dtype=np.float64)
    if matrix.shape != (len(names), len(names)):
        raise ValueError(f"shared_fraction is {matrix.shape} for {len(names)} names")
    floor = shared.get("seed_noise_floor")
    if isinstance(floor, (list, tuple)):
        text = shared.get("description") or ("Fraction of latents of the row SAE with a partner in the column SAE; hatched cells are "
                                             "at or below the row's seed noise floor.")  # fmt: skip
    else:
        text = shared["description"] if shared.get("description") else (
            f"Fraction of latents of the row SAE with a partner in the column SAE. Seed noise floor: {floor:.3f} "
            "(the same fraction between two SAEs trained on the same activations with different seeds); hatched cells "
            "are at or below it."
            if floor is not None
            else "Fraction of latents of the row SAE with a partner in the column SAE. No seed noise floor was measured, so "
            "differences cannot be told apart from seed noise."
        )
    floors = shared.get("floors")
    table = ("<p>Floors: the share of each SAE's live latents found again by another seed on the same activations (seed floor) "
             "and by the same seed on resampled activations (resampling floor), by each rule.</p>"
             + _table(floors, [("name", "SAE"), ("method", "rule"), ("seed_floor", "seed floor"), ("resampling_floor", "resampling floor")])
             if floors else "")  # fmt: skip
    return f"<p>{_e(text)}</p><div class='wide'>{_img(matrix_png(matrix, names, floor), 'shared-latent matrix')}</div>{table}"


def _section_diffing(results: dict) -> str | None:
    rows = results.get("diffing")
    if not rows:
        return None
    footprint = [r for r in rows if "n_feature" in r]
    category = [r for r in rows if "n_feature" not in r]
    parts = []
    if footprint:
        shown = [{**r, "method": r.get("method", "") + (" (used)" if r.get("used") else ""),
                  "chance": f"{_plain(r.get('chance_precision'))} (95th pct {_plain(r.get('chance_precision_95'))})",
                  "feature_share": f"{r.get('n_feature')} of {r.get('n_live')}",
                  "shared_feature": f"{r.get('shared_on_feature')} of {r.get('n_shared')}"} for r in footprint]  # fmt: skip
        parts.append(
            "<p>Each shifted population with a planted feature differs from the reference by that feature alone, and its "
            "footprint is known voxel by voxel. A latent of the population's SAE is a feature latent when at least half of its "
            "activation mass on its top slices (at image resolution) lies on the footprint. Precision: the share of the "
            "latents the diffing calls specific that are feature latents; recall: the share of feature latents called "
            "specific; chance: the precision of as many latents drawn at random among the live ones (its expectation, and the "
            "95th percentile of the draw); shared on the feature: feature latents among those called shared (the converse, "
            "near 0 when diffing works). Reproducible: the same, keeping only latents that another seed of the population "
            "finds again (a latent seed noise made is not a finding about the population).</p>"
            + _table(shown, [("population", "population"), ("feature", "planted feature"), ("method", "diffing rule"),
                             ("feature_share", "feature latents / live"), ("best_fraction", "best latent's share on the footprint"),
                             ("n_specific", "specific latents"),
                             ("precision", "precision"), ("chance", "precision of chance"), ("recall", "recall"),
                             ("shared_feature", "shared latents on the feature"), ("reproducible_n_specific", "reproducible specific"),
                             ("reproducible_precision", "reproducible precision"), ("reproducible_recall", "reproducible recall"),
                             ("seed_floor", "seed floor")])  # fmt: skip
        )
    if category:
        parts.append(
            "<p>Population-specific latents of each shifted cohort's SAE, scored against the factors planted in the "
            "synthetic cohort: precision is the share of specific latents whose category is tied to a shifted factor, "
            "recall the share of latents in those categories that came out specific. The precision of chance is the share "
            "of all live latents in those categories: what a random choice of latents would score.</p>"
            + _table(category, [("reference", "reference"), ("population", "population"), ("shifted_factors", "shifted factors"),
                                ("expected_categories", "expected categories"), ("n_specific", "specific latents"),
                                ("precision", "precision"), ("chance_precision", "precision of chance"), ("recall", "recall")])  # fmt: skip
        )
    return "".join(parts)


def _dice_table(rows: list[dict], first: Sequence[tuple[str, str]]) -> str:
    columns = list(first) + [("dice_before", "Dice before"), ("dice_oracle", "Dice oracle"), ("dice_calibrated", "Dice calibrated")]
    extra = [key for key in rows[0] if key not in {c for c, _ in columns}]
    return _table(rows, columns + [(key, key.replace("_", " ")) for key in extra])


def _section_failures(results: dict) -> str | None:
    rows = results.get("failure_recovery")
    if not rows:
        return None
    return (
        "<p>Failed cases corrected by steering: <em>oracle</em> picks the edit with the ground truth (an upper bound), "
        "<em>calibrated</em> uses only settings chosen on held-out calibration cases.</p>"
        + _dice_table(rows, [("population", "population"), ("case", "case")])
    )


def _section_adaptation(results: dict) -> str | None:
    rows = results.get("adaptation")
    if not rows:
        return None
    return "<p>Population adaptation by latent steering, with oracle and calibrated settings.</p>" + _dice_table(
        rows, [("population", "population"), ("method", "method")]
    )


def _section_steered(results: dict) -> str | None:
    cases = results.get("steered_cases")
    if not cases:
        return None
    parts = []
    for case in cases:
        colours = case.get("colours") or DEFAULT_COLOURS
        panels = [("image", None), ("before", case.get("dice_before")), ("after", case.get("dice_after"))]
        if case.get("truth") is not None:
            panels.append(("truth", None))
        figures = []
        for key, dice in panels:
            png = array_png(case["image"], size_px=220) if key == "image" else overlay_png(case["image"], case[key], colours)
            caption = {"image": "image", "before": "before steering", "after": "after steering", "truth": "ground truth"}[key]
            if dice is not None:
                caption += f" (Dice {dice:.3f})"
            figures.append(f"<figure style='width:220px'>{_img(png, caption)}<figcaption>{_e(caption)}</figcaption></figure>")
        recipe = f"<p>Recipe: <code>{_e(case['recipe'])}</code></p>" if case.get("recipe") else ""
        parts.append(f"<h3>{_e(case.get('case_id', 'case'))}</h3>{recipe}<div class='gallery'>{''.join(figures)}</div>")
    return "".join(parts)


def _section_reference(results: dict) -> str | None:
    real = results.get("reference_case")
    if not real:
        return None
    if real.get("skipped"):
        return _note("Skipped: " + real["skipped"] + ".")
    dice = "" if real.get("dice_before") is None else f" Mean Dice {real['dice_before']:.3f} before, {real['dice_after']:.3f} after."
    intro = (f"<p>The shipped reference bundle on <strong>{_e(real['case_id'])}</strong> ({_e(real['shift'])} of a real case). "
             f"Suggested correction ({_e(real['method'])}, no label of the case read): {_e(real['suggestion'])}; "
             f"{real['voxels_changed']} voxels changed.{_e(dice)} Recipe <code>{_e(real['recipe'])}</code>, replayed "
             f"{'identically' if real['replay_identical'] else 'differently'}.</p>")  # fmt: skip
    top = "<table><tr><th>latent</th><th>label</th><th>category</th><th>population status</th><th>shared with</th><th>activation</th></tr>" + "".join(
        f"<tr><td>{r['id']}</td><td>{_e(r['label'] or '')}</td><td>{_e(r['category'] or '')}</td><td>{_e(r['status'] or '')}</td>"
        f"<td>{_e(r['shared_with'])}</td><td>{r['activation']}</td></tr>" for r in real["top_latents"]) + "</table>"
    colours = real.get("colours") or DEFAULT_COLOURS
    figures = []
    for key, caption in (("image", "FLAIR"), ("before", "before"), ("after", "after"), ("truth", "ground truth")):
        png = array_png(real["image"], size_px=220) if key == "image" else overlay_png(real["image"], real[key], colours)
        figures.append(f"<figure style='width:220px'>{_img(png, caption)}<figcaption>{_e(caption)}</figcaption></figure>")
    repair = real.get("repair") or {}
    arms = ""
    if repair:
        arms = ("<p>The bundle's own measurement of steering on real failure cases (its model card; oracle rows read the "
                "ground truth, calibrated and ground-truth-free rows do not):</p><table><tr><th>arm</th><th>cases</th>"
                "<th>recovered</th><th>mean Dice change [95 % CI]</th></tr>"
                + "".join(f"<tr><td>{_e(arm)}</td><td>{r['cases']}</td><td>{r['recovered']:.2f}</td><td>{_e(r['dice_mean'])}</td></tr>"
                          for arm, r in repair.items()) + "</table>")  # fmt: skip
    return intro + "<h3>Most active latents</h3>" + top + f"<div class='gallery'>{''.join(figures)}</div>" + arms + _hints_table(real.get("hints") or {})


def _hints_table(hints: dict) -> str:
    """The bundle's hint benchmark (``figures["hints"]``): the latent fix at each click count against its controls."""
    rows = sorted((int(key.split("_")[1]), row) for key, row in hints.items() if key.startswith("clicks_"))
    if not rows:
        return ""
    return (f"<p>The bundle's measurement of fixing by pointing on {hints.get('cases', '?')} real failures (simulated clicks; "
            "mean Dice change of the latent fix and its paired differences to the controls, 95 % CI):</p><table><tr><th>clicks</th>"
            "<th>latent fix</th><th>vs random latents</th><th>vs logit bias</th><th>vs spheres</th><th>gaining &gt;= 0.05</th>"
            "<th>far from clicks</th></tr>"
            + "".join(f"<tr><td>{n}</td><td>{_e(r.get('dice_mean'))}</td><td>{_e(r.get('vs random latents'))}</td>"
                      f"<td>{_e(r.get('vs logit bias'))}</td><td>{_e(r.get('vs spheres'))}</td>"
                      f"<td>{float(r.get('gaining >= 0.05') or 0):.0%}</td><td>{float(r.get('far from clicks') or 0):.0%}</td></tr>"
                      for n, r in rows) + "</table>")  # fmt: skip


SECTIONS = (
    ("cohorts", "Cohorts and models", _section_cohorts, "no cohorts or model evaluations were given"),
    ("sae", "SAE quality", _section_sae, "no SAE evaluations were given"),
    ("galleries", "Latent galleries", _section_galleries, "no latent labels were given (run seglens interpret)"),
    ("shared", "Shared latents across populations", _section_shared, "no alignments were given (run seglens align)"),
    ("diffing", "Diffing against the planted shift", _section_diffing, "no diffing scores were given (needs alignments and a synthetic cohort with a planted feature)"),
    ("failures", "Failure recovery", _section_failures, "no failure-recovery experiment was given"),
    ("adaptation", "Population adaptation", _section_adaptation, "no adaptation experiment was given"),
    ("steered", "Steered cases: before and after", _section_steered, "no steered cases were given"),
    ("reference", "The shipped reference model on a real case", _section_reference, "the demo did not run the shipped model"),
)  # fmt: skip


def _summary(results: dict) -> str:
    """What the run built and what it shows, first (each line from the results; absent results give no line):
    the models' Dice, the SAEs, the latents labelled, and a steered case before and after."""
    lines = []
    for model in (results.get("models") or [])[:6]:
        dice = {c: d for c, d in (model.get("dice") or {}).items() if isinstance(d, (int, float))}
        own = dice.get(model.get("cohort"), next(iter(dice.values()), None))
        if own is not None:
            lines.append(f"Model {model.get('name')} ({model.get('arch')}, trained on {model.get('cohort')}): mean Dice {own:.3f}"
                         + (f" on {model.get('cohort')}" if model.get("cohort") in dice else "") + ".")  # fmt: skip
    saes = [r for r in results.get("sae_quality") or [] if isinstance(r.get("explained_variance"), (int, float))]
    if saes:
        ev = [r["explained_variance"] for r in saes]
        lines.append(f"{len(saes)} SAE(s): explained variance {min(ev):.3f} to {max(ev):.3f}.")
    labelled = sum(len(latents or []) for g in results.get("latent_galleries") or [] for latents in (g.get("categories") or {}).values())
    if labelled:
        lines.append(f"{labelled} latents shown with their automatic labels in the galleries.")
    for case in (results.get("steered_cases") or [])[:3]:
        if isinstance(case.get("dice_before"), (int, float)) and isinstance(case.get("dice_after"), (int, float)):
            lines.append(f"{case.get('case_id', 'a case')}: Dice {case['dice_before']:.3f} before steering, {case['dice_after']:.3f} after "
                         "(side by side below).")  # fmt: skip
    real = results.get("reference_case") or {}
    if isinstance(real.get("dice_before"), (int, float)) and isinstance(real.get("dice_after"), (int, float)):
        lines.append(f"The shipped reference model on a real case ({real.get('case_id')}): Dice {real['dice_before']:.3f} before, "
                     f"{real['dice_after']:.3f} after its suggested correction.")  # fmt: skip
    if not lines:
        return ""
    return "<section id='summary'><h2>What this run shows</h2><ul>" + "".join(f"<li>{_e(line)}</li>" for line in lines) + "</ul></section>"


def build_report_html(results: dict) -> str:
    """The report as one HTML string (every image inline). Absent inputs give a note, never an invented section.
    It opens with what the run built and shows; the caveats (``results["notes"]``) have a section of their own, last."""
    title = results.get("title", "SegLens audit report")
    body, nav = [], []
    for anchor, heading, render, missing in SECTIONS:
        content = render(results)
        nav.append(f'<a href="#{anchor}">{_e(heading)}</a>')
        body.append(f'<section id="{anchor}"><h2>{_e(heading)}</h2>{content if content is not None else _note("Omitted: " + missing + ".")}</section>')
    notes = "".join(f"<li>{_e(n)}</li>" for n in results.get("notes", []))
    if notes:
        nav.append('<a href="#caveats">Caveats and goals</a>')
        body.append(f"<section id='caveats'><h2>Caveats and goals</h2><ul>{notes}</ul></section>")
    stamp = results.get("generated", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">"
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>"
        f"<h1>{_e(title)}</h1><p class='subtitle'>{_e(results.get('subtitle', ''))} Generated {_e(stamp)} by SegLens.</p>"
        f"<nav>{''.join(nav)}</nav>"
        + _summary(results)
        + "".join(body)
        + "</body></html>\n"
    )


def render_report(results: dict, out: str | Path, overwrite: bool = False) -> Path:
    """Write the audit report for ``results`` (see the module docstring) to ``out`` atomically; returns the path."""
    from ..storage import atomic_write_text
    from ..errors import refuse_existing

    out = refuse_existing(out, overwrite)
    return atomic_write_text(out, build_report_html(results), overwrite=overwrite)
