"""The four MRI sequences a case may have, and the names users and older datasets give them.

Kept apart from :mod:`.cases` (which reads images) so that naming a sequence imports no image library.
"""

from __future__ import annotations

MODALITIES = ("t1n", "t1c", "t2w", "t2f")

# Names users and older datasets give to the four modalities.
MODALITY_ALIASES = {
    "t1n": "t1n", "t1": "t1n", "t1w": "t1n", "native": "t1n",
    "t1c": "t1c", "t1ce": "t1c", "t1gd": "t1c", "t1post": "t1c",
    "t2w": "t2w", "t2": "t2w",
    "t2f": "t2f", "flair": "t2f", "t2flair": "t2f", "t2-flair": "t2f",
}  # fmt: skip


def canonical_modality(name: str) -> str:
    """``'T1ce'`` -> ``'t1c'``, ``'FLAIR'`` -> ``'t2f'``; raises ValueError for names we do not know."""
    key = name.strip().lower().replace("_", "")
    if key not in MODALITY_ALIASES:
        raise ValueError(f"unknown modality '{name}'; use one of {', '.join(MODALITIES)} (or t1, t1ce, t2, flair)")
    return MODALITY_ALIASES[key]
