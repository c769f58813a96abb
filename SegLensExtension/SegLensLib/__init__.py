"""Slicer-facing helpers of the SegLens module.

Everything here runs in Slicer's Python and, without the application, against the MRML classes of the
``slicer-core`` wheel: no module of this package imports ``qt``, ``ctk`` or ``slicer.app`` at import time.

- :mod:`.nodes`: MRML nodes <-> numpy arrays (volumes, segmentations with a stable colour table, heatmap layers,
  slice views, ``.seg.nrrd`` / colour-table files).
- :mod:`.dependencies`: first-use install of PyTorch (SlicerPyTorch) and of SegLensLogic's requirements.
- :mod:`.worker`: one persistent worker thread with progress and Cancel for model calls.
- :mod:`.latenttable`: filtering and sorting of the latent table's rows.
"""
