"""Which MRI sequence a volume holds, from its node name, where the name says it clearly; and whether a volume can
be an MRI sequence at all (:func:`not_an_mri`).

``Brats18_TCIA02_370_1_t1ce`` is T1 with contrast (``t1c``), ``BraTS-GLI-00001-000-t2f`` is FLAIR (``t2f``),
``sub-01_T2w`` is T2 (``t2w``). A name is split into words at ``_ - . space``; a word must name one sequence exactly
(``flair``, ``t1ce``, ``t2w`` ...). A name with no such word, or with words naming two sequences, says nothing.
"""

from __future__ import annotations

import re

MODALITY_ORDER = ("t1n", "t1c", "t2w", "t2f")
# Words (lower case) that name one sequence; SegLensLogic.data.cases accepts the same aliases.
MODALITY_WORDS = {
    "t1n": {"t1n", "t1", "t1w", "t1native", "native"},
    "t1c": {"t1c", "t1ce", "t1gd", "t1post", "t1contrast", "t1wce", "ce", "gd"},
    "t2w": {"t2w", "t2", "t2weighted"},
    "t2f": {"t2f", "flair", "t2flair"},
}
MODALITY_TITLES = {"t1n": "T1", "t1c": "T1 contrast", "t2w": "T2", "t2f": "FLAIR"}


def words(name: str) -> list[str]:
    return [w for w in re.split(r"[\s_.\-]+", name.lower()) if w]


def guess_modality(name: str) -> str | None:
    """The sequence a node name clearly names, or None (no sequence word, or words naming two sequences)."""
    found = {modality for w in words(name) for modality, aliases in MODALITY_WORDS.items() if w in aliases}
    if found == {"t1n", "t1c"}:  # "T1 ce" / "t1_gd": the contrast word qualifies the T1
        return "t1c"
    return found.pop() if len(found) == 1 else None


def assign_modalities(names: dict[str, str], taken: dict[str, str | None]) -> dict[str, str]:
    """Volumes for the empty modality slots: ``{modality: node id}``.

    Args:
        names: ``{node id: node name}`` of the candidate volumes, in scene order.
        taken: ``{modality: node id or None}``, the current choice (filled slots are kept).

    A slot gets a volume only when exactly one unused candidate's name names that sequence.
    """
    used = {node_id for node_id in taken.values() if node_id}
    by_modality: dict[str, list[str]] = {m: [] for m in MODALITY_ORDER}
    for node_id, name in names.items():
        modality = guess_modality(name)
        if modality is not None and node_id not in used:
            by_modality[modality].append(node_id)
    return {m: ids[0] for m, ids in by_modality.items() if not taken.get(m) and len(ids) == 1}


# An MRI volume has at least this many slices along every axis; fewer is a photograph, a screenshot or one slice.
MIN_SLICES = 8


def not_an_mri(array, is_label_map=False):
    """Why a volume cannot be an MRI sequence to segment, in the panel's words, or None.

    Refused: a label map node; fewer than :data:`MIN_SLICES` voxels along an axis (a photo, a single slice); integer
    values of a dozen levels or fewer (a segmentation or label map loaded as a plain volume).
    """
    import numpy as np

    if is_label_map:
        return "is a label map, not an MRI sequence: choose the image itself"
    shape = tuple(int(v) for v in array.shape[:3])
    if len(array.shape) != 3 or min(shape) < MIN_SLICES:
        return (f"is not a 3D MRI volume ({' x '.join(str(v) for v in array.shape)} voxels; at least {MIN_SLICES} along "
                "every axis are needed)")  # fmt: skip
    sample = np.asarray(array).reshape(-1)[:: max(1, array.size // 2_000_000)]
    if np.issubdtype(sample.dtype, np.integer) or np.array_equal(sample, np.round(sample)):
        levels = np.unique(sample)
        if len(levels) <= 12:
            return (f"holds only {len(levels)} distinct values ({', '.join(str(int(v)) for v in levels[:6])}"
                    f"{', ...' if len(levels) > 6 else ''}): it looks like a label map, not an MRI sequence")  # fmt: skip
    return None
