"""SegLensLogic: the pure-Python core of SegLens (no slicer, qt or vtk imports).

One module per concept of Med-SegLens:

- :mod:`SegLensLogic.data` -- cases, cohorts, image I/O, label schemes and slice preprocessing;
- :mod:`SegLensLogic.networks` -- slice-wise segmenters (SegFormer, U-Net) with named hook points;
- :mod:`SegLensLogic.segmentation` -- whole-volume prediction on the input's voxel grid, training, Dice;
- :mod:`SegLensLogic.segmentation.training` -- cohort training and fine-tuning from a shared base model;
- :mod:`SegLensLogic.segmentation.scores` -- Dice, BraTS regions, precision and recall;
- :mod:`SegLensLogic.app.cli` -- the ``seglens`` command.
"""

from .errors import InputFileError, OutputExistsError, SegLensError

__version__ = "0.1.0"

__all__ = ["SegLensError", "InputFileError", "OutputExistsError", "__version__"]
