"""Model diffing: aligning SAE latents across cohorts and architectures (Med-SegLens sections 3.6, 5, appendix E).

- :mod:`.matching`: Hungarian, greedy, Sinkhorn (rounded) and nearest-neighbour matchings of a similarity matrix.
- :mod:`.latent_alignment`: encoder/decoder cosine alignment of two SAEs, the shared-latent rule, the tau sweep.
- :mod:`.quality`: agreement, bootstrap stability, collision, predictability; the baselines table (table 2).
- :mod:`.cohorts`: all pairs of several cohorts, the fraction-shared matrix (table 7) over all or live latents,
  universally shared and population-specific latents, the floors (each SAE against its seed and resampled replicas).
- :mod:`.spaces`: which activation space two SAEs live in; activation-correlation and Procrustes alignment for
  unrelated models (e.g. SegFormer against U-Net).
- :mod:`.replication`: live latents, and which latents an SAE trained from another seed finds again (the seed floor,
  per latent).
- :mod:`.files`: the alignment JSON file and :func:`load_alignment`.

Measurements that run the models (feature swapping, planted-feature footprints) live in
:mod:`SegLensLogic.experiments`. Reading an alignment file imports neither torch nor SciPy.
"""

# Names are imported on first use (PEP 562).
from ..lazy import lazy_exports

_EXPORTS = {
    "DEFAULT_TAU": "latent_alignment",
    "TAU_GRID": "latent_alignment",
    "LatentAlignment": "latent_alignment",
    "align_saes": "latent_alignment",
    "align_similarities": "latent_alignment",
    "align_vectors": "latent_alignment",
    "cosine_matrix": "latent_alignment",
    "tau_sweep": "latent_alignment",
    "Alignment": "files",
    "alignment_document": "files",
    "load_alignment": "files",
    "sae_record": "files",
    "write_alignment": "files",
    "Matching": "matching",
    "greedy": "matching",
    "hungarian": "matching",
    "is_valid_matching": "matching",
    "match": "matching",
    "nearest": "matching",
    "sinkhorn": "matching",
    "annotate_replication": "replication",
    "annotate_replicas": "replication",
    "comparison_vectors": "replication",
    "live_latents": "replication",
    "replication": "replication",
    "alignment_metrics": "quality",
    "baselines_table": "quality",
    "collision_rate": "quality",
    "evaluate_methods": "quality",
    "format_table": "quality",
}


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
__all__ = list(_EXPORTS)
