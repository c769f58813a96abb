"""Sparse autoencoders on segmentation activations: stores, BatchTopK training, volume codes and heatmaps.

The names below are imported on first use (PEP 562), so that reading :class:`SAETrainingOptions` (the command
line's defaults) imports no torch.
"""


def __getattr__(name: str):
    if name in ("ActivationStore", "ExtractionOptions", "extract_activations", "feature_map_to_vectors", "vectors_to_feature_map"):
        from . import activations as module
    elif name in ("BatchTopKSAE", "SAEConfig", "SparseDictionary", "sae_sha256"):
        from . import model as module
    elif name == "SAETrainingOptions":
        from . import options as module
    elif name in ("estimate_threshold", "evaluate_reconstruction", "train_sae"):
        from . import training as module
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "ActivationStore", "ExtractionOptions", "extract_activations", "feature_map_to_vectors", "vectors_to_feature_map",
    "BatchTopKSAE", "SAEConfig", "SparseDictionary", "sae_sha256", "SAETrainingOptions", "estimate_threshold", "evaluate_reconstruction", "train_sae",
]  # fmt: skip
