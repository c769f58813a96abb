"""Preprocessing a case for a slice-wise segmenter, and the inverse mapping back to the input's grid.

The way a volume travels (design notes): reorient to RAS so that axis 2 is inferior -> superior and axial slices
are ``[:, :, k]``; build a brain mask; z-score each modality inside the brain; pad each axial slice to a square
and resize it to the model size. :class:`SliceGeometry` inverts the in-plane step and :class:`PreparedCase`
inverts the reorientation, so every mask or map lands on the input's exact voxel grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ..errors import InputFileError
from .cases import CaseImages

_RAS = nib.orientations.axcodes2ornt(("R", "A", "S"))


@dataclass(frozen=True)
class Orientation:
    """Axis permutation and flips between an image's file order and RAS order (no resampling)."""

    to_ras: np.ndarray
    from_ras: np.ndarray

    @classmethod
    def of(cls, affine: np.ndarray) -> "Orientation":
        ornt = nib.orientations.io_orientation(affine)
        return cls(nib.orientations.ornt_transform(ornt, _RAS), nib.orientations.ornt_transform(_RAS, ornt))

    def apply(self, array: np.ndarray) -> np.ndarray:
        """File order -> RAS order; the first three axes are reoriented, trailing axes kept."""
        return np.ascontiguousarray(nib.orientations.apply_orientation(array, self.to_ras))

    def invert(self, array: np.ndarray) -> np.ndarray:
        """RAS order -> file order."""
        return np.ascontiguousarray(nib.orientations.apply_orientation(array, self.from_ras))

    def ras_view(self, array: np.ndarray) -> np.ndarray:
        """A file-order array seen in RAS order, without a copy: writing to the view writes to ``array``."""
        return nib.orientations.apply_orientation(array, self.to_ras)


def brain_mask_from_images(images: list[np.ndarray]) -> np.ndarray:
    """A brain mask from skull-stripped (or background-constant) images.

    A voxel is brain when any modality differs from its background value. The background value is the image
    minimum when it fills at least 10 % of the volume (skull-stripped data: 0, or a constant after z-scoring);
    otherwise a modality is thresholded at Otsu's level. Holes are filled slice by slice, so dark necrotic
    cores inside the brain stay in the mask.

    Args:
        images: arrays of one shape ``(X, Y, Z)``.

    Returns:
        Boolean array ``(X, Y, Z)``.
    """
    # In the images' own memory order (a file's arrays are Fortran-ordered, each axial slice contiguous), so the
    # comparisons stream through memory and the slice-wise hole filling reads contiguous slices; C order at the end.
    mask = np.zeros_like(images[0], dtype=bool)
    for image in images:
        low = image.min()
        if np.count_nonzero(image == low) >= 0.1 * image.size:
            mask |= image > low
        else:
            mask |= image > _otsu_threshold(image)
    for k in range(mask.shape[2]):
        if mask[:, :, k].any():
            mask[:, :, k] = ndimage.binary_fill_holes(mask[:, :, k])
    return np.ascontiguousarray(mask)


def _otsu_threshold(image: np.ndarray, bins: int = 256) -> float:
    hist, edges = np.histogram(image, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(hist)
    weight_high = weight_low[-1] - weight_low
    mean_low = np.cumsum(hist * centres) / np.maximum(weight_low, 1)
    total = (hist * centres).sum()
    mean_high = (total - np.cumsum(hist * centres)) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(centres[int(np.argmax(between))])


def zscore_in_mask(image: np.ndarray, mask: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``(image - mean) / std`` over the mask's voxels; 0 outside the mask. Returns ``float32`` (``out`` when
    given: a float32 array of the image's shape, overwritten)."""
    if out is None:
        out = np.zeros(image.shape, dtype=np.float32)
    else:
        out[...] = 0
    if not mask.any():
        return out
    values = image[mask].astype(np.float64)
    std = values.std()
    out[mask] = ((values - values.mean()) / (std if std > 0 else 1.0)).astype(np.float32)
    return out


# Voxels kept around the brain's bounding box when a model crops to the brain (room for augmentation's shifts).
BRAIN_MARGIN = 8


@dataclass(frozen=True)
class SliceGeometry:
    """In-plane mapping between an axial slice ``(X, Y)`` and the model's square input ``(S, S)``.

    A window of the slice (the whole slice, or the brain's bounding box for models that crop to the brain) is
    zero-padded (centred) to a square so that anatomy keeps its aspect ratio, then resized to ``S`` with
    bilinear interpolation; :meth:`from_model` does the reverse, with zeros outside the window.

    Attributes:
        in_plane: the slice's shape ``(X, Y)``.
        size: the model's input side ``S``.
        crop: ``(x0, x1, y0, y1)``, the window of the slice the model sees; None: the whole slice.
    """

    in_plane: tuple[int, int]
    size: int
    crop: tuple[int, int, int, int] | None = None

    @property
    def window(self) -> tuple[int, int, int, int]:
        """``(x0, x1, y0, y1)`` of the part of the slice that is mapped to the model."""
        return self.crop if self.crop is not None else (0, self.in_plane[0], 0, self.in_plane[1])

    @property
    def window_shape(self) -> tuple[int, int]:
        x0, x1, y0, y1 = self.window
        return (x1 - x0, y1 - y0)

    @property
    def square(self) -> int:
        return max(self.window_shape)

    @property
    def padding(self) -> tuple[int, int, int, int]:
        """``(y_before, y_after, x_before, x_after)`` in the order torch's ``F.pad`` expects for the last two axes."""
        x, y = self.window_shape
        px, py = self.square - x, self.square - y
        return (py // 2, py - py // 2, px // 2, px - px // 2)

    def to_model(self, slices: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
        """``(N, C, X, Y)`` -> ``(N, C, S, S)``. Use ``mode='nearest'`` for label maps."""
        x0, x1, y0, y1 = self.window
        out = F.pad(slices[:, :, x0:x1, y0:y1], self.padding)
        if self.square == self.size:
            return out
        if mode == "nearest":
            return F.interpolate(out, size=(self.size, self.size), mode="nearest")
        return F.interpolate(out, size=(self.size, self.size), mode=mode, align_corners=False)

    def from_model(self, maps: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
        """``(N, C, S, S)`` -> ``(N, C, X, Y)``: logits, probabilities or heatmaps back on the slice grid.

        Outside the window (no brain there, by construction) the maps are 0; callers that turn logits into
        labels set everything outside the brain mask to background anyway.
        """
        if self.square != self.size:
            kwargs = {} if mode == "nearest" else {"align_corners": False}
            maps = F.interpolate(maps, size=(self.square, self.square), mode=mode, **kwargs)
        y0, _, x0, _ = self.padding
        x, y = self.window_shape
        maps = maps[:, :, x0 : x0 + x, y0 : y0 + y]
        if self.crop is None:
            return maps
        cx0, cx1, cy0, cy1 = self.crop
        return F.pad(maps, (cy0, self.in_plane[1] - cy1, cx0, self.in_plane[0] - cx1))


def brain_window(mask: np.ndarray, margin: int = BRAIN_MARGIN) -> tuple[int, int, int, int] | None:
    """The in-plane bounding box ``(x0, x1, y0, y1)`` of a brain mask ``(X, Y, Z)`` over all slices, widened by
    ``margin`` voxels and clipped to the slice; None when the mask is empty (the whole slice is used)."""
    in_plane = mask.any(axis=2)
    if not in_plane.any():
        return None
    xs, ys = np.flatnonzero(in_plane.any(axis=1)), np.flatnonzero(in_plane.any(axis=0))
    x_size, y_size = in_plane.shape
    return (
        max(0, int(xs[0]) - margin), min(x_size, int(xs[-1]) + 1 + margin),
        max(0, int(ys[0]) - margin), min(y_size, int(ys[-1]) + 1 + margin),
    )  # fmt: skip


@dataclass
class PreparedCase:
    """A case ready for a slice-wise model, in RAS order.

    Attributes:
        images: ``float32`` array ``(C, X, Y, Z)``, z-scored inside the brain, channels in ``modalities`` order;
            stored slice by slice (``images.transpose(3, 0, 1, 2)`` is C-contiguous) so a batch of axial slices is
            gathered from contiguous memory.
        brain_mask: boolean ``(X, Y, Z)``.
        label: SegLens classes ``(X, Y, Z)`` or None.
        modalities: channel names.
        missing_modalities: channels the case did not have, filled with 0 (the brain mean after z-scoring).
        orientation: maps RAS arrays back to the file order of ``source.reference``.
        geometry: in-plane mapping to the model size.
        source: the case as read.
    """

    images: np.ndarray
    brain_mask: np.ndarray
    label: np.ndarray | None
    modalities: tuple[str, ...]
    orientation: Orientation
    geometry: SliceGeometry
    source: CaseImages = field(repr=False)
    missing_modalities: tuple[str, ...] = ()

    @property
    def num_slices(self) -> int:
        return int(self.images.shape[3])

    def brain_slices(self) -> np.ndarray:
        """Indices of axial slices that hold any brain voxel."""
        return np.flatnonzero(self.brain_mask.any(axis=(0, 1)))

    def model_input(self, slice_indices: np.ndarray | list[int]) -> torch.Tensor:
        """Axial slices resized for the model: ``(N, C, S, S)`` float32."""
        idx = np.asarray(slice_indices, dtype=np.int64)
        slices = torch.from_numpy(np.ascontiguousarray(self.images.transpose(3, 0, 1, 2)[idx]))
        return self.geometry.to_model(slices.float())

    def to_input_grid(self, volume_ras: np.ndarray) -> np.ndarray:
        """An array ``(X, Y, Z, ...)`` in RAS order back on the input file's voxel order."""
        return self.orientation.invert(volume_ras)


def prepare_case(
    case: CaseImages, modalities: tuple[str, ...] | list[str], size: int = 256, crop_to_brain: bool = False
) -> PreparedCase:
    """Reorient, mask, normalise and set up the slice mapping for a model of input size ``size``.

    Args:
        case: images read with :func:`~SegLensLogic.data.cases.read_case`.
        modalities: the model's input channels, in order; those the case lacks (see ``read_case(allow_missing=)``)
            are filled with 0.
        size: the model's square input side in pixels.
        crop_to_brain: map only the brain's bounding box (plus a margin) to the model, not the whole slice
            (the model config's ``crop_to_brain``: more pixels on the brain for the same model size).
    """
    orientation = Orientation.of(case.affine)
    present = [m for m in modalities if m in case.images]
    if not present:
        raise ValueError(f"case '{case.case_id}' has none of the modalities {list(modalities)}")
    # Views, not copies: each image is read once more, by its z-scoring into the stacked array.
    ras = {m: orientation.ras_view(case.images[m]) for m in present}
    if case.brain_mask is not None:
        mask = orientation.apply(case.brain_mask)
    else:
        mask = brain_mask_from_images(list(ras.values()))
    if not mask.any():  # every command would otherwise run on nothing (or fail deep inside a model)
        raise InputFileError(case.reference.path, f"case '{case.case_id}' has no brain: every voxel is background "
                             "(an empty or constant image, or an empty brain mask); there is nothing to segment")  # fmt: skip
    # A missing sequence is 0 everywhere: the brain mean of a z-scored image (models trained with modality dropout).
    images = np.empty((mask.shape[2], len(modalities), *mask.shape[:2]), dtype=np.float32).transpose(1, 2, 3, 0)
    for channel, m in zip(images, modalities):
        if m in ras:
            zscore_in_mask(ras[m], mask, out=channel)  # writes every voxel
        else:
            channel[...] = 0
    label = orientation.apply(case.label) if case.label is not None else None
    crop = brain_window(mask) if crop_to_brain else None
    geometry = SliceGeometry(in_plane=(int(images.shape[1]), int(images.shape[2])), size=size, crop=crop)
    return PreparedCase(
        images=images,
        brain_mask=mask,
        label=label,
        modalities=tuple(modalities),
        orientation=orientation,
        geometry=geometry,
        source=case,
        missing_modalities=tuple(m for m in modalities if m not in ras),
    )
