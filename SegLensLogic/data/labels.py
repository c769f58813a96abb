"""Label schemes: BraTS 2013, 2017-2021 and 2023 tumour labels, and FreeSurfer ``aseg`` structures.

Everything SegLens writes uses the BraTS 2023 scheme (0 background, 1 necrotic core, 2 edema, 3 enhancing
tumour) for tumour cohorts, and a reduced set of subcortical structures for healthy cohorts, as in the paper
(IXI with 8 subcortical classes plus background).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputFileError


@dataclass(frozen=True)
class LabelScheme:
    """How the integer labels of a file map to the classes SegLens uses.

    Attributes:
        name: scheme identifier stored in configs and manifests.
        mapping: file label -> SegLens class index. Values absent from it are rejected unless
            ``unknown_to_background`` is set.
        class_names: SegLens class names, index 0 is background.
        unknown_to_background: map unlisted labels to 0 (for atlases with many structures we do not model).
    """

    name: str
    mapping: dict[int, int]
    class_names: tuple[str, ...]
    unknown_to_background: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def apply(self, labels: np.ndarray, path: str | Path = "<array>") -> np.ndarray:
        """Map file labels to SegLens classes.

        Args:
            labels: integer-valued array of any shape.
            path: the file the labels came from, named in errors.

        Returns:
            ``uint8`` array of the same shape with values in ``[0, num_classes)``.

        Raises:
            InputFileError: non-integer values, or values this scheme does not know.
        """
        arr = np.asarray(labels)
        if arr.dtype.kind not in "biuf":
            raise InputFileError(path, f"label map has voxels of type {arr.dtype}; labels are integers")
        if arr.dtype.kind == "f":
            if not np.isfinite(arr).all():
                raise InputFileError(path, "label map has NaN or Inf voxels")
            if not np.array_equal(arr, np.round(arr)):
                raise InputFileError(path, "label map has non-integer values")
        # The values are checked against the scheme before any lookup table is built, so a stray huge value
        # costs nothing (the table spans the scheme's labels, never the file's).
        values = np.unique(arr)
        if values.size and values[0] < 0:
            raise InputFileError(path, f"negative label value {values[0]:g}")
        known = np.fromiter(self.mapping, dtype=np.int64)
        unknown = values[~np.isin(values, known)]
        if unknown.size and not self.unknown_to_background:
            shown = [int(v) for v in unknown[:10]]
            raise InputFileError(path, f"unknown label value(s) {shown} for the {self.name} scheme (expected {sorted(self.mapping)})")
        top = int(known.max())
        lut = np.zeros(top + 1, dtype=np.uint8)
        for src, dst in self.mapping.items():
            lut[src] = dst
        if not values.size or values[-1] <= top:
            return lut[arr.astype(np.int64)]
        out = np.zeros(arr.shape, dtype=np.uint8)  # labels beyond the scheme's are background here
        inside = arr <= top
        out[inside] = lut[arr[inside].astype(np.int64)]
        return out


TUMOUR_CLASSES = ("background", "necrotic core", "edema", "enhancing tumour")

BRATS2023 = LabelScheme("brats2023", {0: 0, 1: 1, 2: 2, 3: 3}, TUMOUR_CLASSES)
# BraTS 2017-2021: 4 is enhancing tumour.
BRATS2018 = LabelScheme("brats2018", {0: 0, 1: 1, 2: 2, 4: 3}, TUMOUR_CLASSES)
# BraTS 2013/2015: 1 necrosis, 2 edema, 3 non-enhancing core, 4 enhancing; non-enhancing joins the core (label 1).
BRATS2013 = LabelScheme("brats2013", {0: 0, 1: 1, 2: 2, 3: 1, 4: 3}, TUMOUR_CLASSES)

HEALTHY_CLASSES = (
    "background",
    "thalamus",
    "caudate",
    "putamen",
    "pallidum",
    "hippocampus",
    "amygdala",
    "accumbens",
    "ventral diencephalon",
)
# FreeSurfer aseg codes (left, right) of the eight subcortical structures; everything else is background.
_ASEG_STRUCTURES = {1: (10, 49), 2: (11, 50), 3: (12, 51), 4: (13, 52), 5: (17, 53), 6: (18, 54), 7: (26, 58), 8: (28, 60)}
ASEG = LabelScheme(
    "aseg",
    {0: 0, **{code: cls for cls, codes in _ASEG_STRUCTURES.items() for code in codes}},
    HEALTHY_CLASSES,
    unknown_to_background=True,
)

SCHEMES = {scheme.name: scheme for scheme in (BRATS2023, BRATS2018, BRATS2013, ASEG)}

# SegLens class -> RGB colour (0-255) for the tumour scheme, as Slicer and BraTS viewers commonly show them.
TUMOUR_COLOURS = {1: (255, 0, 0), 2: (0, 200, 0), 3: (255, 220, 0)}


def get_scheme(name: str) -> LabelScheme:
    try:
        return SCHEMES[name]
    except KeyError:
        raise ValueError(f"unknown label scheme '{name}'; known: {', '.join(SCHEMES)}") from None


def detect_tumour_scheme(labels: np.ndarray) -> LabelScheme:
    """Guess the BraTS scheme of a tumour label map from its values.

    Label 4 means an older scheme: with 3 present it is 2013 (3 = non-enhancing core), otherwise 2017-2021.
    Without 4 the labels are read as 2023. (A 2013 map without label 3 maps identically under 2018 rules.)
    """
    values = set(np.unique(labels).astype(np.int64).tolist())
    if 4 in values:
        return BRATS2013 if 3 in values else BRATS2018
    return BRATS2023
