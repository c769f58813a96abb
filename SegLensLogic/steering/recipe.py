"""Steering recipes: a JSON document that reproduces a corrected mask bit for bit.

A recipe names the segmenter and the SAE by the SHA-256 of their weights, the case by its id and voxel grid, and
lists the edits in the order they were applied (latents, mode, alpha, where, region; for swaps the second SAE's
hash and the partner latents). ``seglens steer --model M --sae S --case C --recipe R.json --out mask.nii.gz``
replays it; a recipe is written next to every corrected mask (``mask.nii.gz`` -> ``mask.recipe.json``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..data.io import atomic_write_text, read_json
from ..data.io import strip_image_suffix
from ..errors import InputFileError, SegLensError
from ..sae.model import BatchTopKSAE
from .interventions import LatentEdit, Region

RECIPE_KIND = "seglens-steering-recipe"
RECIPE_FORMAT_VERSION = 1


def recipe_path_for(mask_path: str | Path) -> Path:
    """Where the recipe of a corrected mask lives: ``corrected.nii.gz`` -> ``corrected.recipe.json``."""
    mask_path = Path(mask_path)
    return mask_path.with_name(strip_image_suffix(mask_path) + ".recipe.json")


def edit_to_json(edit: LatentEdit, swap_sha256: str | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {
        "latents": list(edit.latents),
        "mode": edit.mode,
        "alpha": edit.alpha,
        "where": edit.where,
        "region": edit.region.to_json(),
    }
    if edit.mode == "swap":
        data["swap"] = {"sae_sha256": swap_sha256, "partners": list(edit.partners or ())}
    return data


def edit_from_json(data: Any, source: str | Path, swap_saes: dict[str, BatchTopKSAE] | None = None) -> LatentEdit:
    """An edit from its JSON form; swaps look their second SAE up by hash in ``swap_saes``."""
    if not isinstance(data, dict) or "latents" not in data or "mode" not in data:
        raise InputFileError(source, f"an edit must be an object with 'latents' and 'mode', got {data!r:.80}")
    try:
        region = Region.from_json(data.get("region", {"kind": "volume"}))
    except (KeyError, TypeError, ValueError) as exc:
        raise InputFileError(source, f"malformed region {data.get('region')!r:.80} ({exc})") from None
    except SegLensError as exc:
        raise InputFileError(source, str(exc)) from None
    swap_sae, partners = None, None
    if data["mode"] == "swap":
        swap = data.get("swap") or {}
        partners = tuple(swap.get("partners", ()))
        sha = swap.get("sae_sha256")
        swap_sae = (swap_saes or {}).get(sha)
        if swap_sae is None:
            raise InputFileError(source, f"a swap edit needs the second SAE with weights sha256 {sha}; give it with --swap-sae")
    try:
        return LatentEdit(
            latents=tuple(int(j) for j in data["latents"]),
            mode=str(data["mode"]),
            alpha=float(data.get("alpha", 1.0)),
            where=str(data.get("where", "active")),
            region=region,
            swap_sae=swap_sae,
            partners=partners,
        )
    except (TypeError, ValueError) as exc:
        raise InputFileError(source, f"malformed edit {data!r:.80} ({exc})") from None


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
    """Read and validate a recipe file.

    Raises:
        InputFileError: not JSON, not a recipe, an unsupported version or missing fields.
    """
    path = Path(path)
    if not path.is_file():
        raise InputFileError(path, "recipe file not found")
    data = read_json(path)
    if not isinstance(data, dict) or data.get("kind") != RECIPE_KIND:
        raise InputFileError(path, f"is not a SegLens steering recipe (expected \"kind\": \"{RECIPE_KIND}\")")
    if data.get("format_version") != RECIPE_FORMAT_VERSION:
        raise InputFileError(path, f"recipe format_version {data.get('format_version')} is not supported (this SegLens reads {RECIPE_FORMAT_VERSION})")
    missing = [k for k in ("model", "sae", "case", "edits") if k not in data]
    if missing:
        raise InputFileError(path, f"recipe lacks {', '.join(missing)}")
    if not isinstance(data["edits"], list):
        raise InputFileError(path, "'edits' must be a list")
    return Recipe(model=data["model"], sae=data["sae"], case=data["case"], edits=data["edits"], output=data.get("output") or {})
