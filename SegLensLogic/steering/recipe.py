"""Steering recipes: a JSON document that reproduces a corrected mask bit for bit.

A recipe names the segmenter and the SAE by the SHA-256 of their weights, the case by its id and voxel grid, and
lists the edits in the order they were applied (latents, mode, alpha, where, region, the label rule and the
Apply step they belonged to; for swaps the second SAE's hash and the partner latents). ``seglens steer --model M --sae S --case C --recipe R.json --out mask.nii.gz``
replays it; a recipe is written next to every corrected mask (``mask.nii.gz`` -> ``mask.recipe.json``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field, model_validator

from .. import __version__
from ..data.io import strip_image_suffix
from ..errors import InputFileError, SegLensError
from ..storage import MAX_AXIS, MAX_LATENTS, MAX_VOXELS, Schema, atomic_write_text, one_line, read_document, validate
from ..sae.model import SparseDictionary
from .interventions import LatentEdit, Region

RECIPE_KIND = "seglens-steering-recipe"
RECIPE_FORMAT_VERSION = 1
# Edits in one recipe, and latents in one edit, that a recipe may hold.
MAX_EDITS = 10_000
MAX_EDIT_LATENTS = 1 << 16


def recipe_path_for(mask_path: str | Path) -> Path:
    """Where the recipe of a corrected mask lives: ``corrected.nii.gz`` -> ``corrected.recipe.json``."""
    mask_path = Path(mask_path)
    return mask_path.with_name(strip_image_suffix(mask_path) + ".recipe.json")


def edit_to_json(edit: LatentEdit, swap_sha256: str | None = None, step: int | None = None) -> dict[str, Any]:
    """An edit's JSON form; ``step`` numbers the Apply it was part of (edits of one step are applied together, and a
    step's label rule reads the labels before it), and ``labels`` is written when it is not the model's own."""
    data: dict[str, Any] = {
        "latents": list(edit.latents),
        "mode": edit.mode,
        "alpha": edit.alpha,
        "where": edit.where,
        "region": edit.region.to_json(),
    }
    if edit.labels != "model":
        data["labels"] = edit.labels
    if step is not None:
        data["step"] = int(step)
    if edit.mode == "swap":
        data["swap"] = {"sae_sha256": swap_sha256, "partners": list(edit.partners or ())}
    return data


class RegionDocument(Schema):
    """An edit's region: ``{"kind": "volume"}``, ``{"kind": "slice"|"slices", "start", "stop"}`` (RAS axial slices,
    stop exclusive) or ``{"kind": "mask", "shape": [I, J, K], "runs": [start, length, ...]}`` (a run-length code of
    the flattened voxel mask on the input grid)."""

    kind: Literal["volume", "slice", "slices", "mask"]
    start: int | None = Field(default=None, ge=0, le=MAX_AXIS)
    stop: int | None = Field(default=None, ge=1, le=MAX_AXIS)
    shape: list[Annotated[int, Field(ge=1, le=MAX_AXIS)]] | None = Field(default=None, min_length=3, max_length=3)
    runs: list[Annotated[int, Field(ge=0, le=MAX_VOXELS)]] | None = None

    @model_validator(mode="after")
    def _complete(self):
        if self.kind in ("slice", "slices") and (self.start is None or self.stop is None or self.start >= self.stop):
            raise ValueError(f"a {self.kind} region needs integer 'start' < 'stop', got {self.start} and {self.stop}")
        if self.kind == "mask":
            if self.shape is None or self.runs is None or len(self.runs) % 2:
                raise ValueError("a mask region needs a 'shape' and 'runs' ([start, length, ...], an even-length list)")
            if int(np.prod(self.shape, dtype=np.int64)) > MAX_VOXELS:
                raise ValueError(f"a mask region of shape {self.shape} is larger than SegLens reads ({MAX_VOXELS} voxels)")
        return self


class SwapDocument(Schema):
    sae_sha256: str | None = None
    partners: list[Annotated[int, Field(ge=0, lt=MAX_LATENTS)]] = Field(default_factory=list, max_length=MAX_EDIT_LATENTS)


class EditDocument(Schema):
    """One edit of a recipe (see :func:`edit_to_json`)."""

    latents: list[Annotated[int, Field(ge=0, lt=MAX_LATENTS)]] = Field(min_length=1, max_length=MAX_EDIT_LATENTS)
    mode: Literal["scale", "add", "zero", "clamp", "swap"]
    alpha: float = 1.0
    where: Literal["active", "everywhere"] = "active"
    region: RegionDocument = Field(default_factory=lambda: RegionDocument(kind="volume"))
    swap: SwapDocument | None = None
    labels: Literal["model", "grow", "shrink", "extent", "composition"] = "model"
    step: int | None = Field(default=None, ge=1, le=MAX_EDITS)


class WeightsRecord(Schema):
    sha256: str | None = None


class CaseRecord(Schema):
    case_id: str | None = None
    shape: list[Annotated[int, Field(ge=1, le=MAX_AXIS)]] | None = Field(default=None, min_length=3, max_length=3)
    affine: list[Annotated[list[float], Field(min_length=4, max_length=4)]] | None = Field(default=None, min_length=4, max_length=4)


class RecipeDocument(Schema):
    """A recipe file (module docstring): the weights by hash, the case's grid and the edits, each edit checked
    (latent ids, mode, a finite alpha, its region) and every mask region on the recipe's grid."""

    model: WeightsRecord
    sae: WeightsRecord
    case: CaseRecord
    edits: list[EditDocument] = Field(max_length=MAX_EDITS)
    output: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _regions(self):
        for index, edit in enumerate(self.edits):
            region = edit.region
            if region.kind == "mask" and self.case.shape is not None and list(region.shape) != list(self.case.shape):
                raise ValueError(f"edits[{index}].region: a mask of shape {region.shape} is not on the recipe's grid {self.case.shape}")
        return self


def edit_from_json(data: Any, source: str | Path, swap_saes: dict[str, SparseDictionary] | None = None,
                   shape: tuple[int, ...] | None = None, where: str = "edit") -> LatentEdit:  # fmt: skip
    """An edit from its JSON form (checked against :class:`EditDocument`); swaps look their second SAE up by hash
    in ``swap_saes``. A mask region must lie on ``shape`` (the case's grid) when given, checked before it is built.

    Raises:
        InputFileError: naming ``source`` and ``where`` (e.g. ``edits[2]``).
    """
    try:
        edit = validate(EditDocument, data, source)
    except InputFileError as exc:
        raise InputFileError(source, f"{where}: {exc.problem}") from None
    try:
        region = Region.from_json(data.get("region", {"kind": "volume"}), shape=shape)
    except SegLensError as exc:
        raise InputFileError(source, f"{where}: {one_line(exc)}") from None
    swap_sae, partners = None, None
    if edit.mode == "swap":
        swap = edit.swap or SwapDocument()
        partners = tuple(swap.partners)
        swap_sae = (swap_saes or {}).get(swap.sae_sha256)
        if swap_sae is None:
            raise InputFileError(source, f"{where}: a swap edit needs the second SAE with weights sha256 {swap.sae_sha256}; give it with --swap-sae")
    return LatentEdit(latents=tuple(edit.latents), mode=edit.mode, alpha=float(edit.alpha), where=edit.where, region=region,
                      swap_sae=swap_sae, partners=partners, labels=edit.labels)  # fmt: skip


@dataclass
class Recipe:
    """What reproduces a corrected mask.

    Attributes:
        model: ``{"sha256", "arch", "hook_point"}`` of the segmenter.
        sae: ``{"sha256", "d_sae", "k"}`` of the SAE.
        case: ``{"case_id", "shape", "affine"}`` of the input grid.
        edits: the edits, in order, as JSON objects (see :func:`edit_to_json`).
        output: ``{"mask", "sha256"}`` once exported: the mask file name and the SHA-256 of its voxels.
    """

    model: dict[str, Any]
    sae: dict[str, Any]
    case: dict[str, Any]
    edits: list[dict[str, Any]] = field(default_factory=list)
    output: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": RECIPE_FORMAT_VERSION,
            "kind": RECIPE_KIND,
            "seglens_version": __version__,
            "model": self.model,
            "sae": self.sae,
            "case": self.case,
            "edits": self.edits,
            "output": self.output,
        }

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        return atomic_write_text(path, json.dumps(self.to_json(), indent=2) + "\n", overwrite=overwrite)

    def check_matches(self, model_sha256: str | None, sae_sha256: str | None, source: str | Path = "<recipe>") -> None:
        """Raise :class:`InputFileError` when the recipe was made with another model or SAE."""
        for what, expected, found in (("model", self.model.get("sha256"), model_sha256), ("SAE", self.sae.get("sha256"), sae_sha256)):
            if expected and found and expected != found:
                raise InputFileError(
                    source, f"was made with the {what} whose weights have sha256 {expected[:12]}..., but the loaded {what} has {found[:12]}..."
                )

    def check_case(self, case_id: str, shape: tuple[int, ...], affine: np.ndarray, source: str | Path = "<recipe>") -> None:
        """Raise :class:`InputFileError` when the recipe's voxel grid is not the case's."""
        want = tuple(self.case.get("shape") or ())
        if want and want != tuple(shape):
            raise InputFileError(source, f"was made on a volume of shape {want} (case '{self.case.get('case_id')}'), this case '{case_id}' has {tuple(shape)}")
        if self.case.get("affine") is not None and not np.allclose(np.asarray(self.case["affine"]), affine, atol=1e-3):
            raise InputFileError(source, f"was made on another voxel grid than case '{case_id}' (affines differ)")


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file (:class:`RecipeDocument`: every edit and region is checked here, before the
    recipe is replayed).

    Raises:
        InputFileError: not JSON, not a recipe, an unsupported version, or a missing or malformed field (named).
    """
    path = Path(path)
    data = read_document(path, RECIPE_KIND, RECIPE_FORMAT_VERSION, RecipeDocument, "SegLens steering recipe", missing="recipe file not found")
    return Recipe(model=data["model"], sae=data["sae"], case=data["case"], edits=data["edits"], output=data.get("output") or {})
