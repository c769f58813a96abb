"""Do latent labels hold on cases the labeller never saw? The share of a labelled latent's activation mass inside
the class its label names, over whole volumes.

The labeller (:mod:`.labeller`) names a latent from its top-K slices over the labelling cohort. A clinician sees
something else: the latent's heatmap over the whole volume of a new case (the panel's layer). For every latent
labelled with a tumour class, on each case of a held-out cohort:

- ``in_class``: the share of its heatmap's mass (:meth:`~SegLensLogic.sae.codes.VolumeCodes.heatmap`, input grid)
  on voxels of that class in the case's ground truth;
- ``in_tumour``: the share on any tumour voxel.

Shares pool every case (mass over mass). ``chance`` is the share of the brain each class takes in the same cases:
what a latent firing evenly over the brain would score. ``ideal`` is the other end: the share an ideal latent would
reach, one whose value on each feature-grid cell is the share of the cell inside the class, upsampled as the
heatmaps are. A coarse grid blurs every heatmap across class borders, so no latent of that hook can beat it
(docs/measurements/label-resolution.md). Where the top-K rule and this measure disagree, the whole
volume is what the panel shows, so it is what a user should trust; the top-K share is kept beside it
(``top_slices``: the labeller's own ``p_<class>``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from ..errors import SegLensError
from ..sae.codes import encode_volume
from ..segmentation.inference import prepare_for_model
from .labeller import TUMOUR_CATEGORIES

# The goal: a tumour-labelled latent puts at least this share of its mass inside its class.
HOLDS_AT = 0.40


def label_mass(model, sae, labels, cohort: Iterable, batch_size: int | None = None,
               log: Callable[[str], None] | None = None) -> dict:  # fmt: skip
    """Whole-volume activation mass of every tumour-labelled latent inside its class, on labelled cases.

    Args:
        model, sae: the segmenter and the SAE the labels were made for.
        labels: the latent labels (:class:`~SegLensLogic.interpretation.latent_labels.LatentLabels`).
        cohort: labelled cases never used for labelling (a :class:`~SegLensLogic.data.Cohort` works).

    Returns:
        ``{"cases", "case_ids", "chance": {class: share of brain}, "latents": [{"id", "category", "in_class", "in_tumour",
        "top_slices"}], "by_category": {category: {"latents", "in_class", "in_tumour"}}, "mean_in_class",
        "mean_in_tumour", "holding": latents with in_class >= HOLDS_AT, "holds_at", "ideal": {class: an ideal latent's
        share at this grid}}`` (means over latents that fired on the cases).
    """
    tumour = {j: labels.category(j) for j in range(sae.d_sae) if labels.category(j) in TUMOUR_CATEGORIES}
    inside, in_tumour, total = (np.zeros(sae.d_sae) for _ in range(3))
    class_voxels, brain_voxels, cases, class_names, case_ids = None, 0, 0, None, []
    ideal: dict[str, np.ndarray] = {}
    for case in cohort:
        prepared = prepare_for_model(model, case)
        if prepared.label is None or prepared.source.label_scheme is None:
            raise SegLensError(f"case '{prepared.source.case_id}' has no label map; measuring labels needs labelled cases")
        names = tuple(prepared.source.label_scheme.class_names)
        if class_names is None:
            class_names, class_voxels = names, np.zeros(len(names))
        if not tumour:
            break
        codes = encode_volume(model, sae, prepared, batch_size=batch_size)
        # Every latent's heatmap mass per class at once (exactly the sums over codes.heatmap(j)).
        mass = codes.heatmap_mass(prepared.label.astype(np.int64), len(names))
        brain = prepared.brain_mask
        class_voxels += np.bincount(prepared.label[brain].astype(np.int64), minlength=len(names))[: len(names)]
        brain_voxels += int(brain.sum())
        for j, category in tumour.items():
            if category not in names:
                continue
            total[j] += mass[j, -1]
            inside[j] += mass[j, names.index(category)]
            in_tumour[j] += mass[j, 1:-1].sum()  # any labelled voxel
        for c, name in enumerate(names):
            if name in TUMOUR_CATEGORIES:
                ideal[name] = ideal.get(name, np.zeros(2)) + ideal_latent_mass(prepared, prepared.label == c, codes.slices, codes.grid)
        cases += 1
        case_ids.append(prepared.source.case_id)
        if log:
            log(f"  {prepared.source.case_id}: {sum(total[j] > 0 for j in tumour)} of {len(tumour)} tumour latents fired so far")
    rows = []
    for j, category in sorted(tumour.items()):
        if total[j] <= 0:
            continue
        metrics = (labels.entry(j) or {}).get("metrics") or {}
        rows.append({"id": int(j), "category": category, "in_class": float(inside[j] / total[j]), "in_tumour": float(in_tumour[j] / total[j]),
                     "top_slices": metrics.get(f"p_{category}")})  # fmt: skip
    by_category = {}
    for category in sorted({r["category"] for r in rows}):
        members = [r for r in rows if r["category"] == category]
        by_category[category] = {"latents": len(members), "in_class": float(np.mean([r["in_class"] for r in members])),
                                 "in_tumour": float(np.mean([r["in_tumour"] for r in members]))}  # fmt: skip
    chance = {}
    if class_names is not None and brain_voxels:
        chance = {name: float(class_voxels[c] / brain_voxels) for c, name in enumerate(class_names) if name in TUMOUR_CATEGORIES}
    return {
        "cases": cases,
        "case_ids": case_ids,
        "tumour_latents": len(tumour),
        "fired": len(rows),
        "chance": chance,
        "latents": rows,
        "by_category": by_category,
        "mean_in_class": float(np.mean([r["in_class"] for r in rows])) if rows else None,
        "mean_in_tumour": float(np.mean([r["in_tumour"] for r in rows])) if rows else None,
        "holding": int(sum(r["in_class"] >= HOLDS_AT for r in rows)),
        "ideal": {name: float(inside / total) for name, (inside, total) in ideal.items() if total > 0},
        "holds_at": HOLDS_AT,
    }


def ideal_latent_mass(prepared, region: np.ndarray, slices: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """``[inside, total]`` heatmap mass of an ideal latent for ``region`` (``(X, Y, Z)`` bool, RAS) on the axial
    ``slices`` of a feature ``grid``: its value on each cell is the share of the cell inside the region (as
    extraction weighs positions), its heatmap drawn as :meth:`~SegLensLogic.sae.codes.VolumeCodes.heatmap` draws one."""
    from ..sae.activations import mask_fraction_on_grid
    from ..sae.codes import upsample_to_slices

    if len(slices) == 0 or not region[:, :, slices].any():
        return np.zeros(2)
    heat = upsample_to_slices(mask_fraction_on_grid(region, prepared.geometry, slices, grid), prepared.geometry).numpy()
    inside = region[:, :, slices].transpose(2, 0, 1)
    return np.array([float(heat[inside].sum()), float(heat.sum())])


def annotate_labels(document: dict, measured: dict) -> dict:
    """A copy of a labels document (``latents.json``) carrying ``measured`` (:func:`label_mass` on held-out cases):
    ``held_out`` at the top (the cases, the bar, chance per class) and on each measured latent's entry
    (``{"in_class", "in_tumour"}``), so that a reader (the panel's latent table) can show, beside each tumour label,
    how much of the latent's heatmap fell in that class on cases the labeller never saw."""
    import copy

    out = copy.deepcopy(document)
    rows = {int(row["id"]): row for row in measured.get("latents", [])}
    out["held_out"] = {"cases": int(measured["cases"]), "case_ids": list(measured.get("case_ids", [])),
                       "holds_at": float(measured["holds_at"]), "chance": dict(measured.get("chance", {})),
                       **({"ideal": dict(measured["ideal"])} if measured.get("ideal") else {})}  # fmt: skip
    for entry in out["latents"]:
        entry.pop("held_out", None)
        row = rows.get(int(entry["id"]))
        if row is not None and row["category"] == entry["category"]:
            entry["held_out"] = {"in_class": round(float(row["in_class"]), 4), "in_tumour": round(float(row["in_tumour"]), 4)}
    return out
