"""Slicer-facing helpers of the SegLens module.

Everything here runs in Slicer's Python and, without the application, against the MRML classes of the
``slicer-core`` wheel: no module of this package imports ``qt``, ``ctk`` or ``slicer.app`` at import time, except
:mod:`.parameters`, which only the panel imports.

- :mod:`.nodes`: MRML nodes <-> numpy arrays (volumes, segmentations with a stable colour table, heatmap layers,
  change-map previews, slice views, resampling onto a grid, ``.seg.nrrd`` / colour-table files).
- :mod:`.dependencies`: first-use install of PyTorch (SlicerPyTorch) and of what the panel imports.
- :mod:`.worker`: one persistent daemon worker thread, jobs the panel polls, per-phase progress and Cancel.
- :mod:`.latenttable`: filtering and sorting of the latent table's rows.
- :mod:`.inputs`: which sequence a volume holds, from its name.
- :mod:`.parameters`: the panel's parameter node (``parameterNodeWrapper``), saved with the scene.
"""
