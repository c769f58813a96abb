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

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..data.io import atomic_write_text, read_json
from ..errors import InputFileError, SegLensError
from .interventions import LatentEdit

SUGGESTIONS_KIND = "seglens-steering-suggestions"
SUGGESTIONS_FORMAT_VERSION = 1
METHODS = ("ground-truth-free", "calibrated")


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


class Suggestions:
    """A validated suggestions document (see the module docstring)."""

    def __init__(self, document: Any, source: str | Path = "<suggestions>"):
        self.source = Path(source)
        if not isinstance(document, dict) or document.get("kind") != SUGGESTIONS_KIND:
            raise InputFileError(self.source, f"is not a SegLens suggestions file (kind '{SUGGESTIONS_KIND}')")
        if document.get("format_version") != SUGGESTIONS_FORMAT_VERSION:
            raise InputFileError(self.source, f"suggestions format_version {document.get('format_version')!r} is not supported")
        try:
            self.alphas = [float(a) for a in document["alphas"]]
            self.n_latents = int(document["n_latents"])
            reference = document["reference"]
            self.proportions = np.asarray([float(v) for v in reference["proportions"]], dtype=np.float64)
            self.log_size = (float(reference["log_size"][0]), float(reference["log_size"][1]))
            self.populations = {str(name): {"specific": [int(j) for j in entry["specific"]],
                                            "calibrated_alpha": float(entry["calibrated_alpha"])}
                                for name, entry in document["populations"].items()}  # fmt: skip
            self.calibrated_alpha = {str(k): float(v) for k, v in document["calibrated_alpha"].items()}
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise InputFileError(self.source, f"malformed suggestions ({type(exc).__name__}: {exc})") from None
        if not self.alphas or len(self.proportions) != 3 or "all" not in self.calibrated_alpha or not 1 <= self.n_latents <= 64:
            raise InputFileError(self.source, "suggestions need alphas, three reference proportions, an 'all' alpha and 1-64 latents")
        if any(not np.isfinite(a) or abs(a) > 1e3 for a in self.alphas + list(self.calibrated_alpha.values())):
            raise InputFileError(self.source, "suggested alphas must be finite and at most 1000 in size")
        self.document = document

    @property
    def reference(self):
        from ..experiments.repair import ReferenceStatistics

        return ReferenceStatistics(self.proportions, self.log_size)


def load_suggestions(path: str | Path) -> Suggestions:
    return Suggestions(read_json(path), path)


@dataclass
class Suggestion:
    """A suggested correction for one case: the edits, and how they were chosen."""

    method: str
    population: str | None
    latents: tuple[int, ...]
    alpha: float
    edits: list[LatentEdit]
    plausibility: dict[float, float] = field(default_factory=dict)

    def describe(self) -> str:
        if not self.latents or self.alpha == 1.0:
            return f"{self.method}: no edit makes the prediction more plausible; the mask is kept as it is"
        how = "most plausible prediction on this case" if self.method == "ground-truth-free" else "best on the build's failure cases"
        return (f"{self.method} ({self.population or 'any population'}): scale latents {', '.join(map(str, self.latents))} "
                f"by {self.alpha:g} ({how})")  # fmt: skip


def suggest(encoded, sae, suggestions: Suggestions, population: str | None = None, method: str = "ground-truth-free") -> Suggestion:
    """A correction for an encoded case (:class:`~SegLensLogic.steering.encoded.EncodedCase`), no label read.

    Args:
        population: the case's population (a key of the suggestions; None: no population-specific latents).
        method: ``ground-truth-free`` or ``calibrated`` (module docstring).
    """
    from ..experiments.repair import latent_sets, plausibility

    if method not in METHODS:
        raise SegLensError(f"unknown suggestion method '{method}'; choose {' or '.join(METHODS)}")
    if population is not None and population not in suggestions.populations:
        raise SegLensError(f"no suggestion for population '{population}'; known: {', '.join(sorted(suggestions.populations)) or 'none'}")
    specific = suggestions.populations[population]["specific"] if population else None
    sets = latent_sets(encoded, suggestions.n_latents, specific, seed=0)
    if method == "calibrated":
        latents = sets["top"]
        alpha = suggestions.populations[population]["calibrated_alpha"] if population else suggestions.calibrated_alpha["all"]
        return Suggestion(method, population, latents, alpha, [LatentEdit(latents, "scale", alpha)] if latents and alpha != 1.0 else [])
    latents = sets["specific"]
    brain = encoded.prepared.to_input_grid(encoded.prepared.brain_mask)
    scores = {}
    for alpha in suggestions.alphas:
        labels = encoded.labels if alpha == 1.0 or not latents else encoded.steer(sae, [LatentEdit(latents, "scale", alpha)])
        scores[alpha] = plausibility(labels, brain, suggestions.reference)
    alpha = min(scores, key=lambda a: (scores[a], a != 1.0))
    edits = [LatentEdit(latents, "scale", alpha)] if latents and alpha != 1.0 else []
    return Suggestion(method, population, latents, alpha, edits, scores)
