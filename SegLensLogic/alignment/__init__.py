"""Model diffing: aligning SAE latents across cohorts and architectures (Med-SegLens sections 3.6, 5, appendix E).

- :mod:`.matching`: Hungarian, greedy, Sinkhorn (rounded) and nearest-neighbour matchings of a similarity matrix.
- :mod:`.alignment`: encoder/decoder cosine alignment of two SAEs, the shared-latent rule, the tau sweep.
- :mod:`.metrics`: agreement, bootstrap stability, collision, predictability; the baselines table (table 2).
- :mod:`.cohorts`: all pairs of several cohorts, the fraction-shared matrix (table 7) over all or live latents,
  universally shared and population-specific latents, the floors (each SAE against its seed and resampled replicas).
- :mod:`.spaces`: which activation space two SAEs live in; activation-correlation and Procrustes alignment for
  unrelated models (e.g. SegFormer against U-Net).
- :mod:`.swapping`: feature swapping (section 5.3).
- :mod:`.footprint`: scoring a diffing against a planted feature's voxel footprint (precision, recall, chance).
- :mod:`.files`: the alignment JSON file and :func:`load_alignment`.

The names below are imported on first use (PEP 562): reading an alignment file does not import torch or SciPy.
"""


def __getattr__(name: str):
    if name in ("DEFAULT_TAU", "TAU_GRID", "LatentAlignment", "align_saes", "align_similarities", "align_vectors", "cosine_matrix", "tau_sweep"):
        from . import alignment as module
    elif name in ("Alignment", "alignment_document", "load_alignment", "sae_record", "write_alignment"):
        from . import files as module
    elif name in ("FootprintFractions", "footprint_scores", "latent_footprint_fractions", "score_against_footprint"):
        from . import footprint as module
    elif name in ("Matching", "greedy", "hungarian", "is_valid_matching", "match", "nearest", "sinkhorn"):
        from . import matching as module
    elif name in ("alignment_metrics", "baselines_table", "collision_rate", "evaluate_methods", "format_table"):
        from . import metrics as module
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "DEFAULT_TAU", "TAU_GRID", "LatentAlignment", "align_saes", "align_similarities", "align_vectors", "cosine_matrix",
    "tau_sweep", "Alignment", "alignment_document", "load_alignment", "sae_record", "write_alignment", "Matching",
    "greedy", "hungarian", "is_valid_matching", "match", "nearest", "sinkhorn", "alignment_metrics", "baselines_table",
    "collision_rate", "evaluate_methods", "format_table", "FootprintFractions", "footprint_scores",
    "latent_footprint_fractions", "score_against_footprint",
]  # fmt: skip
