"""The SegLens parameter node: what the panel holds, saved with the scene and restored when the scene is loaded.

A ``parameterNodeWrapper`` class (Slicer 5.2+) over the module's singleton ``vtkMRMLScriptedModuleNode``: inputs,
bundle, latent selection, steering choices and display settings. Imported only by the panel (the wrapper needs
Slicer's Qt), never by the Logic, so the Logic keeps running without an application.
"""

from slicer import vtkMRMLColorNode, vtkMRMLScalarVolumeNode
from slicer.parameterNodeWrapper import parameterNodeWrapper


@parameterNodeWrapper
class SegLensParameterNode:
    """Every setting of the panel (names as stored in the scene).

    Inputs: ``t1n``, ``t1c``, ``t2w``, ``t2f`` (volume nodes; None for a sequence the case lacks) and
    ``bundlePath`` (a bundle folder; the shipped reference bundle is preselected). Latents: ``selectedLatents``
    (ids, in table order), ``category`` and ``status`` filters. Steering: ``mode``, ``alpha``, ``region``,
    ``firstSlice`` / ``lastSlice`` (the slice range), ``population`` and ``suggestionMethod`` for suggested
    corrections, ``livePreview``, ``followSlice``. Heatmaps: ``threshold`` (fraction of a latent's maximum),
    ``opacity``, ``colourNode``. Files: ``recipePath``, ``exportName`` (the export folder is a user setting, kept in
    the application settings rather than in scenes).
    """

    t1n: vtkMRMLScalarVolumeNode
    t1c: vtkMRMLScalarVolumeNode
    t2w: vtkMRMLScalarVolumeNode
    t2f: vtkMRMLScalarVolumeNode
    bundlePath: str = ""
    selectedLatents: list[int]
    category: str = "all"
    status: str = "all"
    mode: str = "scale"
    alpha: float = 1.0
    region: str = "whole volume"
    firstSlice: int = 0
    lastSlice: int = 0
    population: str = ""
    suggestionMethod: str = "ground-truth-free"
    livePreview: bool = True
    followSlice: bool = True
    threshold: float = 0.1
    opacity: float = 0.5
    colourNode: vtkMRMLColorNode
    recipePath: str = ""
    exportName: str = ""
