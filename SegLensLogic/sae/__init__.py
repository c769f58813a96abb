"""Sparse autoencoders on segmentation activations: stores, BatchTopK training, volume codes and heatmaps."""

from .activations import ActivationStore, ExtractionOptions, extract_activations, feature_map_to_vectors, vectors_to_feature_map
from .model import BatchTopKSAE, SAEConfig, SparseDictionary, sae_sha256
from .training import SAETrainingOptions, estimate_threshold, evaluate_reconstruction, train_sae

__all__ = [
    "ActivationStore", "ExtractionOptions", "extract_activations", "feature_map_to_vectors", "vectors_to_feature_map",
    "BatchTopKSAE", "SAEConfig", "SparseDictionary", "sae_sha256", "SAETrainingOptions", "estimate_threshold", "evaluate_reconstruction", "train_sae",
]  # fmt: skip
