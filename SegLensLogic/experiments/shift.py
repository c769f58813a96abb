"""A second population made by degrading real cases: lower signal-to-noise and a stronger bias field.

These are *degraded copies* of the given cases (same anatomy and labels), a stand-in for a lower-field or
differently tuned site (the paper's SSA cohort), not real cases of another population; results on them must be
labelled as such. (``seglens degrade --preset ssa`` of the data package is the fuller version.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from ..data.cases import read_case
from ..data.cohort import Cohort, load_cohort
from ..data.io import write_image


def degrade_images(images: dict[str, np.ndarray], noise: float = 0.1, bias: float = 0.3, seed: int = 0) -> dict[str, np.ndarray]:
    """Add Gaussian noise (``noise`` x the image's foreground standard deviation) and multiply by a smooth random
    bias field ``exp(bias * f)``, ``f`` in [-1, 1], shared across modalities (as a receive coil's is)."""
    rng = np.random.default_rng(seed)
    shape = next(iter(images.values())).shape
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=max(shape) / 6)
    field = np.exp(bias * field / (np.abs(field).max() + 1e-8))
    out = {}
    for modality, image in images.items():
        foreground = image[image > 0]
        std = float(foreground.std()) if foreground.size else 1.0
        noisy = image * field + noise * std * rng.standard_normal(shape)
        out[modality] = np.where(image != 0, noisy, 0).astype(np.float32)  # background stays background
    return out


def degrade_cohort(cohort: Cohort, out: str | Path, noise: float = 0.1, bias: float = 0.3, seed: int = 0, overwrite: bool = False) -> Path:
    """Write a degraded copy of every labelled case of ``cohort`` into ``out`` (BraTS 2023 naming, same voxel grid,
    labels in the 2023 scheme, case ids suffixed ``-degraded``); returns ``out``, loadable with ``load_cohort``."""
    out = Path(out)
    for index, case in enumerate(cohort):
        images = read_case(case)
        if images.label is None:
            continue
        case_id = f"{case.case_id}-degraded"
        folder = out / case_id
        folder.mkdir(parents=True, exist_ok=True)
        for modality, array in degrade_images(images.images, noise, bias, seed + index).items():
            write_image(array, images.reference, folder / f"{case_id}-{modality}.nii.gz", overwrite=overwrite, dtype=np.float32)
        write_image(images.label, images.reference, folder / f"{case_id}-seg.nii.gz", overwrite=overwrite, dtype=np.uint8)
    load_cohort(out)  # fails loudly if nothing usable was written
    return out
