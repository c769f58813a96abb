"""Reading and writing medical images on their exact voxel grid.

An image is a 3D array indexed ``[i, j, k]`` plus the 4x4 affine that maps voxel indices to RAS world
coordinates in millimetres (nibabel's convention). NIfTI (``.nii``, ``.nii.gz``) and FreeSurfer ``.mgz`` are read
with nibabel; NRRD (``.nrrd``, ``.nhdr``) and MetaImage (``.mha``, ``.mhd``) with SimpleITK, whose LPS geometry is
converted to the same RAS affine. Label maps from ``.npz`` archives (``file.npz:key``) borrow the grid of a
reference image. Outputs are written atomically and never replace an existing file unless asked to.
"""

from __future__ import annotations

import os
import re
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from ..errors import InputFileError
# Atomic writes, JSON and weights folders live in the storage ground floor; re-exported here for their many users.
from ..storage import (  # noqa: F401
    atomic_target,
    atomic_write_bytes,
    atomic_write_text,
    file_sha256,
    publish_file,
    read_json,
    read_weights_folder,
    write_weights_folder,
)

NIBABEL_SUFFIXES = (".nii.gz", ".nii", ".mgz", ".mgh")
SITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
IMAGE_SUFFIXES = NIBABEL_SUFFIXES + SITK_SUFFIXES

# Grids that differ by less than this (mm, or unitless for direction cosines) are the same grid: scanners and
# converters round affines differently in the last float digits.
AFFINE_TOLERANCE = 1e-3


@dataclass
class ImageData:
    """A 3D image on its voxel grid.

    Attributes:
        array: voxel values, shape ``(I, J, K)``, as stored in the file (no reorientation).
        affine: ``(4, 4)`` voxel-to-RAS-world transform in millimetres.
        path: the file it came from.
        header: the NIfTI header when the file was NIfTI, reused on output so that qform/sform codes survive.
    """

    array: np.ndarray
    affine: np.ndarray
    path: Path
    header: nib.Nifti1Header | None = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along each array axis."""
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))

    def same_grid(self, other: "ImageData") -> bool:
        """True when both images have the same shape and (to :data:`AFFINE_TOLERANCE`) the same affine."""
        return self.shape == other.shape and np.allclose(self.affine, other.affine, atol=AFFINE_TOLERANCE)


def image_suffix(path: str | Path) -> str | None:
    """The recognised image suffix of ``path`` (``.nii.gz`` counts as one), or None."""
    name = str(path).lower()
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return None


def strip_image_suffix(path: str | Path) -> str:
    """File name of ``path`` without its image suffix (``case_t1.nii.gz`` -> ``case_t1``)."""
    name = Path(path).name
    suffix = image_suffix(name)
    return name[: -len(suffix)] if suffix else name


def _read_sitk(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    if image.GetDimension() != 3:
        raise InputFileError(path, f"is a {image.GetDimension()}D image; SegLens needs a 3D volume")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputFileError(path, "holds vector voxels; SegLens needs one value per voxel")
    # SimpleITK arrays are indexed [k, j, i]; nibabel's convention (and ours) is [i, j, k].
    array = np.ascontiguousarray(sitk.GetArrayFromImage(image).transpose(2, 1, 0))
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    spacing = np.array(image.GetSpacing(), dtype=np.float64)
    origin = np.array(image.GetOrigin(), dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :3] = direction * spacing[None, :]
    affine[:3, 3] = origin
    # ITK world space is LPS; nibabel's is RAS.
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    return array, affine


def _reader_message(exc: BaseException, path: Path) -> str:
    """A reader's complaint on one line: SimpleITK's exceptions span lines and repeat the C++ source location."""
    text = str(exc)
    if "ERROR:" in text:  # ITK: "Exception thrown in ... file.cxx:99: sitk::ERROR: Reader(0x55...): message"
        text = re.sub(r"^\s*\w+\(0x[0-9a-fA-F]+\):\s*", "", text.rsplit("ERROR:", 1)[1])
    text = " ".join(text.replace(f'"{path}"', path.name).replace(str(path), path.name).split())
    return text[:300] or type(exc).__name__


def read_image(path: str | Path) -> ImageData:
    """Read a 3D image and check that every voxel is a finite number.

    Args:
        path: a NIfTI, MGZ, NRRD or MetaImage file.

    Returns:
        The image with its array in file order, shape ``(I, J, K)``, and its voxel-to-RAS affine.

    Raises:
        InputFileError: the file is missing, corrupt or truncated, not 3D, or holds NaN or Inf voxels.
    """
    path = Path(path)
    suffix = image_suffix(path)
    if suffix is None:
        raise InputFileError(path, f"unsupported image format; use one of {', '.join(IMAGE_SUFFIXES)}")
    if not path.is_file():
        raise InputFileError(path, "file not found")
    header = None
    if suffix in SITK_SUFFIXES:
        try:
            with open(path, "rb") as handle:
                magic = handle.read(2)
        except OSError as exc:
            raise InputFileError(path, f"cannot be read ({exc.strerror or exc})") from None
        if magic == b"\x1f\x8b":
            raise InputFileError(path, f"is gzip-compressed, which {suffix} files are not; decompress it (gunzip) or give the file its real name")
    try:
        if suffix in NIBABEL_SUFFIXES:
            image = nib.load(str(path))
            array = np.asanyarray(image.dataobj)
            affine = np.asarray(image.affine, dtype=np.float64)
            if type(image) is nib.Nifti1Image:
                header = image.header.copy()
        else:
            array, affine = _read_sitk(path)
    except InputFileError:
        raise
    except (EOFError, OSError, zlib.error, ValueError, RuntimeError, nib.filebasedimages.ImageFileError) as exc:
        raise InputFileError(path, f"cannot be read as an image, it may be corrupt or truncated ({_reader_message(exc, path)})") from None
    if array.ndim == 4 and array.shape[3] == 1:  # a 3D volume stored with a singleton time axis
        array = array[..., 0]
    if array.ndim != 3:
        raise InputFileError(path, f"is a {array.ndim}D image of shape {tuple(array.shape)}; SegLens needs a 3D volume")
    if array.dtype.kind not in "biuf":
        raise InputFileError(path, f"has voxels of type {array.dtype}; SegLens needs numbers")
    if array.dtype.kind == "f":
        bad = ~np.isfinite(array)
        if bad.any():
            raise InputFileError(path, f"has {int(bad.sum())} NaN or Inf voxels")
        # Values SegLens computes with in float32 (an integer image scaled by a huge scl_slope lands here).
        if array.size and float(np.abs(array).max()) > float(np.finfo(np.float32).max):
            raise InputFileError(path, "has voxel values beyond the float32 range (check its intensity scaling, e.g. scl_slope)")
    return ImageData(array=np.asarray(array), affine=affine, path=path, header=header)


def read_label_array(spec: str | Path, reference: ImageData) -> ImageData:
    """Read a label map, either an image file or ``archive.npz:key`` on the grid of ``reference``.

    ``.npz`` archives are opened without pickle support, so they can only hold plain arrays.
    """
    spec_str = str(spec)
    at = spec_str.lower().find(".npz")
    if at >= 0:
        path = Path(spec_str[: at + 4])
        key = spec_str[at + 4 :].lstrip(":") or "seg"
        if not path.is_file():
            raise InputFileError(path, "file not found")
        try:
            with np.load(path, allow_pickle=False) as archive:
                if key not in archive.files:
                    raise InputFileError(path, f"has no array '{key}' (it has: {', '.join(archive.files)})")
                array = np.asarray(archive[key])
        except InputFileError:
            raise
        except (OSError, ValueError, zlib.error, EOFError) as exc:
            raise InputFileError(path, f"cannot be read as a .npz archive ({exc})") from None
        if array.shape != reference.shape:
            raise InputFileError(
                path, f"array '{key}' has shape {array.shape} but the image {reference.path.name} has {reference.shape}"
            )
        return ImageData(array=array, affine=reference.affine, path=path, header=reference.header)
    return read_image(spec)


def write_image(
    array: np.ndarray, like: ImageData, path: str | Path, overwrite: bool = False, dtype: np.dtype | None = None
) -> Path:
    """Write ``array`` as NIfTI on exactly the voxel grid of ``like``.

    Args:
        array: shape ``like.shape``, in the same (file) voxel order as ``like.array``.
        like: the image whose grid (shape, spacing, orientation, origin) the output takes.
        path: output file ending in ``.nii`` or ``.nii.gz``.
        overwrite: replace an existing file; without it an existing file raises :class:`OutputExistsError`.
        dtype: storage type; defaults to the array's.
    """
    path = Path(path)
    if image_suffix(path) not in (".nii", ".nii.gz"):
        raise InputFileError(path, "outputs are written as NIfTI; name the file .nii.gz or .nii")
    if tuple(array.shape) != like.shape:
        raise ValueError(f"array of shape {array.shape} does not match the grid {like.shape} of {like.path}")
    atomic_target(path, overwrite)
    data = np.asarray(array, dtype=dtype or array.dtype)
    if like.header is not None:
        header = like.header.copy()
        header.set_data_dtype(data.dtype)
        # Intensity scaling of the source image must not apply to labels or maps.
        header.set_slope_inter(1.0, 0.0)
        image = nib.Nifti1Image(data, like.affine, header=header)
        image.set_qform(like.affine, code=int(like.header["qform_code"]) or 1)
        image.set_sform(like.affine, code=int(like.header["sform_code"]) or 1)
    else:
        image = nib.Nifti1Image(data, like.affine)
        image.set_qform(like.affine, code=1)
        image.set_sform(like.affine, code=1)
    suffix = image_suffix(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        nib.save(image, tmp)
        publish_file(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
