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
"""

from .alignment import DEFAULT_TAU, TAU_GRID, LatentAlignment, align_saes, align_similarities, align_vectors, cosine_matrix, tau_sweep
from .files import Alignment, alignment_document, load_alignment, sae_record, write_alignment
from .footprint import FootprintFractions, footprint_scores, latent_footprint_fractions, score_against_footprint
from .matching import Matching, greedy, hungarian, is_valid_matching, match, nearest, sinkhorn
from .metrics import alignment_metrics, baselines_table, collision_rate, evaluate_methods, format_table

__all__ = [
    "DEFAULT_TAU", "TAU_GRID", "LatentAlignment", "align_saes", "align_similarities", "align_vectors", "cosine_matrix",
    "tau_sweep", "Alignment", "alignment_document", "load_alignment", "sae_record", "write_alignment", "Matching",
    "greedy", "hungarian", "is_valid_matching", "match", "nearest", "sinkhorn", "alignment_metrics", "baselines_table",
    "collision_rate", "evaluate_methods", "format_table", "FootprintFractions", "footprint_scores",
    "latent_footprint_fractions", "score_against_footprint",
]  # fmt: skip
