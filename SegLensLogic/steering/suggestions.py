"""Suggested corrections: what a user can apply to a new case of a known population, with no label of it.

A bundle's ``suggestions.json`` (written by the reference build's repair step from its failure cases)::

    {"format_version": 1, "kind": "seglens-steering-suggestions", "n_latents": 5, "alphas": [0, 0.5, 1, 2, 4, 8],
     "reference": {"proportions": [nc, ed, et], "log_size": [mean, std]},
     "populations": {"ssa": {"specific": [latent ids], "alignment": "alignments/adult-vs-ssa.json", "calibrated_alpha": 2.0}, ...},
     "calibrated_alpha": {"all": 2.0, "ssa": 2.0, ...}, "evidence": [arms table rows]}

Two methods (:func:`suggest`):

- ``ground-truth-free``: the population's specific latents (alignment file) most active in the predicted tumour,
  scaled by the alpha of the grid whose prediction is most plausible for the reference cohort (class proportions
  and size, :func:`~SegLensLogic.experiments.repair.plausibility`); every alpha is tried on the case.
- ``calibrated``: the latents most active in the predicted tumour, scaled by the alpha that did best on the
  build's failure cases of the population (or of all populations when it has none).

Either way the result is a list of ordinary :class:`LatentEdit` objects, so an applied suggestion is recorded and
replayed by a recipe like any other edit.
"""

from __future__ import annotations

from collections.abc import Callable

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from pydantic import Field, model_validator

from ..errors import InputFileError, SegLensError
from ..storage import MAX_LATENTS, Measured, Schema, atomic_write_text, check_document, read_document
from .interventions import LatentEdit

SUGGESTIONS_KIND = "seglens-steering-suggestions"
SUGGESTIONS_FORMAT_VERSION = 1
METHODS = ("ground-truth-free", "calibrated")
# The row of the build's arms table that measured each method on real failures (``evidence`` of the document).
EVIDENCE_ARM = {"ground-truth-free": "ground-truth-free (specific latents)", "calibrated": "calibrated (top latents)"}
# A suggested alpha: finite and at most 1000 in size.
Alpha = Annotated[float, Field(ge=-1e3, le=1e3)]


def suggestions_document(results: dict, reference, specific: dict[str, list[int]], alphas, alignment_paths: dict[str, str], n_latents: int = 5) -> dict:
    """The suggestions document from a repair run's results (:func:`~SegLensLogic.experiments.repair.run_repair`)."""
    calibrated = {k: float(v) for k, v in results["calibrated_alpha"].items()}
    return {
        "format_version": SUGGESTIONS_FORMAT_VERSION,
        "kind": SUGGESTIONS_KIND,
        "n_latents": int(n_latents),
        "alphas": [float(a) for a in alphas],
        "reference": reference.to_dict(),
        "populations": {name: {"specific": [int(j) for j in latents], "alignment": alignment_paths.get(name),
                               "calibrated_alpha": calibrated.get(name, calibrated["all"])}
                        for name, latents in specific.items()},  # fmt: skip
        "calibrated_alpha": calibrated,
        "evidence": results.get("summary", []),
    }


def write_suggestions(document: dict, path: str | Path, overwrite: bool = True) -> Path:
    Suggestions(document, path)  # validate before writing
    return atomic_write_text(path, json.dumps(document, indent=1) + "\n", overwrite=overwrite)


class ReferenceRecord(Schema):
    proportions: list[Measured] = Field(min_length=3, max_length=3)
    log_size: list[Measured] = Field(min_length=2, max_length=2)


class PopulationRecord(Schema):
    specific: list[Annotated[int, Field(ge=0, lt=MAX_LATENTS)]] = Field(max_length=MAX_LATENTS)
    calibrated_alpha: Alpha
    alignment: str | None = None


class SuggestionsDocument(Schema):
    """``suggestions.json`` (module docstring): alphas finite and at most 1000 in size, 1-64 latents per edit."""

    n_latents: int = Field(ge=1, le=64)
    alphas: list[Alpha] = Field(min_length=1, max_length=1000)
    reference: ReferenceRecord
    populations: dict[str, PopulationRecord] = Field(max_length=10_000)
    calibrated_alpha: dict[str, Alpha]
    evidence: list[Any] | None = None

    @model_validator(mode="after")
    def _all(self):
        if "all" not in self.calibrated_alpha:
            raise ValueError("'calibrated_alpha' needs an 'all' entry (the alpha for any population)")
        return self


class Suggestions:
    """A validated suggestions document (see the module docstring and :class:`SuggestionsDocument`)."""

    def __init__(self, document: Any, source: str | Path = "<suggestions>"):
        self.source = Path(source)
        check_document(document, self.source, SUGGESTIONS_KIND, SUGGESTIONS_FORMAT_VERSION, SuggestionsDocument, "SegLens suggestions file")
        self.alphas = [float(a) for a in document["alphas"]]
        self.n_latents = int(document["n_latents"])
        reference = document["reference"]
        self.proportions = np.asarray([float(v) for v in reference["proportions"]], dtype=np.float64)
        self.log_size = (float(reference["log_size"][0]), float(reference["log_size"][1]))
        self.populations = {str(name): {"specific": [int(j) for j in entry["specific"]], "calibrated_alpha": float(entry["calibrated_alpha"])}
                            for name, entry in document["populations"].items()}  # fmt: skip
        self.calibrated_alpha = {str(k): float(v) for k, v in document["calibrated_alpha"].items()}
        self.document = document

    def evidence(self, method: str) -> str | None:
        """How ``method`` did on the build's failure cases, in one line (None when the document has no record)."""
        rows = [r for r in self.document.get("evidence") or [] if isinstance(r, dict) and r.get("arm") == EVIDENCE_ARM.get(method)]
        if not rows:
            return None
        row = rows[0]
        text = f"on the build's {row.get('cases', '?')} failure cases this method changed mean Dice by {row.get('dice_mean', '?')}"
        if row.get("vs random control"):
            text += f" ({row['vs random control']} against random latents)"
        return text

    def check_sae(self, d_sae: int) -> "Suggestions":
        """Raise :class:`InputFileError` naming this file when a population's latents are not the SAE's."""
        for name, entry in self.populations.items():
            beyond = [j for j in entry["specific"] if j >= d_sae]
            if beyond:
                raise InputFileError(self.source, f"population '{name}' names latent {beyond[0]}, but the SAE has {d_sae} latents")
        return self

    @property
    def reference(self):
        from .plausibility import ReferenceStatistics

        return ReferenceStatistics(self.proportions, self.log_size)


def load_suggestions(path: str | Path) -> Suggestions:
    path = Path(path)
    return Suggestions(read_document(path, None, SUGGESTIONS_FORMAT_VERSION, None, "SegLens suggestions file",
                                     default_version=SUGGESTIONS_FORMAT_VERSION, missing="suggestions file not found"), path)  # fmt: skip


@dataclass
class Suggestion:
    """A suggested correction for one case: the edits, and how they were chosen."""

    method: str
    population: str | None
    latents: tuple[int, ...]
    alpha: float
    edits: list[LatentEdit]
    plausibility: dict[float, float] = field(default_factory=dict)
    evidence: str | None = None

    def describe(self) -> str:
        """One line: the edit, how it was chosen, and how the method did on the build's failure cases."""
        if not self.latents or self.alpha == 1.0:
            text = f"{self.method}: no edit makes the prediction more plausible; the mask is kept as it is"
        else:
            how = "most plausible prediction on this case" if self.method == "ground-truth-free" else "best on the build's failure cases"
            text = (f"{self.method} ({self.population or 'any population'}): scale latents {', '.join(map(str, self.latents))} "
                    f"by {self.alpha:g} ({how})")  # fmt: skip
        return text + (f"; {self.evidence}" if self.evidence else "")


def suggest(encoded, sae, suggestions: Suggestions, population: str | None = None, method: str = "ground-truth-free",
            progress: Callable[[int, int], bool | None] | None = None) -> Suggestion:  # fmt: skip
    """A correction for an encoded case (:class:`~SegLensLogic.steering.encoded.EncodedCase`), no label read.

    Args:
        population: the case's population (a key of the suggestions; None: no population-specific latents).
        method: ``ground-truth-free`` or ``calibrated`` (module docstring).
        progress: ``progress(done, total)`` over the alphas tried (each counted by its decoded batches); returning
            False cancels (``PredictionCancelled``).
    """
    from .plausibility import plausibility
    from .selection import latent_sets

    if method not in METHODS:
        raise SegLensError(f"unknown suggestion method '{method}'; choose {' or '.join(METHODS)}")
    if population is not None and population not in suggestions.populations:
        raise SegLensError(f"no suggestion for population '{population}'; known: {', '.join(sorted(suggestions.populations)) or 'none'}")
    specific = suggestions.populations[population]["specific"] if population else None
    sets = latent_sets(encoded, suggestions.n_latents, specific, seed=0)
    if method == "calibrated":
        latents = sets["top"]
        alpha = suggestions.populations[population]["calibrated_alpha"] if population else suggestions.calibrated_alpha["all"]
        return Suggestion(method, population, latents, alpha, [LatentEdit(latents, "scale", alpha)] if latents and alpha != 1.0 else [],
                          evidence=suggestions.evidence(method))
    latents = sets["specific"]
    # Counted on the RAS arrays: the input grid is the same voxels reoriented, so the counts (and scores) are equal.
    brain = encoded.prepared.brain_mask
    steered = [a for a in suggestions.alphas if a != 1.0] if latents else []
    scores = {}
    for alpha in suggestions.alphas:
        if alpha in steered:
            number = steered.index(alpha)
            step = None if progress is None else (lambda done, total, n=number: progress(n * total + done, len(steered) * total))
            labels = encoded.steer_ras(sae, [LatentEdit(latents, "scale", alpha)], progress=step)
        else:
            labels = encoded.labels_ras
        scores[alpha] = plausibility(labels, brain, suggestions.reference)
    alpha = min(scores, key=lambda a: (scores[a], a != 1.0))
    edits = [LatentEdit(latents, "scale", alpha)] if latents and alpha != 1.0 else []
    return Suggestion(method, population, latents, alpha, edits, scores, suggestions.evidence(method))
