"""Sparse autoencoders on segmentation activations: stores, BatchTopK training, volume codes and heatmaps.

Reading :class:`SAETrainingOptions` (the command line's defaults) imports no torch.
"""

# Names are imported on first use (PEP 562).
from ..lazy import lazy_exports

_EXPORTS = {
    "ActivationStore": "activations",
    "ExtractionOptions": "activations",
    "extract_activations": "activations",
    "feature_map_to_vectors": "activations",
    "vectors_to_feature_map": "activations",
    "BatchTopKSAE": "model",
    "SAEConfig": "model",
    "SparseDictionary": "model",
    "sae_sha256": "model",
    "SAETrainingOptions": "options",
    "estimate_threshold": "trainer",
    "evaluate_reconstruction": "trainer",
    "train_sae": "trainer",
    "train_sae_once": "trainer",
}


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
__all__ = list(_EXPORTS)
