"""Cases, cohorts, image I/O, label schemes and preprocessing: how a volume gets from disk to model slices."""

from .cases import MODALITIES, Case, CaseImages, canonical_modality, case_from_arrays, case_from_mapping, find_case, read_case
from .cohort import Cohort, load_cohort
from ..storage import atomic_write_text
from .io import ImageData, read_image, write_image
from .labels import BRATS2013, BRATS2018, BRATS2023, ASEG, LabelScheme, get_scheme
from .preprocessing import PreparedCase, SliceGeometry, prepare_case

__all__ = [
    "MODALITIES", "Case", "CaseImages", "canonical_modality", "case_from_arrays", "case_from_mapping", "find_case", "read_case",
    "Cohort", "load_cohort", "ImageData", "atomic_write_text", "read_image", "write_image",
    "BRATS2013", "BRATS2018", "BRATS2023", "ASEG", "LabelScheme", "get_scheme",
    "PreparedCase", "SliceGeometry", "prepare_case",
]  # fmt: skip
