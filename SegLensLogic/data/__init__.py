"""Cases, cohorts, image I/O, label schemes and preprocessing: how a volume gets from disk to model slices.

Reading a case's files does not import torch (only preprocessing does).
"""

# Names are imported on first use (PEP 562).
from ..lazy import lazy_exports

_EXPORTS = {
    "MODALITIES": "modalities",
    "Case": "cases",
    "CaseImages": "cases",
    "canonical_modality": "modalities",
    "case_from_arrays": "cases",
    "case_from_mapping": "cases",
    "find_case": "cases",
    "read_case": "cases",
    "Cohort": "cohort",
    "load_cohort": "cohort",
    "ImageData": "io",
    "read_image": "io",
    "write_image": "io",
    "BRATS2013": "labels",
    "BRATS2018": "labels",
    "BRATS2023": "labels",
    "ASEG": "labels",
    "LabelScheme": "labels",
    "get_scheme": "labels",
    "PreparedCase": "preprocessing",
    "SliceGeometry": "preprocessing",
    "prepare_case": "preprocessing",
}


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
__all__ = list(_EXPORTS)
