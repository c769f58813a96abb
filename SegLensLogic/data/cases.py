"""Cases: one subject's co-registered MRI modalities and, when known, its label map.

A case is found in a folder by its file names (BraTS 2023 ``-t1n -t1c -t2w -t2f -seg``, BraTS 2017-2021
``_t1 _t1ce _t2 _flair _seg``, BraTS 2013 ``T1c_*``/``Flair_*``/``OTMultiClass``, FreeSurfer ``norm.mgz`` /
``aseg.mgz``), or given as an explicit mapping modality -> file. Modalities always carry their BraTS 2023 names:
``t1n`` (native T1), ``t1c`` (contrast-enhanced T1), ``t2w`` (T2) and ``t2f`` (T2-FLAIR).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputFileError
from .io import IMAGE_SUFFIXES, ImageData, image_suffix, read_image, read_label_array, strip_image_suffix
from .labels import ASEG, BRATS2013, BRATS2018, BRATS2023, LabelScheme, detect_tumour_scheme, get_scheme
from .modalities import MODALITIES, MODALITY_ALIASES, canonical_modality  # noqa: F401 (part of this module's API)



@dataclass
class Case:
    """Where one case's files are.

    Attributes:
        case_id: name of the case (folder name unless given).
        images: canonical modality -> image file, in the order of :data:`MODALITIES`.
        label: label map file (or ``archive.npz:key``), if any.
        label_scheme: scheme of the label file; None means detect it from the values.
        naming: which naming convention found the files (``brats2023``, ``brats2018``, ``brats2013``,
            ``freesurfer`` or ``explicit``), or ``arrays`` for a case built in memory (:func:`case_from_arrays`;
            its "files" are then ``<case_id>/<modality>`` names, not paths on disk).
        brain_mask: a brain-mask file shipped with the case, if any.
    """

    case_id: str
    images: dict[str, Path]
    label: Path | str | None = None
    label_scheme: str | None = None
    naming: str = "explicit"
    brain_mask: Path | None = None

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(m for m in MODALITIES if m in self.images)

    @property
    def folder(self) -> Path | None:
        """The folder of the case's files (its first image's), or None for a case with no image."""
        first = next(iter(self.images.values()), None)
        return None if first is None else Path(first).parent


@dataclass
class CaseImages:
    """A case read into memory, every array on the voxel grid of :attr:`reference`.

    Attributes:
        case: where it came from.
        images: modality -> ``float32`` array, shape ``(I, J, K)`` in file order.
        reference: the first modality's image, whose grid every output of this case takes.
        label: SegLens classes (``uint8``, shape ``(I, J, K)``), or None.
        label_scheme: the scheme the label file was read with.
        brain_mask: boolean mask from a shipped mask file, or None.
    """

    case: Case
    images: dict[str, np.ndarray]
    reference: ImageData = field(repr=False)
    label: np.ndarray | None = None
    label_scheme: LabelScheme | None = None
    brain_mask: np.ndarray | None = None

    @property
    def case_id(self) -> str:
        return self.case.case_id

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.reference.shape

    @property
    def affine(self) -> np.ndarray:
        return self.reference.affine


# Folder naming conventions: (name, pattern on the file stem -> role). Roles are modalities, "seg" or "mask".
# ``-aseg``: FreeSurfer structure labels of a healthy case in BraTS 2023 naming (synthetic healthy cohorts).
_BRATS2023 = re.compile(r"-(t1n|t1c|t2w|t2f|seg|aseg)$", re.IGNORECASE)
_BRATS2018 = re.compile(r"_(t1|t1ce|t2|flair|seg)$", re.IGNORECASE)
_BRATS2013 = re.compile(r"^(t1|t1c|t2|flair)_|^(otmulticlass|ot)$|^(brainmask|mask)$", re.IGNORECASE)
# A FreeSurfer mri/ folder holds several T1 stages; the first present of these is the case's T1.
_FREESURFER = {"norm": "t1n", "aseg": "seg", "brainmask": "mask"}
_FREESURFER_T1_FALLBACKS = ("t1", "orig")


def _role_2023(stem: str) -> str | None:
    m = _BRATS2023.search(stem)
    return None if m is None else m.group(1).lower()


def _role_2018(stem: str) -> str | None:
    m = _BRATS2018.search(stem)
    if m is None:
        return None
    key = m.group(1).lower()
    return "seg" if key == "seg" else canonical_modality(key)


def _role_2013(stem: str) -> str | None:
    m = _BRATS2013.search(stem)
    if m is None:
        return None
    if m.group(1):
        return canonical_modality(m.group(1))
    return "seg" if m.group(2) else "mask"


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and image_suffix(p) is not None)


def _match(files: list[Path], role_of) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in files:
        role = role_of(strip_image_suffix(path))
        if role is None:
            continue
        if role in found:
            raise InputFileError(path, f"second file for '{role}' in the case folder (first: {found[role].name})")
        found[role] = path
    return found


def find_case(folder: str | Path, case_id: str | None = None) -> Case:
    """Find a case's files in ``folder`` by their naming convention.

    Conventions are tried in this order: BraTS 2023, BraTS 2017-2021, BraTS 2013 (DeepMedic), FreeSurfer.

    Raises:
        InputFileError: the folder does not exist or no convention finds an image in it.
    """
    folder = Path(folder)
    try:
        if not folder.is_dir():
            raise InputFileError(folder, "case folder not found")
        files = _image_files(folder)
    except OSError as exc:  # a name too long, a folder we may not list
        raise InputFileError(folder, f"cannot be read as a case folder ({exc.strerror or exc})") from None
    conventions = (
        ("brats2023", _role_2023, BRATS2023.name),
        ("brats2018", _role_2018, BRATS2018.name),
        ("brats2013", _role_2013, BRATS2013.name),
        ("freesurfer", lambda stem: _FREESURFER.get(stem.lower()), ASEG.name),
    )
    for naming, role_of, scheme in conventions:
        found = _match(files, role_of)
        if naming == "freesurfer" and "t1n" not in found:
            stems = {strip_image_suffix(p).lower(): p for p in files}
            fallback = next((stems[name] for name in _FREESURFER_T1_FALLBACKS if name in stems), None)
            if fallback is not None:
                found["t1n"] = fallback
        images = {m: found[m] for m in MODALITIES if m in found}
        if images:
            if "seg" not in found and "aseg" in found:
                found["seg"], scheme = found["aseg"], ASEG.name
            return Case(
                case_id=case_id or folder.name,
                images=images,
                label=found.get("seg"),
                label_scheme=scheme,
                naming=naming,
                brain_mask=found.get("mask"),
            )
    names = ", ".join(p.name for p in files[:8]) or "no image files"
    raise InputFileError(
        folder,
        "no case found: expected BraTS 2023 (-t1n -t1c -t2w -t2f -seg), BraTS 2017-2021 (_t1 _t1ce _t2 _flair _seg), "
        f"BraTS 2013 (T1c_*, Flair_*, OTMultiClass) or FreeSurfer (norm.mgz, aseg.mgz) names; found {names}",
    )


def case_from_mapping(
    mapping: Mapping[str, str | Path],
    case_id: str | None = None,
    label_scheme: str | None = None,
    base: str | Path | None = None,
) -> Case:
    """Build a case from an explicit mapping ``{modality or 'seg' or 'mask': file}``.

    Modality names may be aliases (``t1ce``, ``flair``...). ``seg`` may be ``archive.npz:key``. Relative paths are
    taken from ``base``. ``label_scheme`` None means: detect the BraTS scheme from the label values.
    """
    base_path = Path(base) if base is not None else None
    images: dict[str, Path] = {}
    label = mask = None
    for key, value in mapping.items():
        path = Path(value) if base_path is None or Path(value).is_absolute() else base_path / value
        role = key.strip().lower()
        if role in ("seg", "label", "labels"):
            label = path if ".npz" not in str(path) else str(path)
        elif role in ("mask", "brainmask", "brain_mask"):
            mask = path
        else:
            modality = canonical_modality(role)
            if modality in images:
                raise ValueError(f"modality {modality} is given twice ({images[modality]} and {path})")
            images[modality] = path
    if not images:
        raise ValueError("the mapping names no image modality")
    if label_scheme is not None:
        get_scheme(label_scheme)
    ordered = {m: images[m] for m in MODALITIES if m in images}
    first = next(iter(ordered.values()))
    return Case(
        case_id=case_id or strip_image_suffix(first),
        images=ordered,
        label=label,
        label_scheme=label_scheme,
        naming="explicit",
        brain_mask=mask,
    )


def is_case_folder(folder: Path) -> bool:
    """True when :func:`find_case` would find a case in ``folder``."""
    try:
        find_case(folder)
    except InputFileError:
        return False
    return True


def read_case(
    case: Case | str | Path,
    modalities: tuple[str, ...] | list[str] | None = None,
    with_label: bool = True,
    allow_missing: bool = False,
) -> CaseImages:
    """Read a case's images (and label map) into memory and check they share one voxel grid.

    Args:
        case: a :class:`Case` or a case folder.
        modalities: the modalities to read (a model's inputs); None reads all the case has.
        with_label: also read and map the label file when the case has one.
        allow_missing: read those of ``modalities`` the case has (at least one) instead of refusing the case
            (for models trained to tolerate missing sequences; preprocessing fills the others).

    Returns:
        The arrays in file order on the first modality's grid, labels mapped to SegLens classes.

    Raises:
        InputFileError: a requested modality is missing, a file is unreadable, or the files are not on one grid.
    """
    if not isinstance(case, Case):
        case = find_case(case)
    wanted = tuple(case.modalities if modalities is None else (canonical_modality(m) for m in modalities))
    missing = [m for m in wanted if m not in case.images]
    if allow_missing and len(missing) < len(wanted):
        wanted, missing = tuple(m for m in wanted if m in case.images), []
    if missing:
        where = next(iter(case.images.values())).parent
        raise InputFileError(
            where,
            f"case '{case.case_id}' has no {', '.join(missing)} image (it has {', '.join(case.modalities) or 'none'})",
        )
    images: dict[str, np.ndarray] = {}
    reference: ImageData | None = None
    for modality in wanted:
        image = read_image(case.images[modality])
        if reference is None:
            reference = image
        elif not image.same_grid(reference):
            raise InputFileError(
                image.path,
                f"is not on the voxel grid of {reference.path.name} (shape {image.shape} vs {reference.shape}"
                + ("" if image.shape != reference.shape else ", different affine")
                + "); modalities must be co-registered",
            )
        images[modality] = image.array.astype(np.float32, copy=False)
    assert reference is not None
    label = scheme = mask = None
    if with_label and case.label is not None:
        label_image = read_label_array(case.label, reference)
        if not label_image.same_grid(reference):
            raise InputFileError(
                label_image.path,
                f"label map is not on the voxel grid of {reference.path.name} "
                f"(shape {label_image.shape} vs {reference.shape})",
            )
        scheme = get_scheme(case.label_scheme) if case.label_scheme else detect_tumour_scheme(label_image.array)
        label = scheme.apply(label_image.array, label_image.path)
    if case.brain_mask is not None:
        mask_image = read_image(case.brain_mask)
        if not mask_image.same_grid(reference):
            raise InputFileError(mask_image.path, f"brain mask is not on the voxel grid of {reference.path.name}")
        mask = mask_image.array > 0
    return CaseImages(case=case, images=images, reference=reference, label=label, label_scheme=scheme, brain_mask=mask)


def case_from_arrays(
    images: Mapping[str, np.ndarray],
    affine: np.ndarray,
    case_id: str,
    label: np.ndarray | None = None,
    label_scheme: str | None = None,
) -> CaseImages:
    """A case from arrays already in memory (a Slicer volume node, a viewer), without touching disk.

    Args:
        images: modality (or alias: ``t1ce``, ``flair``...) -> voxel array of shape ``(I, J, K)``, indexed ``[i, j, k]``
            (a Slicer ``arrayFromVolume`` array is ``[k, j, i]``: transpose it with ``.transpose(2, 1, 0)``).
        affine: ``(4, 4)`` IJK -> RAS transform in millimetres (Slicer's ``IJKToRAS`` matrix).
        case_id: name of the case; errors name ``<case_id>/<modality>``.
        label: optional label map ``(I, J, K)``, in ``label_scheme`` (None: detect the BraTS scheme from its values).

    Returns:
        A :class:`CaseImages` whose reference grid is ``(first modality's shape, affine)``; images are ``float32``.

    Raises:
        InputFileError: unknown modality, an array that is not 3D, not numeric, holds NaN/Inf or has another shape
            than the first, or an affine that is not a finite invertible 4x4 matrix.
    """
    if not images:
        raise InputFileError(Path(case_id), "no image given; a case needs at least one modality")
    source = Path(case_id)
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputFileError(source, f"IJK-to-RAS matrix must be a finite invertible 4x4 matrix, got shape {affine.shape}")
    arrays: dict[str, np.ndarray] = {}
    for name, array in images.items():
        try:
            modality = canonical_modality(name)
        except ValueError as exc:
            raise InputFileError(source / name, str(exc)) from None
        array = np.asarray(array)
        where = source / modality
        if array.ndim != 3:
            raise InputFileError(where, f"is a {array.ndim}D array of shape {tuple(array.shape)}; SegLens needs a 3D volume")
        if array.dtype.kind not in "biuf":
            raise InputFileError(where, f"has voxels of type {array.dtype}; SegLens needs numbers")
        if modality in arrays:
            raise InputFileError(where, "given twice (under two names)")
        if arrays and array.shape != next(iter(arrays.values())).shape:
            first = next(iter(arrays))
            raise InputFileError(where, f"has shape {array.shape} but {first} has {next(iter(arrays.values())).shape}; modalities must share one grid")
        values = array.astype(np.float32, copy=False)
        if not np.isfinite(values).all():
            raise InputFileError(where, f"has {int((~np.isfinite(values)).sum())} NaN or Inf voxels")
        arrays[modality] = values
    ordered = {m: arrays[m] for m in MODALITIES if m in arrays}
    first = next(iter(ordered.values()))
    reference = ImageData(array=first, affine=affine, path=source / next(iter(ordered)))
    mapped = scheme = None
    if label is not None:
        label = np.asarray(label)
        if label.shape != first.shape:
            raise InputFileError(source / "label", f"has shape {label.shape} but the images have {first.shape}")
        scheme = get_scheme(label_scheme) if label_scheme else detect_tumour_scheme(label)
        mapped = scheme.apply(label, source / "label")
    case = Case(case_id=case_id, images={m: source / m for m in ordered}, label_scheme=label_scheme, naming="arrays")
    return CaseImages(case=case, images=ordered, reference=reference, label=mapped, label_scheme=scheme)


__all__ = [
    "MODALITIES",
    "IMAGE_SUFFIXES",
    "Case",
    "CaseImages",
    "canonical_modality",
    "case_from_arrays",
    "case_from_mapping",
    "find_case",
    "is_case_folder",
    "read_case",
]
