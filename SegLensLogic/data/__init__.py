"""Cases, cohorts, image I/O, label schemes and preprocessing: how a volume gets from disk to model slices.

The names below are imported on first use (PEP 562), so that reading a case's files does not import torch
(only preprocessing does).
"""


def __getattr__(name: str):
    if name in ("MODALITIES", "Case", "CaseImages", "canonical_modality", "case_from_arrays", "case_from_mapping", "find_case", "read_case"):
        from . import cases as module
    elif name in ("Cohort", "load_cohort"):
        from . import cohort as module
    elif name == "atomic_write_text":
        from .. import storage as module
    elif name in ("ImageData", "read_image", "write_image"):
        from . import io as module
    elif name in ("BRATS2013", "BRATS2018", "BRATS2023", "ASEG", "LabelScheme", "get_scheme"):
        from . import labels as module
    elif name in ("PreparedCase", "SliceGeometry", "prepare_case"):
        from . import preprocessing as module
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "MODALITIES", "Case", "CaseImages", "canonical_modality", "case_from_arrays", "case_from_mapping", "find_case", "read_case",
    "Cohort", "load_cohort", "ImageData", "atomic_write_text", "read_image", "write_image",
    "BRATS2013", "BRATS2018", "BRATS2023", "ASEG", "LabelScheme", "get_scheme",
    "PreparedCase", "SliceGeometry", "prepare_case",
]  # fmt: skip
