"""The latent labels file (``latents.json``) and its reader :func:`load_latent_labels`.

Format (version 1; the steering session, the Slicer module and bundles read it)::

    {"format_version": 1, "kind": "seglens-latent-labels",
     "sae": {"path": ..., "sha256": ...}, "model": {"path": ..., "sha256": ...},
     "cohort": "adult", "top_k": 16, "class_names": ["background", "necrotic core", "edema", "enhancing tumour"],
     "stability": {"agreement": 0.71, "n_compared": 90, "threshold": 0.5, "splits": 3, "n_unstable": 12},
     "latents": [{"id": 12, "category": "edema", "description": "edema, localised, deep, left hemisphere",
                  "confidence": 0.82, "stable": true, "stability": 1.0, "frequency": 0.013, "mean_activation": 1.7,
                  "metrics": {"p_edema": 0.64, ...},
                  "top_examples": [{"case_id": "...", "slice": 77, "activation": 12.3}]}],
     "d_sae": 2048, "cases": [{"case_id": ..., "path": ...}], "base_rates": {"edema": 0.05, ...},
     "positions": 123456, "slice_order": "RAS", "slice_score": "max", "rules": {...}, "metric_options": {...}}

A bundle's copy may also carry ``held_out`` (:func:`~.label_mass.annotate_labels`): at the top ``{"cases", "case_ids",
"holds_at", "chance"}``, and on each tumour-labelled latent measured there ``{"in_class": 0.44, "in_tumour": 0.57}``,
the share of its whole-volume heatmap inside its class and inside any tumour on cases the labeller never saw.
It may also carry ``replica`` (:func:`~SegLensLogic.alignment.replication.annotate_replication`): at the top
``{"sha256", "seed", "tau", "live", "live_shared"}``, and ``"replicates": true | false`` on each live latent, whether
an SAE trained from another seed on the same activations finds the latent again by the diffing rule. Compared with
several seeds (:func:`~SegLensLogic.alignment.replication.annotate_replicas`), ``replica`` and ``replicates`` are the
first's, ``replicas`` lists every replica's summary, and ``"found_by": 3`` on each live latent counts the replicas
that find it again.

``slice`` is the axial slice index in RAS order (``PreparedCase`` order, the model's slicing axis);
``activation`` the latent's score on that slice's feature grid (``slice_score``: peak or summed activation). ``stable`` is null when the latent
could not be compared (dead in a half, or a cohort of one case). ``base_rates`` are the fractions of the
cohort's brain voxels in each class.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, model_validator

from ..errors import InputFileError
from ..storage import MAX_AXIS, MAX_LATENTS, Measured, Schema, atomic_write_text, read_document
from .labeller import GENERIC_CATEGORIES, LabellingRules, LatentLabel

LABELS_FORMAT_VERSION = 1
LABELS_KIND = "seglens-latent-labels"


def _weights_ref(folder, sha256) -> dict:
    if folder is None:
        return {"path": None, "sha256": None}
    return {"path": str(Path(folder).resolve()), "sha256": sha256(folder)}


def build_labels_document(
    interpretation,
    labels: list[LatentLabel],
    stability=None,
    *,
    model_dir=None,
    sae_dir=None,
    cohort_name: str | None = None,
    rules: LabellingRules | None = None,
) -> dict:
    """The JSON document of a labelled SAE.

    Args:
        interpretation: a :class:`~.cohort.CohortInterpretation`.
        labels: one :class:`LatentLabel` per latent (``interpretation.full.label(...)``).
        stability: a :class:`~.stability.Stability`, or None.
        model_dir, sae_dir: folders recorded with their weights' SHA-256.
    """
    from ..networks.segmenter import weights_sha256
    from ..sae.model import sae_sha256

    full = interpretation.full
    entries = []
    for j, label in enumerate(labels):
        n = full.count(j)
        stable = None if stability is None else stability.stable(j)
        agreement = None if stability is None or np.isnan(stability.per_latent[j]) else round(float(stability.per_latent[j]), 4)
        entries.append(
            {
                "id": j,
                "category": label.category,
                "description": label.description,
                "confidence": round(label.confidence, 4),
                "stable": stable,
                "stability": agreement,
                "frequency": float(interpretation.frequency[j]),
                "mean_activation": round(float(interpretation.mean_activation[j]), 5),
                "metrics": {name: round(value, 5) for name, value in label.metrics.items()},
                "top_examples": [
                    {
                        "case_id": interpretation.case_ids[int(full.case[j, i])],
                        "slice": int(full.slice[j, i]),
                        "activation": round(float(full.scores[j, i]), 4),
                    }
                    for i in range(n)
                ],
            }
        )
    return {
        "format_version": LABELS_FORMAT_VERSION,
        "kind": LABELS_KIND,
        "sae": _weights_ref(sae_dir, sae_sha256),
        "model": _weights_ref(model_dir, weights_sha256),
        "cohort": cohort_name,
        "top_k": full.k,
        "class_names": list(interpretation.class_names),
        "stability": None if stability is None else stability.to_dict(),
        "d_sae": interpretation.d_sae,
        "cases": [{"case_id": c, "path": p} for c, p in zip(interpretation.case_ids, interpretation.case_folders)],
        "base_rates": {name: round(v, 6) for name, v in interpretation.base_rates.items()},
        "positions": interpretation.positions,
        "slice_order": "RAS",
        "rules": (rules or LabellingRules()).to_dict(),
        "metric_options": asdict(interpretation.options),
        "latents": entries,
    }


def write_latent_labels(document: dict, path: str | Path, overwrite: bool = False) -> Path:
    """Write a labels document atomically (refuses to replace a file unless ``overwrite``)."""
    return atomic_write_text(path, json.dumps(document, indent=1) + "\n", overwrite=overwrite)


class LatentLabels:
    """A labels file in memory: category, description and metrics of each latent of one SAE.

    Attributes:
        path: the file read.
        data: the parsed document.
    """

    def __init__(self, data: dict, path: str | Path = "<labels>"):
        self.path = Path(path)
        self.data = data
        self._entries = {int(e["id"]): e for e in data["latents"]}

    @property
    def sae_sha256(self) -> str | None:
        return (self.data.get("sae") or {}).get("sha256")

    @property
    def model_sha256(self) -> str | None:
        return (self.data.get("model") or {}).get("sha256")

    @property
    def class_names(self) -> list[str]:
        return list(self.data.get("class_names", []))

    @property
    def stability(self) -> dict | None:
        return self.data.get("stability")

    @property
    def cohort(self) -> str | None:
        return self.data.get("cohort")

    def __len__(self) -> int:
        return len(self._entries)

    def check_sae(self, d_sae: int, sae_sha256: str | None = None) -> "LatentLabels":
        """Raise :class:`InputFileError` naming this file when it was made for another SAE (its recorded hash
        differs) or names latents the SAE does not have; returns the labels."""
        if sae_sha256 and self.sae_sha256 and sae_sha256 != self.sae_sha256:
            raise InputFileError(self.path, "latent labels were made for another SAE (sae.sha256 differs from the SAE's weights)")
        beyond = [j for j in self._entries if j >= d_sae]
        if beyond:
            raise InputFileError(self.path, f"names latent {min(beyond)}, but the SAE has {d_sae} latents (0..{d_sae - 1})")
        return self

    def held_out(self, latent: int) -> dict | None:
        """``{"in_class", "in_tumour"}``: where the latent's heatmap fell on held-out cases (None when unmeasured)."""
        entry = self.entry(latent)
        return None if entry is None else entry.get("held_out")

    def replicates(self, latent: int) -> bool | None:
        """Whether an SAE trained from another seed finds the latent again (None when not compared, or dead)."""
        entry = self.entry(latent)
        return None if entry is None else entry.get("replicates")

    def replicas(self) -> list[dict]:
        """Summaries of the replicas the labels were compared with (``{"sha256", "seed", "tau", "live",
        "live_shared"}``), first the one ``replicates`` refers to; empty when never compared."""
        if self.data.get("replicas"):
            return list(self.data["replicas"])
        return [self.data["replica"]] if self.data.get("replica") else []

    def found_by(self, latent: int) -> int | None:
        """How many of :meth:`replicas` find the latent again (None when not compared, or dead)."""
        entry = self.entry(latent)
        if entry is None:
            return None
        if entry.get("found_by") is not None:
            return int(entry["found_by"])
        flag = entry.get("replicates")
        return None if flag is None else int(bool(flag))

    def entry(self, latent: int) -> dict | None:
        """The latent's whole record, or None when the file has none for it."""
        return self._entries.get(int(latent))

    def category(self, latent: int) -> str | None:
        entry = self.entry(latent)
        return None if entry is None else entry["category"]

    def description(self, latent: int) -> str | None:
        entry = self.entry(latent)
        return None if entry is None else entry.get("description")

    def latents_in_category(self, name: str) -> list[int]:
        """Latent ids of a category, most confident first (ties by id)."""
        hits = [e for e in self._entries.values() if e["category"] == name]
        return [int(e["id"]) for e in sorted(hits, key=lambda e: (-float(e.get("confidence") or 0.0), int(e["id"])))]

    def categories(self) -> dict[str, list[int]]:
        """Category -> latent ids (as :meth:`latents_in_category`), categories in order of first appearance."""
        out: dict[str, list[int]] = {}
        for entry in self._entries.values():
            out.setdefault(entry["category"], [])
        return {name: self.latents_in_category(name) for name in out}


class TopExample(Schema):
    case_id: str
    slice: int = Field(ge=0, le=MAX_AXIS)
    activation: Measured


class HeldOutShares(Schema):
    in_class: Measured
    in_tumour: Measured


class LatentEntry(Schema):
    """One latent's record; the numbers a reader sorts or shows are typed, NaN allowed where a measure is undefined."""

    id: int = Field(ge=0, lt=MAX_LATENTS)
    category: str
    description: str | None = None
    confidence: Measured | None = None
    stable: bool | None = None
    stability: Measured | None = None
    frequency: Measured | None = None
    mean_activation: Measured | None = None
    metrics: dict[str, Measured | None] = Field(default_factory=dict)
    top_examples: list[TopExample] = Field(default_factory=list)
    held_out: HeldOutShares | None = None
    replicates: bool | None = None
    found_by: int | None = Field(default=None, ge=0)


class ReplicaSummary(Schema):
    """``replica`` of a labels document: the SAE compared (another seed on the same activations) and the floor."""

    sha256: str | None = Field(default=None, max_length=128)
    seed: int | None = None
    tau: Measured
    live: int = Field(ge=0, le=MAX_LATENTS)
    live_shared: Measured


class WeightsReference(Schema):
    path: str | None = None
    sha256: str | None = None


class LatentLabelsDocument(Schema):
    """``latents.json`` (module docstring): every field a reader uses, typed; latent ids distinct and below ``d_sae``."""

    latents: list[LatentEntry] = Field(max_length=MAX_LATENTS)
    sae: WeightsReference | None = None
    model: WeightsReference | None = None
    cohort: str | None = None
    class_names: list[str] = Field(default_factory=list, max_length=256)
    stability: dict[str, Any] | None = None
    d_sae: int | None = Field(default=None, ge=1, le=MAX_LATENTS)
    top_k: int | None = Field(default=None, ge=0)
    replica: ReplicaSummary | None = None
    replicas: list[ReplicaSummary] | None = Field(default=None, max_length=64)

    @model_validator(mode="after")
    def _ids(self):
        seen: set[int] = set()
        for entry in self.latents:
            if entry.id in seen:
                raise ValueError(f"latent {entry.id} is listed twice")
            if self.d_sae is not None and entry.id >= self.d_sae:
                raise ValueError(f"latent {entry.id} is out of range for d_sae {self.d_sae}")
            seen.add(entry.id)
            if entry.found_by is not None and entry.found_by > len(self.replicas or ()):
                raise ValueError(f"latent {entry.id} is found by {entry.found_by} replicas, but {len(self.replicas or ())} are listed")
        return self


def load_latent_labels(path: str | Path) -> LatentLabels:
    """Read a ``latents.json`` written by ``seglens interpret`` (checked against :class:`LatentLabelsDocument`).

    Raises:
        InputFileError: missing file, invalid JSON, another kind of file, a newer format, or malformed entries
            (naming the field, e.g. ``latents[3].id``).
    """
    path = Path(path)
    data = read_document(path, LABELS_KIND, LABELS_FORMAT_VERSION, LatentLabelsDocument, "SegLens latent labels file",
                         missing="latent labels file not found")  # fmt: skip
    return LatentLabels(data, path)


def known_categories(class_names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Every category the labeller can give for these label classes, in display order."""
    return tuple(class_names[1:]) + GENERIC_CATEGORIES
