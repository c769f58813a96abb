"""Where the shipped reference bundle lives.

The bundle sits in the repository's top-level ``Resources/`` folder (the Slicer extension installs it beside
the module). ``$SEGLENS_RESOURCES`` points elsewhere (an installed wheel, a shared drive).
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import SegLensError

REFERENCE_BUNDLE_NAME = "adult-glioma-segformer"


def resources_folder() -> Path:
    """``$SEGLENS_RESOURCES`` if set, else ``Resources/`` at the top of the source tree."""
    configured = os.environ.get("SEGLENS_RESOURCES")
    return Path(configured) if configured else Path(__file__).resolve().parents[1] / "Resources"


def reference_bundle_path(required: bool = True) -> Path | None:
    """The shipped adult-glioma bundle's folder.

    Raises:
        SegLensError: ``required`` and the bundle is not there (a wheel install without ``Resources/``).
    """
    folder = resources_folder() / REFERENCE_BUNDLE_NAME
    if (folder / "bundle.json").is_file():
        return folder
    if required:
        raise SegLensError(
            f"the reference bundle is not at {folder}; give a model or bundle explicitly, or set SEGLENS_RESOURCES "
            "to the folder that holds it"
        )
    return None


def shipped_bundles() -> list[Path]:
    """Every bundle folder in the resources folder (the reference first, then by name): what a user can choose from
    without looking for a folder (e.g. the reference SegFormer and U-Net)."""
    folder = resources_folder()
    if not folder.is_dir():
        return []
    found = sorted(p for p in folder.iterdir() if (p / "bundle.json").is_file())
    return sorted(found, key=lambda p: p.name != REFERENCE_BUNDLE_NAME)
