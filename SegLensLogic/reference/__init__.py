"""The reference bundle that ships with SegLens: where it lives, and how it is rebuilt (:mod:`.build`)."""

from .location import REFERENCE_BUNDLE_NAME, reference_bundle_path

__all__ = ["REFERENCE_BUNDLE_NAME", "reference_bundle_path"]
