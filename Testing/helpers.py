"""Helpers for SegLens tests: small synthetic images and case folders written with nibabel / SimpleITK.

Importable from any test module (``from helpers import make_nifti``): pytest puts ``Testing/`` on ``sys.path``
because it has a ``conftest.py`` and no ``__init__.py``.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

# BraTS 2023 modality suffixes and the BraTS 2017-2021 names of the same modalities.
MODALITIES_2023 = ("t1n", "t1c", "t2w", "t2f")
NAMES_2018 = {"t1n": "t1", "t1c": "t1ce", "t2w": "t2", "t2f": "flair", "seg": "seg"}

SYNTHETIC_SHAPE = (48, 40, 24)
SYNTHETIC_SPACING = (1.2, 0.9, 2.5)
# Axial slices (file axis 2, which is inferior -> superior) that hold brain in a synthetic case; the others are empty.
SYNTHETIC_BRAIN_SLICES = (3, 21)  # [start, stop)


def brain_slices(depth: int) -> tuple[int, int]:
    """``[start, stop)`` of the brain's axial slices in a synthetic volume ``depth`` slices deep."""
    return round(depth * SYNTHETIC_BRAIN_SLICES[0] / 24), round(depth * SYNTHETIC_BRAIN_SLICES[1] / 24)


def make_nifti(
    path: str | Path,
    array: np.ndarray,
    affine: np.ndarray | None = None,
    qform_code: int = 1,
    sform_code: int = 1,
) -> Path:
    """Write ``array`` as a NIfTI-1 file with ``affine`` in both qform and sform (as scanners write them)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    image = nib.Nifti1Image(np.asarray(array), affine)
    image.set_qform(affine, code=qform_code)
    image.set_sform(affine, code=sform_code)
    nib.save(image, str(path))
    return path


def rotation(angles_deg: tuple[float, float, float]) -> np.ndarray:
    """Rotation matrix Rz @ Ry @ Rx for angles in degrees about x, y, z."""
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def oblique_affine(
    spacing: tuple[float, float, float] = SYNTHETIC_SPACING,
    flips: tuple[int, int, int] = (-1, -1, 1),
    angles_deg: tuple[float, float, float] = (12.0, -8.0, 6.0),
    origin: tuple[float, float, float] = (31.5, -22.25, -17.75),
) -> np.ndarray:
    """A voxel->RAS affine with anisotropic spacing, axis flips (LPS-like by default) and a small rotation.

    The rotation is small enough that the closest axis codes stay those of the flips: ``('L', 'P', 'S')``.
    """
    affine = np.eye(4)
    affine[:3, :3] = rotation(angles_deg) @ np.diag(np.asarray(flips, float) * np.asarray(spacing, float))
    affine[:3, 3] = origin
    return affine


def lps_affine(spacing=(1.0, 1.0, 1.0), origin=(0.0, 239.0, 0.0)) -> np.ndarray:
    """Axis-aligned LPS affine, as BraTS files have."""
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = origin
    return affine


def lia_affine(shape=(256, 256, 256)) -> np.ndarray:
    """FreeSurfer's conformed LIA affine (1 mm, centred), as ``norm.mgz`` has."""
    affine = np.array([[-1.0, 0, 0, 0], [0, 0, 1.0, 0], [0, -1.0, 0, 0], [0, 0, 0, 1]])
    affine[:3, 3] = -affine[:3, :3] @ (np.asarray(shape, float) / 2)
    return affine


def synthetic_arrays(
    shape: tuple[int, int, int] = SYNTHETIC_SHAPE,
    seed: int = 0,
    label_values: tuple[int, int, int] = (1, 2, 3),
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Four skull-stripped ``int16`` modalities and a tumour label map on ``shape``.

    The brain is an ellipsoid confined to axial slices :func:`brain_slices` (``SYNTHETIC_BRAIN_SLICES`` for a depth
    of 24; background is 0 outside);
    the tumour is edema (``label_values[1]``) around a core split into necrosis (``label_values[0]``) and
    enhancing tumour (``label_values[2]``).
    """
    rng = np.random.default_rng(seed)
    i, j, k = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij")
    k0, k1 = brain_slices(shape[2])
    ci, cj, ck = (shape[0] - 1) / 2, (shape[1] - 1) / 2, (k0 + k1 - 1) / 2
    ri, rj, rk = 0.42 * shape[0], 0.42 * shape[1], (k1 - k0) / 2
    brain = ((i - ci) / ri) ** 2 + ((j - cj) / rj) ** 2 + ((k - ck) / rk) ** 2 <= 1.0
    brain &= (k >= k0) & (k < k1)
    # Tumour off-centre, inside the brain.
    ti, tj, tk = ci + 0.15 * shape[0], cj - 0.1 * shape[1], ck
    rt = max((k1 - k0) / 4.5, 1.0)
    d = np.sqrt(((i - ti) / (0.2 * shape[0])) ** 2 + ((j - tj) / (0.2 * shape[1])) ** 2 + ((k - tk) / rt) ** 2)
    seg = np.zeros(shape, dtype=np.uint8)
    seg[(d <= 1.0) & brain] = label_values[1]
    seg[(d <= 0.6) & brain & (i < ti)] = label_values[0]
    seg[(d <= 0.6) & brain & (i >= ti)] = label_values[2]
    images = {}
    for n, modality in enumerate(MODALITIES_2023):
        tissue = 300.0 + 80.0 * n + 40.0 * np.sin(i / 5.0 + n) + 30.0 * np.cos(j / 7.0)
        tumour = np.where(seg > 0, 150.0 * (1 + (seg == label_values[2])), 0.0)
        noise = rng.normal(0.0, 15.0, shape)
        values = np.where(brain, tissue + tumour + noise, 0.0)
        images[modality] = np.clip(np.round(values), 0, 32767).astype(np.int16)
    return images, seg


def case_file_name(case_id: str, role: str, naming: str = "brats2023", suffix: str = ".nii.gz") -> str:
    """File name of ``role`` (a BraTS 2023 modality or ``seg``) under a naming convention."""
    if naming == "brats2023":
        return f"{case_id}-{role}{suffix}"
    if naming == "brats2018":
        return f"{case_id}_{NAMES_2018[role]}{suffix}"
    raise ValueError(f"unknown naming {naming}")


def write_synthetic_case(
    root: str | Path,
    case_id: str = "BraTS-SYN-00001-000",
    *,
    naming: str = "brats2023",
    shape: tuple[int, int, int] = SYNTHETIC_SHAPE,
    affine: np.ndarray | None = None,
    modalities: tuple[str, ...] = MODALITIES_2023,
    seg: bool | np.ndarray = True,
    label_values: tuple[int, int, int] | None = None,
    replace: dict[str, np.ndarray] | None = None,
    seed: int = 0,
) -> Path:
    """Write a synthetic case folder ``root/case_id`` and return it.

    Args:
        naming: ``brats2023`` (``<id>-t1n.nii.gz`` ...) or ``brats2018`` (``<id>_t1.nii.gz`` ...).
        affine: voxel->RAS affine; default :func:`oblique_affine` (oblique, anisotropic, LPS-like).
        modalities: which of the four modalities to write (BraTS 2023 names).
        seg: write the label map (True), not (False), or write this array as the label map.
        label_values: the file labels of (necrosis, edema, enhancing); default (1, 2, 3) for 2023 naming and
            (1, 2, 4) for 2018 naming.
        replace: role -> array written instead of the synthetic one (for broken inputs).
    """
    folder = Path(root) / case_id
    folder.mkdir(parents=True, exist_ok=True)
    affine = oblique_affine() if affine is None else affine
    if label_values is None:
        label_values = (1, 2, 4) if naming == "brats2018" else (1, 2, 3)
    images, labels = synthetic_arrays(shape, seed=seed, label_values=label_values)
    replace = replace or {}
    for modality in modalities:
        make_nifti(folder / case_file_name(case_id, modality, naming), replace.get(modality, images[modality]), affine)
    if seg is not False:
        labels = seg if isinstance(seg, np.ndarray) else replace.get("seg", labels)
        make_nifti(folder / case_file_name(case_id, "seg", naming), labels, affine)
    return folder


def nifti_to_sitk(src: str | Path, dst: str | Path) -> Path:
    """Convert an image file with SimpleITK (``ReadImage`` then ``WriteImage``), e.g. NIfTI -> ``.nrrd``."""
    import SimpleITK as sitk

    sitk.WriteImage(sitk.ReadImage(str(src)), str(dst))
    return Path(dst)


def nifti_to_mgz(src: str | Path, dst: str | Path) -> Path:
    """Convert a NIfTI file to FreeSurfer ``.mgz`` with nibabel."""
    image = nib.load(str(src))
    nib.save(nib.MGHImage(np.asanyarray(image.dataobj), image.affine), str(dst))
    return Path(dst)


def seglens(capsys, *args) -> tuple[int, str, str]:
    """Run ``seglens ARGS`` in-process; returns (exit code, stdout, stderr)."""
    from SegLensLogic.app import cli

    capsys.readouterr()
    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as exc:  # argparse: --help, usage errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *fragments) -> str:
    """Exit status 2, exactly one stderr line ``seglens: error: ...`` holding every fragment, no traceback."""
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("seglens: error: "), err
    for fragment in fragments:
        assert str(fragment) in lines[0], (fragment, lines[0])
    return lines[0]


TINY_UNET_FEATURES = [8, 8, 16, 32, 64, 8]


def save_tiny_unet(folder: Path, modalities, seed: int = 0) -> Path:
    """A randomly initialised tiny U-Net (64 px, BraTS 2023 classes) saved as a model folder."""
    import torch

    from SegLensLogic.data.labels import TUMOUR_CLASSES
    from SegLensLogic.networks import SegmenterConfig, build_segmenter

    torch.manual_seed(seed)
    config = SegmenterConfig(
        arch="unet",
        modalities=list(modalities),
        class_names=list(TUMOUR_CLASSES),
        image_size=64,
        arch_options={"features": list(TINY_UNET_FEATURES)},
    )
    return build_segmenter(config).save_pretrained(folder)


def align_with_half_replaced(capsys, sae_dir: Path, tmp_path: Path, seed: int = 0) -> Path:
    """A second 'population' SAE: ``sae_dir``'s with the first half of its dictionary replaced by random
    directions; aligned with the original by ``seglens align``. Returns the alignment file (latents of the first
    half come out population-specific, the second half shared)."""
    import torch

    from SegLensLogic.sae import BatchTopKSAE

    other = BatchTopKSAE.load(sae_dir)
    half = other.d_sae // 2
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        other.W_enc[:, :half] = torch.randn(other.config.d_in, half, generator=generator)
        other.W_dec[:half] = torch.nn.functional.normalize(torch.randn(half, other.config.d_in, generator=generator), dim=1)
    # Another population's SAE records its own cohort (an alignment within one cohort is not a population shift).
    other.config.training = {**(other.config.training or {}), "cohort": "half-replaced"}
    other.save(tmp_path / "other-sae")
    alignment = tmp_path / "alignment.json"
    code, _, err = seglens(capsys, "align", sae_dir, tmp_path / "other-sae", "--out", alignment)
    assert code == 0, err
    return alignment
