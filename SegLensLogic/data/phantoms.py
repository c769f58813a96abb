"""Synthetic brain-tumour cases with exact labels, for the demo and tests on machines without real data.

A phantom is an ellipsoidal brain with a smoothly deformed outline, cortical grey matter, white matter,
cerebrospinal fluid and two ventricles, rendered as T1n, T1c, T2w and T2-FLAIR from a tissue contrast table,
with a smooth multiplicative bias field and noise. A tumour has three subregions: a necrotic core inside an
enhancing rim, surrounded by edema with an irregular border. Everything is deterministic from a seed and is
written in BraTS 2023 naming, so phantoms load like real cases.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from .cases import MODALITIES

# Relative signal of each tissue per modality (background, CSF, GM, WM, necrotic, edema, enhancing).
TISSUES = ("background", "csf", "grey matter", "white matter", "necrotic core", "edema", "enhancing tumour")
CONTRAST = {
    "t1n": (0.0, 0.30, 0.60, 0.80, 0.35, 0.55, 0.60),
    "t1c": (0.0, 0.30, 0.60, 0.80, 0.30, 0.55, 1.25),
    "t2w": (0.0, 1.00, 0.70, 0.50, 0.95, 0.90, 0.75),
    "t2f": (0.0, 0.15, 0.65, 0.50, 0.60, 1.00, 0.80),
}
# Tissue index -> BraTS 2023 label.
TISSUE_TO_LABEL = np.array([0, 0, 0, 0, 1, 2, 3], dtype=np.uint8)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return field / (np.abs(field).max() + 1e-8)


def make_phantom(
    shape: tuple[int, int, int] = (96, 96, 48),
    seed: int = 0,
    tumour: bool = True,
    noise: float = 0.03,
    bias: float = 0.15,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Render one phantom.

    Args:
        shape: volume shape ``(X, Y, Z)`` in RAS voxel order.
        seed: makes the anatomy, tumour, bias field and noise reproducible.
        tumour: add a tumour (False gives a healthy phantom).
        noise: Gaussian noise standard deviation relative to white-matter signal.
        bias: amplitude of the smooth multiplicative bias field.

    Returns:
        ``(images, labels)``: modality -> ``float32`` volume scaled to scanner-like units (white matter ~800),
        and BraTS 2023 labels ``uint8``.
    """
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    radii = np.array([0.78, 0.88, 0.80]) * rng.uniform(0.92, 1.05, 3)
    radius = np.sqrt(((grid / radii[:, None, None, None]) ** 2).sum(0))
    radius = radius * (1 + 0.06 * _smooth_noise(rng, shape, sigma=max(shape) / 8))
    tissue = np.zeros(shape, dtype=np.int64)
    tissue[radius < 1.0] = 1  # CSF shell
    tissue[radius < 0.93] = 2  # cortex
    tissue[radius < 0.78] = 3  # white matter
    for side in (-1, 1):  # lateral ventricles
        centre = np.array([0.12 * side, 0.05, 0.1])
        ventricle = (((grid - centre[:, None, None, None]) / np.array([0.07, 0.25, 0.12])[:, None, None, None]) ** 2).sum(0)
        tissue[ventricle < 1] = 1
    if tumour:
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        centre = direction * rng.uniform(0.2, 0.45) * radii
        size = rng.uniform(0.12, 0.22)
        distance = np.sqrt((((grid - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0)) / size
        distance = distance * (1 + 0.15 * _smooth_noise(rng, shape, sigma=max(shape) / 12))
        brain = tissue > 0
        tissue[(distance < rng.uniform(1.6, 2.2)) & brain] = 5
        tissue[(distance < 1.0) & brain] = 6
        tissue[(distance < rng.uniform(0.45, 0.7)) & brain] = 4
    labels = TISSUE_TO_LABEL[tissue]
    field = np.exp(bias * _smooth_noise(rng, shape, sigma=max(shape) / 4))
    images = {}
    for modality in MODALITIES:
        signal = np.asarray(CONTRAST[modality])[tissue] * field
        signal = signal + noise * rng.standard_normal(shape) * (tissue > 0)
        signal = ndimage.gaussian_filter(signal, 0.6) * (tissue > 0)
        images[modality] = (1000 * np.clip(signal, 0, None)).astype(np.float32)
    return images, labels


def write_phantom_case(folder: str | Path, case_id: str, images: dict[str, np.ndarray], labels: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> Path:
    """Write a phantom in BraTS 2023 naming, stored LPS like BraTS volumes (the affine says so)."""
    folder = Path(folder) / case_id
    folder.mkdir(parents=True, exist_ok=True)
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    flip = (slice(None, None, -1), slice(None, None, -1), slice(None))  # RAS arrays -> LPS voxel order
    for modality, image in images.items():
        nib.save(nib.Nifti1Image(image[flip], affine), str(folder / f"{case_id}-{modality}.nii.gz"))
    nib.save(nib.Nifti1Image(labels[flip], affine), str(folder / f"{case_id}-seg.nii.gz"))
    return folder


def write_phantom_cohort(out: str | Path, n: int, seed: int = 0, shape=(96, 96, 48), prefix: str = "SYN-GLI") -> Path:
    """Write ``n`` phantom cases (seeds ``seed`` ... ``seed + n - 1``) into ``out``; returns ``out``."""
    out = Path(out)
    for index in range(n):
        images, labels = make_phantom(shape=shape, seed=seed + index)
        write_phantom_case(out, f"{prefix}-{index:05d}-000", images, labels)
    return out
