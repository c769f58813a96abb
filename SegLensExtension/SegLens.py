"""SegLens: segment a brain MRI, see the model's sparse-autoencoder latents as layers, steer them, export the fix.

A thin shell over ``SegLensLogic.steering.SteeringSession`` (all computation happens there):

- ``SegLens``: module metadata; refuses to run on Slicer older than 5.10 (Python 3.12) with a message.
- ``SegLensWidget``: the panel (``Resources/UI/SegLens.ui``). It only wires the GUI to the logic: model work runs as
  one job at a time on a worker thread (``SegLensLib.worker``), the panel polls it and shows progress per phase;
  every setting lives in a parameter node saved with the scene (``SegLensLib.parameters``).
- ``SegLensLogic``: everything the panel does, without Qt (so it runs headless, in scripts, in Slicer's Python
  console and in CI on the ``slicer-core`` MRML libraries). It imports PyTorch and SegLensLogic only when first used.
- ``SegLensTest``: the self-test for a running Slicer.

Note: the template's Logic class name ``SegLensLogic`` shadows the ``SegLensLogic`` package name inside this
file only; the package is always imported inside functions (``from SegLensLogic.x import y``), which resolves
through ``sys.modules`` and never through this file's globals.

This file and the ``SegLensLib`` modules it imports at load time parse on Python 3.9 (Slicer 5.8), so that an old
Slicer shows the version message instead of a syntax error.
"""

import logging
import os
import sys
import traceback
from pathlib import Path

import vtk

import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from SegLensLib import inputs, latenttable, nodes

try:  # Slicer 5.3 and later: user-visible strings go through the application's translator (lupdate finds them)
    from slicer.i18n import tr as _
    from slicer.i18n import translate
except ImportError:  # slicer-core without the application, or an older Slicer: the English text
    def _(text):
        return text

    def translate(context, text):
        return text
from SegLensLib.dependencies import add_source_to_path
from SegLensLib.worker import Job, Progress, Worker

# In a source checkout SegLensLogic sits beside the module folder: make it importable as soon as Slicer loads the
# module, so that the Python console can use it before any button is pressed (a built extension installs it next
# to the module instead). Cheap: nothing is imported.
add_source_to_path()

MINIMUM_SLICER_VERSION = (5, 10)
# Who made the module (Slicer shows these in the module's help), and where its documentation is: the README's section
# on the Slicer module, in the repository named by the extension's homepage (CMakeLists.txt).
CONTRIBUTORS = ("SegLens team (Med-SegLens implementation)",)
DOCUMENTATION_URL = "https://github.com/seglens/SegLens#the-3d-slicer-module"
MINIMUM_PYTHON_VERSION = (3, 11)
# Steering modes offered in the panel and the region choices, as the session names them.
STEERING_MODES = ("scale", "add", "zero")
REGIONS = ("current slice", "slice range", "whole volume")
MODALITY_SELECTORS = {"t1n": "t1nSelector", "t1c": "t1cSelector", "t2w": "t2wSelector", "t2f": "t2fSelector"}
SUGGESTION_METHODS = ("ground-truth-free", "calibrated")
NO_POPULATION = _("(no population)")
# Heatmaps shown at once: the foreground layer plus the extra layers of Slicer 5.10+.
MAX_HEATMAPS = 4
EXPORT_FOLDER_SETTING = "SegLens/ExportFolder"
SEGMENT_PHASES = (_("Segmenting, step 1 of 2 (running the model over the slices)"),
                  _("Segmenting, step 2 of 2 (encoding the latent codes)"))  # fmt: skip
JOB_TITLES = {
    "segment": _("Segmentation"), "table": _("Latent table"), "heatmaps": _("Heatmaps"), "preview": _("Preview"),
    "apply": _("Steering"), "suggest": _("Suggested correction"), "recipe": _("Loading the recipe"), "fix": _("Fix"),
    "export": _("Export"),
}  # fmt: skip
# The two markups point lists hints are placed in (by sign), and what + points say when no class is chosen.
HINT_LISTS = {"+": "SegLens points: tumour (+)", "-": "SegLens points: not tumour (-)"}
HINT_COLOURS = {"+": (0.1, 0.9, 0.2), "-": (0.95, 0.2, 0.8)}
ANY_TUMOUR = _("any tumour class")
OTHER_BUNDLE = _("Other: the bundle folder below")
# What the panel says while the session no longer matches the chosen inputs (other nodes, other voxels, other bundle).
STALE_NOTICE = _("The inputs changed after Segment: press Segment to work on them.")
# Jobs that follow the user's browsing (slice, selection): they do not take over the status line.
QUIET_JOBS = ("table", "heatmaps")
# Jobs whose results go into the slice views: none starts while the module is hidden, and one that ends then is
# dropped (redone when the module is shown again).
VIEW_JOBS = ("table", "heatmaps", "preview")
# Slice composite node layers (Slicer 5.10 numbers them all): the preview uses the label layer, heatmaps the
# foreground and the extra layers after the label layer, with the input as background.
BACKGROUND_LAYER, FOREGROUND_LAYER, LABEL_LAYER = 0, 1, 2
HEATMAP_LAYERS = (FOREGROUND_LAYER,) + tuple(range(3, 3 + MAX_HEATMAPS - 1))


def versionProblem(version=None, python=None):
    """None when this Slicer can run SegLens (5.10 or later, Python 3.11 or later); else what to do, in words."""
    if version is None:
        version = (int(slicer.app.majorVersion), int(slicer.app.minorVersion))
    python = tuple(sys.version_info[:2]) if python is None else tuple(python)
    if tuple(version) >= MINIMUM_SLICER_VERSION and python >= MINIMUM_PYTHON_VERSION:
        return None
    return _(
        "SegLens needs 3D Slicer 5.10 or later (Python 3.12); this is Slicer {slicer} with Python {python}. "
        "Install a current Slicer from https://download.slicer.org, then add SegLens to it."
    ).format(slicer="%d.%d" % tuple(version[:2]), python="%d.%d" % tuple(python[:2]))


def isCancellation(exc):
    """Whether an exception is the user's Cancel (SegLensLogic's ``PredictionCancelled`` or the worker's)."""
    return type(exc).__name__ in ("PredictionCancelled", "Cancelled")


def isUserError(exc):
    """Whether an exception is a problem with the user's input or environment (shown without a traceback)."""
    from SegLensLib.dependencies import DependencyError

    try:
        from SegLensLogic.errors import SegLensError
    except ImportError:  # SegLensLogic not installed: only dependency errors are user errors
        SegLensError = DependencyError
    return isinstance(exc, (SegLensError, DependencyError, FileNotFoundError, PermissionError))


#
# SegLens
#
class SegLens(ScriptedLoadableModule):
    """Module metadata (title, category, help)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SegLens")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = list(CONTRIBUTORS)
        self.parent.helpText = _(
            "Segment a brain-tumour MRI with a SegLens bundle, inspect the sparse-autoencoder latents of the model "
            "as heatmap layers with their automatic labels, steer latents with a live preview of the current slice, "
            "take a suggested correction for the case's population, and export the corrected mask (.seg.nrrd, "
            ".nii.gz) with the steering recipe (Med-SegLens). Needs 3D Slicer 5.10 or later."
        ) + "\n\n" + _('See the <a href="{url}">SegLens documentation of this module</a>.').format(url=DOCUMENTATION_URL)
        self.parent.acknowledgementText = _(
            "Implements Med-SegLens (sparse autoencoders for segmentation models). BraTS data: Menze et al., IEEE "
            "TMI 2015; Bakas et al., Sci. Data 2017; Baid et al., arXiv:2107.02314."
        )
        problem = versionProblem()
        if problem:
            logging.error(problem)
            self.parent.helpText = problem + "\n\n" + self.parent.helpText


class SlicePreview:
    """What an edit changes on one axial slice: ``changes`` ``(X, Y)`` in RAS order (``nodes.CHANGE_CLASSES``), and
    ``counts`` (added, removed, relabelled voxels)."""

    def __init__(self, sliceIndex, changes, counts):
        self.sliceIndex = sliceIndex
        self.changes = changes
        self.counts = counts


class SegmentResult:
    """What a Segment job hands back to the main thread."""

    def __init__(self, session, bundle, labels, notes, inputNodes, referenceNode, device=""):
        self.session = session
        self.bundle = bundle
        self.labels = labels
        self.notes = notes
        self.inputNodes = inputNodes
        self.referenceNode = referenceNode
        self.device = device  # where the model ran, in words


#
# SegLensLogic
#
class SegLensLogic(ScriptedLoadableModuleLogic):
    """What the SegLens panel does, callable from Python without the panel.

    Nodes the user made are never modified or removed: Segment creates a new segmentation node, Apply another one
    (the previous is kept), and only heatmap/preview nodes made by this logic are ever replaced. The slice views'
    layers are borrowed: what a view showed in a layer is remembered before SegLens first puts a heatmap or the
    preview there, and put back when SegLens no longer needs the layer (the preview cleared, the heatmaps gone, or
    :meth:`restoreViewLayers` when the module is left).

    Thread use: ``read*`` and ``show*`` methods and the one-call versions (``segment``, ``applyEdit``,
    ``previewEdit``, ``loadRecipe``, ``undo``, ``export``) touch MRML and run on the main thread; ``create*`` and
    ``compute*`` methods touch no MRML, change nothing the panel shows, and may run on a worker thread.
    ``progress`` arguments are ``progress(done, total, phase)`` callables (``SegLensLib.worker.Progress.callback``);
    returning False cancels.
    """

    def __init__(self, scene=None):
        ScriptedLoadableModuleLogic.__init__(self)
        self._scene = scene
        self.session = None
        self.bundle = None
        self.inputNodes = {}
        self.inputNotes = []
        self.referenceNode = None
        self.colourTableNode = None
        self.changeColourTableNode = None
        self.originalSegmentationNode = None
        self.segmentationNodes = []  # the history shown as nodes: original, then one per Apply / recipe
        self.heatmapNodes = {}  # latent id -> volume node
        self.previewNode = None
        self.classNames = []
        self.classColours = []
        self.fixOptions = None  # GuidedOptions for Fix (None: SegLens' defaults); settable from the Python console
        self.userLayers = {}  # (composite node ID, layer) -> (volume node ID, opacity) the view had before SegLens
        self.sessionInputs = {}  # what the session was made from: modality -> (node ID, voxel modification time)
        self.sessionBundlePath = None  # the bundle folder it was made with (None: not known, not compared)
        self._beforeRecipe = None  # the session's edits before a replay (put back when the replay is cancelled)
        self._previewSlice = None  # the RAS slice the preview node shows

    def getParameterNode(self):
        """The module's parameter node (``SegLensLib.parameters.SegLensParameterNode``; needs Slicer's Qt)."""
        from SegLensLib.parameters import SegLensParameterNode

        return SegLensParameterNode(super().getParameterNode())

    # -- scene and inputs -------------------------------------------------------------------------------------------
    @property
    def scene(self):
        return self._scene if self._scene is not None else slicer.mrmlScene

    def _error(self, message):
        from SegLensLogic.errors import SegLensError

        return SegLensError(message)

    def readVolumes(self, inputNodes):
        """Voxels and geometry of the chosen volume nodes (main thread; nothing is changed).

        Args:
            inputNodes: ``{modality or alias: vtkMRMLScalarVolumeNode or None}``; None leaves a sequence out.

        Returns:
            ``{modality: (array (I, J, K), ijk_to_ras (4, 4), node, node name)}`` in t1n, t1c, t2w, t2f order; the
            first is the reference grid. The worker uses the arrays and names, never the nodes.
        """
        from SegLensLogic.data.cases import MODALITIES, canonical_modality

        given = {}
        for name, node in inputNodes.items():
            if node is None:
                continue
            try:
                given[canonical_modality(name)] = node
            except ValueError as exc:
                raise self._error(str(exc)) from None
        if not given:
            raise self._error(_("select at least one input volume (T1, T1 contrast, T2 or FLAIR)"))
        volumes = {}
        for modality in [m for m in MODALITIES if m in given]:
            node = given[modality]
            if node.GetImageData() is None:
                raise self._error(_("volume '{name}' ({modality}) has no voxels").format(name=node.GetName(), modality=modality))
            array = nodes.volume_array(node)
            problem = inputs.not_an_mri(array, node.IsA("vtkMRMLLabelMapVolumeNode"))
            if problem:
                raise self._error(_("volume '{name}' ({modality}) {problem}").format(name=node.GetName(), modality=modality, problem=problem))
            volumes[modality] = (array, nodes.ijk_to_ras(node), node, node.GetName())
        return volumes

    def caseFromArrays(self, volumes, caseId=None):
        """A ``CaseImages`` and notes from :meth:`readVolumes` output (no MRML; may run on the worker).

        Volumes on another grid than the first are resampled onto it (linear interpolation), each with a note.
        """
        import numpy as np

        from SegLensLogic.data.cases import case_from_arrays

        ordered = list(volumes.items())
        reference_modality, (reference_array, reference_affine, _node, reference_name) = ordered[0]
        shape = tuple(reference_array.shape)
        arrays, notes = {}, []
        for modality, (array, affine, _node, name) in ordered:
            if tuple(array.shape) != shape or not np.allclose(affine, reference_affine, atol=nodes.GEOMETRY_TOLERANCE):
                array = nodes.resample_to_grid(array, affine, shape, reference_affine)
                notes.append(_("'{name}' ({modality}) was on another grid: resampled onto the grid of '{reference}' "
                               "({reference_modality}) by linear interpolation.").format(
                    name=name, modality=modality, reference=reference_name, reference_modality=reference_modality))
            arrays[modality] = array
        return case_from_arrays(arrays, reference_affine, caseId or reference_name), notes

    def caseFromVolumes(self, inputNodes, caseId=None):
        """A ``CaseImages`` from volume nodes ``{modality: vtkMRMLScalarVolumeNode}`` (arrays copied, no disk).

        The first node (in t1n, t1c, t2w, t2f order) is the reference grid; the others are resampled onto it when
        their grid differs (see :attr:`inputNotes`).
        """
        volumes = self.readVolumes(inputNodes)
        case, self.inputNotes = self.caseFromArrays(volumes, caseId)
        self.inputNodes = {m: v[2] for m, v in volumes.items()}
        self.referenceNode = next(iter(self.inputNodes.values()))
        return case

    # -- session ------------------------------------------------------------------------------------------------------
    def createSession(self, case, bundlePath=None, modelDir=None, saeDir=None, labelsPath=None, alignmentPaths=(),
                      device=None):
        """A new ``SteeringSession`` for ``case`` from a bundle folder (or model and SAE folders); no MRML, and the
        current session is kept (:meth:`useSession` switches). Returns ``(session, bundle or None)``.

        Raises:
            SegLensError: the bundle's model needs a sequence the case lacks (models trained with missing sequences
                accept such cases, the missing channels set to zero).
        """
        from SegLensLogic.steering import SteeringSession

        if bundlePath:
            from SegLensLogic.bundle import load_bundle

            bundle = load_bundle(bundlePath)
            missing = [m for m in bundle.modalities if m not in case.images]
            if missing:
                if not bundle.accepts_missing_modalities:
                    raise self._error(_("bundle '{bundle}' needs input volumes for {missing} (its model was not trained to work "
                                        "without them)").format(bundle=bundle.name, missing=", ".join(missing)))  # fmt: skip
            return bundle.open_session(case, device=device), bundle
        session = SteeringSession.open(modelDir, saeDir, case, labels=labelsPath, alignments=list(alignmentPaths), device=device)
        return session, None

    def useSession(self, session, bundle=None, inputNodes=None, referenceNode=None, signature=None, bundlePath=None):
        """Make ``session`` the current one (main thread): SegLens heatmaps and the preview of the previous session
        are removed; its segmentation nodes stay in the scene. The session is bound to its input nodes (see
        :meth:`bindInputs`; ``signature``: :meth:`inputSignature` taken when the voxels were read)."""
        from SegLensLogic.bundle import class_colours

        self.clearHeatmaps()
        self.clearPreview()
        self.session = session
        self.bundle = bundle
        if inputNodes is not None:
            self.inputNodes = dict(inputNodes)
            self.referenceNode = referenceNode or next(iter(self.inputNodes.values()))
        if bundle is not None:
            self.classNames = list(bundle.class_names)
            self.classColours = [tuple(c) for c in bundle.colours]
        else:
            config = session.model.config
            self.classNames = list(config.class_names)
            self.classColours = [tuple(c) for c in class_colours(config.label_scheme, len(config.class_names))]
        self.colourTableNode = None  # made again for the new classes when the segmentation is shown
        self.segmentationNodes = []
        self.originalSegmentationNode = None
        self.bindInputs(self.inputNodes, bundlePath, signature)
        return session

    # -- the session's inputs: a session is stale once they change ------------------------------------------------------
    @staticmethod
    def inputSignature(inputNodes):
        """What a session is made from (main thread): ``{modality: (node ID, modification time of its voxels)}`` of
        the chosen nodes (None left out). Replacing or modifying a node's image data changes its time."""
        signature = {}
        for modality, node in inputNodes.items():
            if node is not None:
                image = node.GetImageData()
                signature[modality] = (node.GetID(), int(image.GetMTime()) if image is not None else 0)
        return signature

    def bindInputs(self, inputNodes, bundlePath=None, signature=None):
        """Bind the current session to its input nodes (``signature``, else theirs now) and bundle folder."""
        self.sessionInputs = dict(signature) if signature is not None else self.inputSignature(inputNodes or {})
        self.sessionBundlePath = str(bundlePath) if bundlePath else None

    def isStale(self, inputNodes=None, bundlePath=None):
        """Whether the current session no longer matches its inputs (False without a segmented session).

        Stale when the voxels of one of its input nodes were modified (or the node removed) after its voxels were
        read, when ``inputNodes`` (the nodes chosen now, ``{modality: node or None}``) are not the very nodes it was
        made from, or when ``bundlePath`` is another folder than its bundle's. Choosing back the same, unmodified
        nodes makes it current again; modified voxels stay stale until a new session is made (Segment).
        """
        if not self.isSegmented() or not self.sessionInputs:
            return False
        for modality, (nodeID, mtime) in self.sessionInputs.items():
            node = self.scene.GetNodeByID(nodeID)
            if node is None or self.inputSignature({modality: node}) != {modality: (nodeID, mtime)}:
                return True
        if inputNodes is not None:
            chosen = {m: n.GetID() for m, n in inputNodes.items() if n is not None}
            if chosen != {m: v[0] for m, v in self.sessionInputs.items()}:
                return True
        if bundlePath is not None and self.sessionBundlePath is not None:
            if os.path.normpath(str(bundlePath)) != os.path.normpath(self.sessionBundlePath):
                return True
        return False

    def openSession(self, case, bundlePath=None, modelDir=None, saeDir=None, labelsPath=None, alignmentPaths=(),
                    device=None):
        """Create and use a session (the Python console's one call; see :meth:`createSession`)."""
        session, bundle = self.createSession(case, bundlePath, modelDir, saeDir, labelsPath, alignmentPaths, device)
        return self.useSession(session, bundle)

    def _requireSession(self):
        if self.session is None:
            raise self._error(_("no SegLens session: choose input volumes and a bundle, then press Segment"))
        return self.session

    def isSegmented(self):
        """Whether the current session has run the model (nothing on the session segments on demand after this)."""
        return self.session is not None and getattr(self.session, "forward", None) is not None

    def numberOfSlices(self):
        """Axial slices of the input (the model's slicing axis)."""
        return int(self._requireSession().num_slices) if self.isSegmented() else 0

    def missingModalities(self):
        """Sequences the model expected and the case lacks (set to zero); empty before segmenting."""
        return list(self.session.prepared.missing_modalities) if self.isSegmented() else []

    # -- segmentation -------------------------------------------------------------------------------------------------
    @staticmethod
    def _phase(progress, phase):
        """A SegLensLogic ``progress(done, total)`` that reports within ``phase``."""
        if progress is None:
            return None
        return lambda done, total: progress(done, total, phase)

    def segmentSession(self, session, progress=None):
        """Run the unedited model over ``session``'s case (worker thread): labels ``(I, J, K)`` on the input grid.

        ``progress`` sees two phases, each counted from 0 to its own total: the model over the slices (encoded and decoded in one pass), then the latent codes.
        """
        def report(done, total):
            half = total / 2.0 if total else 0.0
            if done <= half:  # SegLensLogic counts both halves in one range: encoding, then decoding
                return progress(done, half, SEGMENT_PHASES[0])
            return progress(done - half, half, SEGMENT_PHASES[1])

        return session.segment(progress=None if progress is None else report)

    def computeSegmentation(self, progress=None):
        """Run the unedited model over the current session's case (worker thread)."""
        return self.segmentSession(self._requireSession(), progress)

    def prepareAndSegment(self, volumes, bundlePath, progress=None):
        """One Segment job (worker thread): case from :meth:`readVolumes` output, a new session from the bundle, the
        model's labels. Nothing current changes: the main thread adopts the result (:meth:`useSession`)."""
        if progress is not None:
            progress(0, 0, _("Reading the input volumes"))
        case, notes = self.caseFromArrays(volumes)
        # The first Segment imports PyTorch (seconds): here, on the worker, never on the main thread.
        if progress is not None and progress(0, 0, _("Loading PyTorch and the model")) is False:
            from SegLensLogic.segmentation.inference import PredictionCancelled

            raise PredictionCancelled("segmentation cancelled")
        from SegLensLib.dependencies import device_description

        device = device_description()
        session, bundle = self.createSession(case, bundlePath)
        labels = self.segmentSession(session, progress)
        inputNodes = {m: v[2] for m, v in volumes.items()}
        return SegmentResult(session, bundle, labels, notes, inputNodes, next(iter(inputNodes.values())), device)

    def showSegmentation(self, labels, name=None, outputNode=None):
        """The original result from ``labels`` as a segmentation node (named, coloured class segments): a new node,
        or ``outputNode`` (a segmentation node the user chose as the output; its segments are replaced)."""
        if self.colourTableNode is None or self.scene.GetNodeByID(self.colourTableNode.GetID()) is None:
            self.colourTableNode = self._sameColourTable() or nodes.colour_table_node(self.scene, self.classNames, self.classColours, "SegLens classes")
        if outputNode is not None and self.scene.GetNodeByID(outputNode.GetID()) is None:
            outputNode = None  # removed meanwhile: a new node, as for no choice
        node = nodes.segmentation_from_labels(
            self.scene, labels, self.referenceNode, self.colourTableNode, name or f"{self.referenceNode.GetName()} SegLens",
            node=outputNode,
        )
        node.SetAttribute("SegLens.Role", "original")
        node.SetAttribute("SegLens.Edits", "0")
        self.originalSegmentationNode = node
        self.segmentationNodes = [node]
        self._showOnly(node)
        return node

    def _sameColourTable(self):
        """A "SegLens classes" table already in the scene with exactly these classes and colours (one per scene, not
        one per Segment), or None."""
        for index in range(self.scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode")):
            table = self.scene.GetNthNodeByClass(index, "vtkMRMLColorTableNode")
            if not (table.GetName() or "").startswith("SegLens classes") or table.GetNumberOfColors() != len(self.classNames):
                continue
            rgba = [0.0, 0.0, 0.0, 0.0]
            same = True
            for value, (name, colour) in enumerate(zip(self.classNames, self.classColours)):
                table.GetColor(value, rgba)
                if table.GetColorName(value) != name or any(abs(a * 255.0 - float(c)) > 0.5 for a, c in zip(rgba[:3], colour)):
                    same = False
                    break
            if same:
                return table
        return None

    def segment(self, progress=None):
        """Segment the opened case and return the new segmentation node (main thread)."""
        return self.showSegmentation(self.computeSegmentation(progress))

    @property
    def currentSegmentationNode(self):
        return self.segmentationNodes[-1] if self.segmentationNodes else None

    # -- slices and latents -----------------------------------------------------------------------------------------
    def sliceIndexOfPoint(self, ras):
        """The model's axial slice index under a RAS point (mm). Never segments: raises before Segment."""
        if not self.isSegmented():
            raise self._error(_("the case is not segmented yet: press Segment first"))
        return int(self.session.slice_of_point(tuple(float(x) for x in ras)))

    def sliceIndexInView(self, sliceNode):
        """The axial slice a slice view shows, or None (not segmented yet, or the view is outside the volume).

        Only the view's plane counts, not where it is panned to, and nothing is computed but geometry.
        """
        from SegLensLogic.errors import SegLensError

        if not self.isSegmented() or self.referenceNode is None:
            return None
        try:
            return self.sliceIndexOfPoint(nodes.slice_plane_point(sliceNode, self.referenceNode))
        except SegLensError:  # the slice shown is outside the volume
            return None

    def computeLatentTable(self, sliceIndex=None):
        """Every latent active in the volume, with its activation in ``sliceIndex`` (worker thread)."""
        return self._requireSession().latent_table(slice_index=sliceIndex)

    def latentTable(self, sliceIndex=None, category=latenttable.ALL, status=latenttable.ALL,
                    sortColumn="slice_activation", descending=True, rows=None):
        """Rows ``{id, label, category, status, shared_with, slice_activation, volume_activation}``, filtered and
        sorted (``rows``: ones computed before by :meth:`computeLatentTable`)."""
        rows = self.computeLatentTable(sliceIndex) if rows is None else rows
        if sliceIndex is None and sortColumn == "slice_activation":
            sortColumn = "volume_activation"
        return latenttable.sort_rows(latenttable.filter_rows(rows, category, status), sortColumn, descending)

    def latentLabel(self, latent, rows=None):
        for row in rows if rows is not None else self._requireSession().latent_table():
            if int(row["id"]) == int(latent):
                return row.get("label") or row.get("category") or ""
        return ""

    def computeHeatmaps(self, latents):
        """``{latent: (activation volume float32 (I, J, K) in VTK order, label, maximum)}`` for latents without a
        heatmap node yet (worker: everything but the copy into the node is done here)."""
        session = self._requireSession()
        wanted = [int(j) for j in latents if int(j) not in self.heatmapNodes]
        rows = session.latent_table() if wanted else []
        computed = {}
        for j in wanted:
            heat = session.heatmap(j).astype("float32")
            computed[j] = (nodes.VtkOrder(heat), self.latentLabel(j, rows), float(heat.max()) if heat.size else 0.0)
        return computed

    def showHeatmaps(self, latents, threshold=0.1, opacity=0.5, colourNodeID=None, computed=None):
        """Heatmap volumes for exactly ``latents`` (other SegLens heatmaps are removed), shown as layers: the first
        as the slice views' foreground, the others in Slicer 5.10's extra layers.

        Args:
            threshold: fraction (0-1) of each latent's largest activation below which voxels are transparent.
            opacity: layer opacity (0-1).
            colourNodeID: a colour node ID; default Inferno (or another heat map present in the scene).
            computed: :meth:`computeHeatmaps` output for latents without a node (computed here when None).

        Returns:
            The heatmap volume nodes, in the order of ``latents``.
        """
        latents = [int(j) for j in latents]
        for latent in [j for j in self.heatmapNodes if j not in latents]:
            self.removeHeatmap(latent)
        computed = self.computeHeatmaps(latents) if computed is None else computed
        shown = []
        for latent in latents:
            node = self.heatmapNodes.get(latent)
            if node is None or self.scene.GetNodeByID(node.GetID()) is None:
                if latent not in computed:
                    computed.update(self.computeHeatmaps([latent]))
                heat, label, maximum = computed[latent]
                name = f"SegLens latent {latent}" + (f": {label}" if label else "")
                node = nodes.add_volume_like(self.scene, self.referenceNode, heat, name)
                node.SetAttribute("SegLens.Latent", str(latent))
                node.SetAttribute("SegLens.Maximum", repr(maximum))
                self.heatmapNodes[latent] = node
            shown.append(node)
        self.setHeatmapDisplay(threshold, opacity, colourNodeID or nodes.heatmap_colour_node_id(self.scene))
        if shown:
            self.rememberViewLayers((BACKGROUND_LAYER,) + HEATMAP_LAYERS)
            nodes.show_heatmap_layers(self.scene, self.referenceNode, shown, opacity)
        else:  # no heatmap to show: the views get back what they showed in those layers
            self.restoreViewLayers(HEATMAP_LAYERS)
        return shown

    def showHeatmap(self, latent, threshold=0.1, opacity=0.5, colourNodeID=None):
        """One latent's heatmap (others made by SegLens are removed); see :meth:`showHeatmaps`."""
        return self.showHeatmaps([latent], threshold, opacity, colourNodeID)[0]

    def setHeatmapDisplay(self, threshold=None, opacity=None, colourNodeID=None):
        """Change how the heatmaps look (display nodes and layer opacity only: their voxels are not touched)."""
        for node in self.heatmapNodes.values():
            upper = float(node.GetAttribute("SegLens.Maximum") or 0.0)
            display = node.GetDisplayNode()
            lower = display.GetLowerThreshold() if threshold is None else float(threshold) * upper
            nodes.style_heatmap(node, upper, lower, colourNodeID or display.GetColorNodeID())
        if opacity is not None:
            nodes.set_heatmap_opacity(self.scene, list(self.heatmapNodes.values()), opacity)

    def removeHeatmap(self, latent):
        node = self.heatmapNodes.pop(int(latent), None)
        if node is not None and self.scene.GetNodeByID(node.GetID()) is not None:
            self.scene.RemoveNode(node)

    def clearHeatmaps(self):
        for latent in list(self.heatmapNodes):
            self.removeHeatmap(latent)
        self.restoreViewLayers(HEATMAP_LAYERS)

    # -- steering -----------------------------------------------------------------------------------------------------
    def makeEdit(self, latents, mode="scale", alpha=1.0, region="whole volume", sliceIndex=None, sliceRange=None):
        """A ``LatentEdit`` from the panel's choices.

        Args:
            latents: latent ids.
            mode: ``scale``, ``add`` or ``zero``.
            region: ``current slice`` (needs ``sliceIndex``), ``slice range`` (``sliceRange=(first, last)``,
                inclusive) or ``whole volume``.
        """
        from SegLensLogic.steering import LatentEdit, Region

        if not latents:
            raise self._error(_("select one or more latents in the table to steer"))
        if region == "current slice":
            if sliceIndex is None:
                raise self._error(_("no current slice: show the input in the Red view, inside the volume"))
            where = Region.slice(int(sliceIndex))
        elif region == "slice range":
            first, last = (int(round(float(v))) for v in sliceRange)
            where = Region.slices(min(first, last), max(first, last) + 1)
        elif region == "whole volume":
            where = Region.volume()
        else:
            raise self._error(_("unknown region '{region}'; choose one of {regions}").format(region=region, regions=", ".join(REGIONS)))
        return LatentEdit(latents=tuple(int(j) for j in latents), mode=mode, alpha=float(alpha), region=where)

    def computePreview(self, edit, sliceIndex):
        """What ``edit`` (or a list of edits: a fix) changes on slice ``sliceIndex``, on top of the current edits
        (worker thread): a :class:`SlicePreview` of that slice alone (``nodes.CHANGE_CLASSES``: 1 added,
        2 removed, 3 relabelled; 0 elsewhere), with the count of each change."""
        import numpy as np

        before, after = self._requireSession().preview_slice(edit, int(sliceIndex))
        changes = nodes.change_map(before, after)
        counts = tuple(int(n) for n in np.bincount(changes.ravel(), minlength=4)[1:4])
        return SlicePreview(int(sliceIndex), changes, counts)

    def showPreview(self, preview, opacity=0.8):
        """Show a :class:`SlicePreview` in the slice views' label layer: one labelmap node, reused, into which only
        the previewed slice is written (the slice shown before is cleared)."""
        import numpy as np

        if self.changeColourTableNode is None or self.scene.GetNodeByID(self.changeColourTableNode.GetID()) is None:
            self.changeColourTableNode = nodes.change_colour_table(self.scene)
        if self.previewNode is None or self.scene.GetNodeByID(self.previewNode.GetID()) is None:
            empty = nodes.VtkOrder(np.zeros(nodes.volume_shape(self.referenceNode), dtype=np.uint8))
            self.previewNode = nodes.add_volume_like(self.scene, self.referenceNode, empty, "SegLens preview", "vtkMRMLLabelMapVolumeNode")
            self.previewNode.SetAttribute("SegLens.Role", "preview")
            self.previewNode.GetDisplayNode().SetAndObserveColorNodeID(self.changeColourTableNode.GetID())
            self._previewSlice = None
        voxels = slicer.util.arrayFromVolume(self.previewNode)  # VTK's memory, (K, J, I): written in place
        ras = self._requireSession().prepared.orientation.ras_view(voxels.transpose(2, 1, 0))
        if self._previewSlice is not None and self._previewSlice != preview.sliceIndex:
            ras[:, :, self._previewSlice] = 0
        ras[:, :, preview.sliceIndex] = preview.changes
        self._previewSlice = preview.sliceIndex
        slicer.util.arrayFromVolumeModified(self.previewNode)
        self.rememberViewLayers((LABEL_LAYER,))  # the user's label map there comes back when the preview goes
        nodes.show_layers(self.scene, label=self.previewNode, label_opacity=opacity)
        return self.previewNode

    def clearPreview(self):
        """Remove the preview (its inputs changed, or an edit was applied or undone)."""
        node, self.previewNode = self.previewNode, None
        if node is not None and self.scene.GetNodeByID(node.GetID()) is not None:
            self.scene.RemoveNode(node)
        self.restoreViewLayers((LABEL_LAYER,))

    # -- the slice views' layers --------------------------------------------------------------------------------------
    def _compositeNodes(self):
        return [self.scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
                for i in range(self.scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode"))]  # fmt: skip

    def rememberViewLayers(self, layers):
        """Remember what every slice view shows in ``layers`` (composite node layer indices), before SegLens puts its
        own volumes there; a layer already remembered keeps the first (the user's) record."""
        for composite in self._compositeNodes():
            for layer in layers:
                key = (composite.GetID(), int(layer))
                if key not in self.userLayers:
                    self.userLayers[key] = (composite.GetNthLayerVolumeID(int(layer)), composite.GetNthLayerOpacity(int(layer)))

    def shownBySegLens(self, volumeID):
        """Whether a layer showing ``volumeID`` shows what SegLens put there: a heatmap, the preview, the input it set
        as background, or nothing (a removed node)."""
        node = self.scene.GetNodeByID(volumeID) if volumeID else None
        if node is None:
            return True
        return (node.GetAttribute("SegLens.Latent") is not None or node.GetAttribute("SegLens.Role") == "preview"
                or (self.referenceNode is not None and node.GetID() == self.referenceNode.GetID()))  # fmt: skip

    def restoreViewLayers(self, layers=None):
        """Put back what the slice views showed in ``layers`` (every remembered layer when None) before SegLens used
        them, where a SegLens volume (or nothing) is shown now: a volume the user chose meanwhile stays. A view that
        had no background keeps the input SegLens put there. Last layers first: emptying an extra layer removes it,
        and the ones after it move down."""
        for key in sorted((k for k in self.userLayers if layers is None or k[1] in layers), key=lambda k: -k[1]):
            volumeID, opacity = self.userLayers.pop(key)
            composite = self.scene.GetNodeByID(key[0])
            if composite is None:
                continue
            current = composite.GetNthLayerVolumeID(key[1])
            if current == volumeID or not self.shownBySegLens(current):
                continue
            if volumeID and self.scene.GetNodeByID(volumeID) is None:
                volumeID = None  # the user's volume was removed meanwhile
            if key[1] == BACKGROUND_LAYER and not volumeID:
                continue
            composite.SetNthLayerVolumeID(key[1], volumeID)
            composite.SetNthLayerOpacity(key[1], opacity)

    def previewEdit(self, edit, sliceIndex):
        return self.showPreview(self.computePreview(edit, sliceIndex))

    def computeApply(self, edits, progress=None):
        """Apply ``edits`` (a ``LatentEdit`` or a list) on the session (worker thread): the corrected labels.

        Cancelled (``progress`` returned False) or failed, the session is left as it was.
        """
        session = self._requireSession()
        edits = list(edits) if isinstance(edits, (list, tuple)) else [edits]
        if not edits:
            raise self._error(_("nothing to apply"))
        before = len(session.edits)
        phase = _("Steering: re-segmenting the slices the edit changes")
        if len(edits) > 1:
            phase = _("Steering: re-segmenting the slices the {count} edits change").format(count=len(edits))
        try:  # one step: every edit's change computed together, each changed slice decoded once; one Undo
            return session.apply(edits, progress=self._phase(progress, phase))
        except BaseException:
            while len(session.edits) > before:
                session.undo()
            raise

    def discardApply(self, count=1):
        """Undo ``count`` edits a cancelled Apply made after all (its result is not shown): the session is as it was."""
        if self.session is not None:
            for _step in range(int(count)):
                if self.session.edits:
                    self.session.undo()

    def showCorrected(self, labels, what="corrected"):
        """A new segmentation node for the current labels; earlier nodes (and the original) are kept."""
        number = len(self.segmentationNodes)
        node = nodes.segmentation_from_labels(
            self.scene, labels, self.referenceNode, self.colourTableNode,
            f"{self.referenceNode.GetName()} SegLens {what} {number}",
        )
        node.SetAttribute("SegLens.Role", what)
        node.SetAttribute("SegLens.Edits", str(len(self._requireSession().edits)))
        self.segmentationNodes.append(node)
        self.clearPreview()
        self._showOnly(node)
        return node

    def applyEdit(self, edit):
        return self.showCorrected(self.computeApply(edit))

    def computeSuggestion(self, population=None, method="ground-truth-free", progress=None):
        """A suggested correction for the case (worker thread; the session does not change): a ``Suggestion``
        whose ``edits`` are applied like any other edit (and so recorded in the recipe). ``progress`` returning
        False cancels within a batch of slices."""
        phase = _("Finding a correction ({method}): trying each strength").format(method=method)
        return self._requireSession().suggest(population or None, method, progress=self._phase(progress, phase))

    def computeRecipe(self, path, progress=None):
        """Replay a recipe file on the case from the model's own mask (worker thread): the recipe's labels.
        ``progress`` returning False cancels; cancelled or failed, the session keeps the edits it had.

        Raises:
            InputFileError: not a recipe, or one made with another model, SAE or voxel grid (the session is kept).
        """
        from SegLensLogic.steering import load_recipe

        if not path:
            raise self._error(_("choose a recipe file (.recipe.json, written by Export)"))
        session = self._requireSession()
        self._beforeRecipe = session.checkpoint()
        phase = _("Replaying {file}").format(file=Path(path).name)
        return session.apply_recipe(load_recipe(path), source=path, progress=self._phase(progress, phase))

    def discardRecipe(self):
        """Put back the edits from before a replay whose result comes after Cancel (it is not shown)."""
        if self.session is not None and self._beforeRecipe is not None:
            self.session.restore(self._beforeRecipe)
        self._beforeRecipe = None

    def showRecipe(self, labels, path):
        """A new segmentation node for a replayed recipe. A recipe replays from the model's own mask, so the earlier
        corrected nodes leave the undo history (they stay in the scene): Undo goes back to the original."""
        self.segmentationNodes = self.segmentationNodes[:1]
        node = self.showCorrected(labels, "recipe")
        node.SetAttribute("SegLens.Recipe", str(path))
        return node

    def loadRecipe(self, path):
        return self.showRecipe(self.computeRecipe(path), path)

    def undo(self):
        """Undo the last Apply (or recipe): its node is removed and the session steps back to the node before.

        Returns the segmentation node now current (the original after undoing everything).
        """
        session = self._requireSession()
        if len(self.segmentationNodes) < 2:
            raise self._error(_("nothing to undo"))
        node = self.segmentationNodes.pop()
        target = int(self.currentSegmentationNode.GetAttribute("SegLens.Edits") or 0)
        while len(session.edits) > target:
            session.undo()
        if self.scene.GetNodeByID(node.GetID()) is not None:
            self.scene.RemoveNode(node)
        self.clearPreview()
        self._showOnly(self.currentSegmentationNode)
        return self.currentSegmentationNode

    def _showOnly(self, shown):
        for node in self.segmentationNodes:
            display = node.GetDisplayNode()
            if display is not None:
                display.SetVisibility(node is shown)


    # -- fixing by pointing (hints) -------------------------------------------------------------------------------
    def hintNode(self, sign, create=True):
        """The markups point list of ``sign`` (``+`` or ``-``) that SegLens reads hints from (made when missing)."""
        for index in range(self.scene.GetNumberOfNodesByClass("vtkMRMLMarkupsFiducialNode")):
            node = self.scene.GetNthNodeByClass(index, "vtkMRMLMarkupsFiducialNode")
            if node.GetAttribute("SegLens.HintSign") == sign:
                return node
        if not create:
            return None
        node = self.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", HINT_LISTS[sign])
        node.SetAttribute("SegLens.HintSign", sign)
        node.SetControlPointLabelFormat(sign)
        if node.GetDisplayNode() is None:
            node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        if display is not None:
            display.SetSelectedColor(*HINT_COLOURS[sign])
            display.SetColor(*HINT_COLOURS[sign])
        return node

    def setHintClass(self, className):
        """What the next + points say: ``any tumour class`` or one of the model's classes (their label, e.g. +edema)."""
        node = self.hintNode("+")
        node.SetControlPointLabelFormat("+" if not className or className == ANY_TUMOUR else "+" + className)

    def hintCount(self):
        return sum(node.GetNumberOfControlPoints() for node in (self.hintNode(s, create=False) for s in HINT_LISTS) if node is not None)

    def readHints(self):
        """The hints of both point lists (main thread): each point's world position (RAS mm) and its label (``+``,
        ``+edema``, ``-``; a point renamed by hand keeps its list's sign and may name a class).

        Raises:
            SegLensError: a point names a class the model does not have (naming the point), or no point is placed.
        """
        from SegLensLogic.steering.hints import Hint, class_index

        hints = []
        for sign in HINT_LISTS:
            node = self.hintNode(sign, create=False)
            if node is None:
                continue
            for index in range(node.GetNumberOfControlPoints()):
                position = [0.0, 0.0, 0.0]
                node.GetNthControlPointPositionWorld(index, position)
                label = (node.GetNthControlPointLabel(index) or "").strip()
                said = label[1:] if label[:1] in HINT_LISTS else label
                said = said.rstrip("0123456789-_ ").strip()  # Slicer may number points ("+edema-2")
                try:
                    cls = class_index(said, self.classNames) if said else None
                except Exception as exc:
                    raise self._error(_("point '{label}' of '{list}': {problem}").format(label=label, list=node.GetName(), problem=exc)) from None
                hints.append(Hint(tuple(position), sign, cls))
        if not hints:
            raise self._error(_("place at least one point first: + on missed tumour, - on false tumour"))
        return hints

    def computeFix(self, hints):
        """The latent edit that agrees with ``hints`` (worker thread; the session does not change): a
        ``GuidedFix`` whose ``edits`` Apply applies like any other edit (and the recipe records)."""
        return self._requireSession().fix(hints, self.fixOptions)

    def clearHints(self):
        for sign in HINT_LISTS:
            node = self.hintNode(sign, create=False)
            if node is not None:
                node.RemoveAllControlPoints()

    def hintMeasurement(self):
        """What the bundle's build measured of fixing by pointing on real failures (one line), or ''."""
        figures = getattr(self.bundle, "figures", None) or {}
        measured = figures.get("hints")
        if not measured:
            return ""
        return str(measured.get("summary_line", ""))

    def fixDescription(self, fix):
        if not fix.latents:
            return _("No latent to edit where the points are (no latent fires there): the mask stays the model's own.")
        if not fix.edits:
            return _("The fit moved none of the {count} latents firing at the points by 2 % or more: the model cannot be "
                     "steered to agree with them here; the mask stays its own.").format(count=len(fix.latents))  # fmt: skip
        latents = ", ".join("%d x%.2f" % (e.latents[0], e.alpha) for e in fix.edits)
        return _("Fix: {count} latent(s) scaled ({latents}) in slices {region}, fitted in {seconds} s.").format(
            count=len(fix.edits), latents=latents, region=self._regionText(fix.region), seconds="%.1f" % fix.seconds)

    @staticmethod
    def _regionText(region):
        if region.kind in ("slice", "slices"):
            return f"{region.start}-{region.stop - 1}"
        return _("around the points") if region.kind == "mask" else _("of the whole volume")

    # -- export -------------------------------------------------------------------------------------------------------
    def export(self, basePath, overwrite=False):
        """Write the current segmentation as ``<base>.seg.nrrd`` and ``<base>.nii.gz`` (+ its recipe JSON from
        the session, and ``<base>.ctbl``, Slicer's colour table of the label values), in one call (the panel runs
        :meth:`computeExport` on its worker between :meth:`exportTargets` and :meth:`finishExport`).

        Label values are the class indices (0 background, then the colour table's order) in every file. Nothing is
        written when any of the files exists (unless ``overwrite``).

        Returns:
            ``{"seg_nrrd", "nifti", "recipe", "colour_table"}`` -> Path.
        """
        targets = self.exportTargets(basePath, overwrite)
        return self.finishExport(targets, self.computeExport(targets, overwrite), overwrite)

    def exportTargets(self, basePath, overwrite=False):
        """The files an export writes, checked before anything is written (main thread): ``{"seg_nrrd", "nifti",
        "colour_table", "node"}`` (the segmentation node to write).

        Raises:
            OutputExistsError: one of the files exists and ``overwrite`` is not set.
        """
        from SegLensLogic.errors import refuse_existing
        from SegLensLogic.steering import recipe_path_for

        self._requireSession()
        node = self.currentSegmentationNode
        if node is None:
            raise self._error(_("nothing to export: press Segment first"))
        base = Path(str(basePath))
        for suffix in (".seg.nrrd", ".nii.gz", ".ctbl"):
            if base.name.endswith(suffix):
                base = base.with_name(base.name[: -len(suffix)])
        targets = {"seg_nrrd": base.with_name(base.name + ".seg.nrrd"), "nifti": base.with_name(base.name + ".nii.gz"),
                   "colour_table": base.with_name(base.name + ".ctbl")}  # fmt: skip
        for path in (*targets.values(), recipe_path_for(targets["nifti"])):
            refuse_existing(path, overwrite)
        return {**targets, "node": node}

    def computeExport(self, targets, overwrite=False):
        """The NIfTI labels and their recipe, from the session (worker thread: no MRML): ``(nifti, recipe)`` paths."""
        nifti, recipe = self._requireSession().export(targets["nifti"], overwrite=overwrite)
        return Path(nifti), Path(recipe)

    def finishExport(self, targets, written, overwrite=False):
        """The ``.seg.nrrd`` and the colour table, through Slicer's writers (main thread); returns every path."""
        nodes.write_segmentation(targets["node"], targets["seg_nrrd"], overwrite=overwrite)
        nodes.write_colour_table(self.colourTableNode, targets["colour_table"], overwrite=overwrite)
        return {"seg_nrrd": targets["seg_nrrd"], "nifti": written[0], "recipe": written[1], "colour_table": targets["colour_table"]}

    def clear(self):
        """Forget the session (the scene is closing: its nodes go with it)."""
        self.session = None
        self.bundle = None
        self.inputNodes = {}
        self.referenceNode = None
        self.colourTableNode = None
        self.changeColourTableNode = None
        self.segmentationNodes = []
        self.originalSegmentationNode = None
        self.heatmapNodes = {}
        self.previewNode = None
        self.userLayers = {}
        self.sessionInputs = {}
        self.sessionBundlePath = None


#
# SegLensWidget
#
class SegLensWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel. It reads the GUI into the parameter node, starts logic calls as jobs on the worker (one at a time,
    every control that starts work disabled meanwhile) and shows their results."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.worker = None
        self.job = None  # the Job in flight
        self.pending = set()  # coalesced requests (table, heatmaps, preview) to start when the worker is free
        self.allRows = []  # the latent table's rows as computed (filters apply to these)
        self.rows = []  # the rows shown
        self.currentSlice = None
        self.suggestion = None
        self.pendingFix = None  # the last Fix, until applied or its points change
        self.lastFix = None
        self._hintNodes = []
        self.droppedResults = 0  # results not shown: stale (their inputs changed), cancelled or orphaned
        self.versionLabel = None
        self._parameterNode = None
        self._updatingGUI = False
        self._writingParameters = False
        self._updatingTable = False
        self._sessionNumber = 0
        self._previewShown = None
        self._knownVolumeIDs = set()
        self._sliceNode = None
        self._shown = False  # between enter() and exit(): observers, timers and view jobs only then
        self._stale = False  # the session no longer matches the chosen inputs (see SegLensLogic.isStale)
        self._inputNotes = ""  # what Segment said about the session's inputs
        self._observedInputs = []  # the session's input nodes, watched for new voxels while the module is shown

    # -- set-up and tear-down -----------------------------------------------------------------------------------------
    def setup(self):
        import qt

        ScriptedLoadableModuleWidget.setup(self)
        problem = versionProblem()
        if problem:
            self.versionLabel = qt.QLabel(problem)
            self.versionLabel.wordWrap = True
            self.layout.addWidget(self.versionLabel)
            return
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SegLens.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SegLensLogic()
        self.worker = Worker()

        self.ui.modeComboBox.clear()
        self.ui.modeComboBox.addItems(list(STEERING_MODES))
        self.ui.regionComboBox.clear()
        self.ui.regionComboBox.addItems(list(REGIONS))
        self.ui.suggestionMethodComboBox.clear()
        self.ui.suggestionMethodComboBox.addItems(list(SUGGESTION_METHODS))
        self.ui.populationComboBox.clear()
        self.ui.populationComboBox.addItems([NO_POPULATION])
        self.ui.hintClassComboBox.clear()
        self.ui.hintClassComboBox.addItems([ANY_TUMOUR])
        self.shippedModels = shippedModels()
        self.ui.modelComboBox.clear()
        self.ui.modelComboBox.addItems([title for title, _path in self.shippedModels] + [OTHER_BUNDLE])
        for combo in (self.ui.categoryFilterComboBox, self.ui.statusFilterComboBox):
            combo.clear()
            combo.addItems([latenttable.ALL])
        table = self.ui.latentTableWidget
        table.setColumnCount(len(latenttable.HEADERS))
        table.setHorizontalHeaderLabels(list(latenttable.HEADERS))
        table.setSortingEnabled(True)
        table.sortItems(latenttable.COLUMNS.index("slice_activation"), qt.Qt.DescendingOrder)
        self.ui.progressBar.hide()
        self.ui.cancelButton.enabled = False
        folder = slicer.util.settingsValue(EXPORT_FOLDER_SETTING, "")
        if folder:
            self.ui.exportDirectoryButton.directory = folder

        for name in MODALITY_SELECTORS.values():
            getattr(self.ui, name).connect("currentNodeChanged(vtkMRMLNode*)", self.onInputsChanged)
        self.ui.bundlePathLineEdit.connect("currentPathChanged(QString)", self.onBundleChanged)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChosen)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegment)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.followSliceCheckBox.connect("toggled(bool)", self.onFollowSliceToggled)
        self.ui.latentTableWidget.connect("itemSelectionChanged()", self.onLatentSelection)
        self.ui.categoryFilterComboBox.connect("currentIndexChanged(int)", self.onFiltersChanged)
        self.ui.statusFilterComboBox.connect("currentIndexChanged(int)", self.onFiltersChanged)
        self.ui.heatmapThresholdSliderWidget.connect("valueChanged(double)", self.onHeatmapDisplayChanged)
        self.ui.heatmapOpacitySliderWidget.connect("valueChanged(double)", self.onHeatmapDisplayChanged)
        self.ui.heatmapColorSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onHeatmapDisplayChanged)
        self.ui.modeComboBox.connect("currentIndexChanged(int)", self.onSteeringChanged)
        self.ui.alphaSliderWidget.connect("valueChanged(double)", self.onSteeringChanged)
        self.ui.regionComboBox.connect("currentIndexChanged(int)", self.onSteeringChanged)
        self.ui.sliceRangeWidget.connect("valuesChanged(double,double)", self.onSteeringChanged)
        self.ui.livePreviewCheckBox.connect("toggled(bool)", self.onSteeringChanged)
        self.ui.populationComboBox.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.suggestionMethodComboBox.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.suggestButton.connect("clicked(bool)", self.onSuggest)
        self.ui.hintClassComboBox.connect("currentIndexChanged(int)", self.onHintClassChanged)
        self.ui.placePlusButton.connect("clicked(bool)", lambda checked=False: self.onPlaceHint("+"))
        self.ui.placeMinusButton.connect("clicked(bool)", lambda checked=False: self.onPlaceHint("-"))
        self.ui.fixButton.connect("clicked(bool)", self.onFix)
        self.ui.applyFixButton.connect("clicked(bool)", self.onApplyFix)
        self.ui.clearHintsButton.connect("clicked(bool)", self.onClearHints)
        self.ui.applyButton.connect("clicked(bool)", self.onApply)
        self.ui.undoButton.connect("clicked(bool)", self.onUndo)
        self.ui.recipePathLineEdit.connect("currentPathChanged(QString)", self.onRecipePathChanged)
        self.ui.loadRecipeButton.connect("clicked(bool)", self.onLoadRecipe)
        self.ui.exportDirectoryButton.connect("directoryChanged(QString)", self.onExportFolderChanged)
        self.ui.exportNameLineEdit.connect("textChanged(QString)", self.updateParameterNodeFromGUI)
        self.ui.exportButton.connect("clicked(bool)", self.onExport)

        # Scrolling a slice view fires many Modified events: follow it once it settles.
        self._sliceTimer = qt.QTimer()
        self._sliceTimer.setSingleShot(True)
        self._sliceTimer.setInterval(150)
        self._sliceTimer.connect("timeout()", self.onSliceSettled)
        # The job in flight is polled from the main thread (never waited for in a nested event loop).
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(10)  # a preview takes tens of ms: its result is shown within 10 ms of it
        self._pollTimer.connect("timeout()", self.onPoll)
        # New volumes get their sequence from their name once the scene settles (names are set after adding).
        self._assignTimer = qt.QTimer()
        self._assignTimer.setSingleShot(True)
        self._assignTimer.setInterval(0)
        self._assignTimer.connect("timeout()", self.assignModalities)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneImported)
        self.initializeParameterNode()
        self.updateButtons()

    def enter(self):
        """The module is shown (Slicer's template): follow the scene's new volumes, the parameter node and the Red
        view again; heatmap layers and the live preview come back; work put off while hidden starts."""
        if self.logic is None:
            return
        self._shown = True
        if not self.hasObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self.onNodeAdded):
            self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self.onNodeAdded)
        self.initializeParameterNode()  # (new volumes added meanwhile get their sequence from their names here)
        self.observeRedSlice()
        self.observeSessionInputs()
        self.updateStaleState()  # (voxels may have changed while hidden)
        if self.logic.isSegmented():
            self.updateHeatmaps()
            self.onSliceSettled()
            self.requestPreview()
        self.startPending()
        self.updateButtons()

    def exit(self):
        """Another module is shown (Slicer's template): no observer of the views, scene additions or parameter node and
        no timer stays, no new table, heatmap or preview job starts, the preview goes and the slice views get back
        the layers SegLens borrowed. A Segment, Apply, Suggest, Fix or recipe job in flight runs to its end (its
        result is kept); a view job in flight is dropped and redone on enter()."""
        if self.logic is None:
            return
        self._shown = False
        for timer in (self._sliceTimer, self._assignTimer):
            timer.stop()
        self.pending.clear()
        self.observeSessionInputs(False)
        if self._sliceNode is not None:
            self.removeObserver(self._sliceNode, vtk.vtkCommand.ModifiedEvent, self.onSliceModified)
            self._sliceNode = None
        if self.hasObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self.onNodeAdded):
            self.removeObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self.onNodeAdded)
        if self._parameterNode is not None and self.hasObserver(self._parameterNode.parameterNode, vtk.vtkCommand.ModifiedEvent,
                                                                self.onParameterNodeModified):  # fmt: skip
            self.removeObserver(self._parameterNode.parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self.clearPreview()
        self.logic.restoreViewLayers()

    def cleanup(self):
        self.removeObservers()
        if self.logic is None:
            return
        for timer in (self._sliceTimer, self._pollTimer, self._assignTimer):
            timer.stop()
        if self.job is not None:
            self.job.orphaned = True
            self.job.cancel()
        self.worker.shutdown()

    def onSceneStartClose(self, caller=None, event=None):
        if self.job is not None:  # its result belongs to the scene that is closing
            self.job.orphaned = True
            self.job.cancel()
        self.pending.clear()
        self.setParameterNode(None)
        self.observeSessionInputs(False)
        self.logic.clear()
        self._stale, self._inputNotes = False, ""
        self._sessionNumber += 1
        self.allRows, self.rows, self.currentSlice, self.suggestion, self._previewShown = [], [], None, None, None
        self.pendingFix = None
        self._hintNodes = []
        self.ui.fixLabel.text = ""
        self._updatingTable = True
        self.ui.latentTableWidget.setRowCount(0)
        self._updatingTable = False
        self.ui.currentSliceLabel.text = "-"
        self.ui.suggestionLabel.text = ""
        self.ui.inputNotesLabel.text = ""
        self.ui.statusLabel.text = ""
        self._knownVolumeIDs = set()
        self.updateButtons()

    def onSceneEndClose(self, caller=None, event=None):
        self.initializeParameterNode()
        self.updateButtons()

    # -- parameter node -----------------------------------------------------------------------------------------------
    def initializeParameterNode(self):
        """Use the scene's SegLens parameter node; preselect the reference bundle and a heat colour map."""
        self.setParameterNode(self.logic.getParameterNode())
        parameters = self._parameterNode
        if not parameters.bundlePath:
            reference = referenceBundlePath()
            if reference is not None:
                parameters.bundlePath = str(reference)
        if parameters.colourNode is None:
            colour = nodes.heatmap_colour_node_id(slicer.mrmlScene)
            if colour:
                parameters.colourNode = slicer.mrmlScene.GetNodeByID(colour)
        self.assignModalities()

    def setParameterNode(self, parameterNode):
        if self._parameterNode is not None and self.hasObserver(self._parameterNode.parameterNode, vtk.vtkCommand.ModifiedEvent,
                                                                self.onParameterNodeModified):  # fmt: skip
            self.removeObserver(self._parameterNode.parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = parameterNode
        if parameterNode is not None:
            self.addObserver(parameterNode.parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
            self.updateGUIFromParameterNode()

    def onParameterNodeModified(self, caller=None, event=None):
        if not self._writingParameters:  # changed elsewhere: a scene was loaded, or the Python console
            self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self):
        parameters = self._parameterNode
        if parameters is None:
            return
        self._updatingGUI = True
        try:
            for modality, name in MODALITY_SELECTORS.items():
                getattr(self.ui, name).setCurrentNode(getattr(parameters, modality))
            self.ui.bundlePathLineEdit.currentPath = parameters.bundlePath
            self.showChosenModel()
            for combo, value in ((self.ui.modeComboBox, parameters.mode), (self.ui.regionComboBox, parameters.region),
                                 (self.ui.categoryFilterComboBox, parameters.category),
                                 (self.ui.statusFilterComboBox, parameters.status),
                                 (self.ui.populationComboBox, parameters.population or NO_POPULATION),
                                 (self.ui.suggestionMethodComboBox, parameters.suggestionMethod)):  # fmt: skip
                index = combo.findText(value)
                if index >= 0:
                    combo.currentIndex = index
            self.setAlpha(parameters.alpha)
            self.ui.sliceRangeWidget.minimumValue = parameters.firstSlice
            self.ui.sliceRangeWidget.maximumValue = parameters.lastSlice
            self.ui.livePreviewCheckBox.checked = parameters.livePreview
            self.ui.followSliceCheckBox.checked = parameters.followSlice
            self.ui.heatmapThresholdSliderWidget.value = parameters.threshold
            self.ui.heatmapOpacitySliderWidget.value = parameters.opacity
            if parameters.colourNode is not None:
                self.ui.heatmapColorSelector.setCurrentNode(parameters.colourNode)
            self.ui.recipePathLineEdit.currentPath = parameters.recipePath
            self.ui.exportNameLineEdit.text = parameters.exportName
            self.selectTableRows(self.selectedLatents())
        finally:
            self._updatingGUI = False
        self.updateStaleState()
        self.updateButtons()

    def updateParameterNodeFromGUI(self, *args):
        parameters = self._parameterNode
        if parameters is None or self._updatingGUI:
            return
        self._writingParameters = True
        try:
            with slicer.util.NodeModify(parameters):
                for modality, name in MODALITY_SELECTORS.items():
                    setattr(parameters, modality, getattr(self.ui, name).currentNode())
                parameters.bundlePath = self.ui.bundlePathLineEdit.currentPath
                parameters.mode = self.ui.modeComboBox.currentText
                parameters.alpha = float(self.ui.alphaSliderWidget.value)
                parameters.region = self.ui.regionComboBox.currentText
                parameters.firstSlice = int(round(self.ui.sliceRangeWidget.minimumValue))
                parameters.lastSlice = int(round(self.ui.sliceRangeWidget.maximumValue))
                parameters.category = self.ui.categoryFilterComboBox.currentText or latenttable.ALL
                parameters.status = self.ui.statusFilterComboBox.currentText or latenttable.ALL
                population = self.ui.populationComboBox.currentText
                parameters.population = "" if population == NO_POPULATION else population
                parameters.suggestionMethod = self.ui.suggestionMethodComboBox.currentText or SUGGESTION_METHODS[0]
                parameters.livePreview = bool(self.ui.livePreviewCheckBox.checked)
                parameters.followSlice = bool(self.ui.followSliceCheckBox.checked)
                parameters.threshold = float(self.ui.heatmapThresholdSliderWidget.value)
                parameters.opacity = float(self.ui.heatmapOpacitySliderWidget.value)
                parameters.colourNode = self.ui.heatmapColorSelector.currentNode()
                parameters.recipePath = self.ui.recipePathLineEdit.currentPath
                parameters.exportName = self.ui.exportNameLineEdit.text
        finally:
            self._writingParameters = False
        self.updateButtons()

    def setSelectedLatents(self, latents):
        """The latents to steer (what the label lists and Apply uses), kept in the parameter node."""
        if self._parameterNode is None:
            return
        self._writingParameters = True
        try:
            self._parameterNode.selectedLatents = [int(j) for j in latents]
        finally:
            self._writingParameters = False

    def selectedLatents(self):
        return [int(j) for j in self._parameterNode.selectedLatents] if self._parameterNode is not None else []

    # -- inputs -------------------------------------------------------------------------------------------------------
    def inputNodes(self):
        return {modality: getattr(self.ui, name).currentNode() for modality, name in MODALITY_SELECTORS.items()}

    def onInputsChanged(self, *args):
        self.updateParameterNodeFromGUI()
        if not self._updatingGUI:
            self.ui.inputNotesLabel.text = ""
            self.updateStaleState()

    def onModelChosen(self, index):
        """A shipped model chosen: its bundle folder goes into the bundle path (which the session is bound to)."""
        if self._updatingGUI or not 0 <= index < len(self.shippedModels):
            return
        self.ui.bundlePathLineEdit.currentPath = str(self.shippedModels[index][1])

    def showChosenModel(self):
        """The model chooser shows the shipped model whose folder the bundle path names, else 'other folder'."""
        current = self.ui.bundlePathLineEdit.currentPath
        index = next((i for i, (_title, path) in enumerate(self.shippedModels) if current and Path(current).resolve() == path),
                     len(self.shippedModels))  # fmt: skip
        updating, self._updatingGUI = self._updatingGUI, True
        try:
            self.ui.modelComboBox.currentIndex = index
        finally:
            self._updatingGUI = updating

    def onBundleChanged(self, *args):
        self.showChosenModel()
        self.updateParameterNodeFromGUI()
        if not self._updatingGUI:
            self.updateStaleState()

    def observeSessionInputs(self, observe=True):
        """Watch the session's input nodes (only while the module is shown): new voxels make the session stale."""
        events = (vtk.vtkCommand.ModifiedEvent, slicer.vtkMRMLVolumeNode.ImageDataModifiedEvent)
        for node in self._observedInputs:
            for event in events:
                self.removeObserver(node, event, self.onSessionInputModified)
        self._observedInputs = []
        if observe and self._shown and self.logic.isSegmented():
            self._observedInputs = [node for node in self.logic.inputNodes.values() if node is not None]
        for node in self._observedInputs:
            for event in events:
                self.addObserver(node, event, self.onSessionInputModified)

    def onSessionInputModified(self, caller=None, event=None):
        self.updateStaleState()

    def updateStaleState(self):
        """Whether the session is stale (its inputs changed after Segment: other nodes or bundle chosen, or an input's
        voxels modified). Becoming stale stops what works on the old case (Apply, preview, Fix, Suggest, Load recipe,
        Export), removes the preview and says to press Segment; the very same unmodified nodes chosen back make the
        session current again."""
        if self.logic is None:
            return False
        stale = self.logic.isStale(self.inputNodes(), self.ui.bundlePathLineEdit.currentPath)
        changed, self._stale = stale != self._stale, stale
        if stale:
            self.ui.inputNotesLabel.text = STALE_NOTICE
        elif self.logic.isSegmented() and (changed or not self.ui.inputNotesLabel.text):
            self.ui.inputNotesLabel.text = self._inputNotes
        if not changed:
            return stale
        if stale:
            self.pending.discard("preview")
            self.clearPreview()
            self.ui.statusLabel.text = STALE_NOTICE
        else:
            self.ui.statusLabel.text = _("The inputs are the segmented ones again.")
            self.requestPreview()
        self.updateButtons()
        return stale

    def refuseStale(self):
        """True, with the notice in the status line, when the session is stale (a script's call does nothing)."""
        if not self.updateStaleState():
            return False
        self.ui.statusLabel.text = STALE_NOTICE
        return True

    def onNodeAdded(self, caller=None, event=None):
        if not slicer.mrmlScene.IsImporting():  # a loaded scene brings its own choices in the parameter node
            self._assignTimer.start()

    def onSceneImported(self, caller=None, event=None):
        """A scene was loaded: its parameter node (node references now resolved) says what the panel shows, and its
        volumes are not new (none get their sequence guessed)."""
        scene = slicer.mrmlScene
        for index in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
            self._knownVolumeIDs.add(scene.GetNthNodeByClass(index, "vtkMRMLScalarVolumeNode").GetID())
        self.updateGUIFromParameterNode()

    def assignModalities(self):
        """Fill empty modality selectors with new volumes whose names clearly name their sequence."""
        if self._parameterNode is None:
            return
        volumes = {}
        scene = slicer.mrmlScene
        for index in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
            node = scene.GetNthNodeByClass(index, "vtkMRMLScalarVolumeNode")
            if node.GetClassName() != "vtkMRMLScalarVolumeNode" or node.GetID() in self._knownVolumeIDs:
                continue
            self._knownVolumeIDs.add(node.GetID())
            if not (node.GetName() or "").startswith("SegLens") and not node.GetAttribute("SegLens.Latent"):
                volumes[node.GetID()] = node.GetName() or ""
        current = {m: (n.GetID() if n is not None else None) for m, n in self.inputNodes().items()}
        chosen = inputs.assign_modalities(volumes, current)
        for modality, nodeID in chosen.items():
            getattr(self.ui, MODALITY_SELECTORS[modality]).setCurrentNodeID(nodeID)
        if chosen:
            chosenText = ", ".join("%s = '%s'" % (inputs.MODALITY_TITLES[m], scene.GetNodeByID(i).GetName()) for m, i in chosen.items())
            self.ui.statusLabel.text = _("Sequences from the volume names: {chosen} (change them above if they are wrong).").format(
                chosen=chosenText)

    # -- jobs -----------------------------------------------------------------------------------------------------------
    def startJob(self, kind, function, *args, done=None, key=None, cancellable=True, reports=False, discard=None, phase=""):
        """Run ``function(*args)`` on the worker (with ``progress=`` when it ``reports``); ``done(result)`` runs here
        when it succeeds, ``discard(result)`` when its result is dropped after all (cancelled or orphaned)."""
        progress = Progress(phase or JOB_TITLES[kind])
        future = self.worker.submit(function, *args, **({"progress": progress.callback} if reports else {}))
        self.job = Job(kind, future, progress, done, key, cancellable, discard)
        self.showJobProgress()
        self.ui.progressBar.show()
        self._pollTimer.start()
        self.updateButtons()
        return self.job

    def onPoll(self):
        job = self.job
        if job is None:
            self._pollTimer.stop()
            return
        self.showJobProgress()
        if not job.future.done():
            return
        self._pollTimer.stop()
        self.job = None
        self.ui.progressBar.hide()
        try:
            result = job.future.result()
        except BaseException as exc:  # the worker's exception, reported here on the main thread
            if job.orphaned:
                self.droppedResults += 1
                self.onJobOrphaned(job)
            elif job.cancelled or isCancellation(exc):
                self.onJobCancelled(job)
            else:
                self.showError(_("{job} failed").format(job=JOB_TITLES[job.kind]), exc)
        else:
            if job.orphaned or job.cancelled:
                self.dropResult(job, result)
            elif job.key is not None and job.key != self.currentKey(job.kind) or job.kind in VIEW_JOBS and not self._shown:
                self.droppedResults += 1  # stale (its inputs changed while it ran) or hidden: runs again when it can
                self.pending.add(job.kind)
            else:
                try:
                    job.done(result)
                except Exception as exc:
                    self.showError(_("{job} failed").format(job=JOB_TITLES[job.kind]), exc)
        self.updateButtons()
        self.startPending()

    def dropResult(self, job, result):
        """A result nobody wants any more (Cancel came after the job's last check, or the scene closed)."""
        self.droppedResults += 1
        if job.discard is not None:
            try:
                job.discard(result)
            except Exception:
                logging.exception("SegLens: could not undo a cancelled %s", job.kind)
        if job.orphaned:
            self.onJobOrphaned(job)
        elif job.cancelled:
            self.onJobCancelled(job)

    def onJobOrphaned(self, job):
        """A job of a scene that was closed has ended: the status line says so (it said "Cancelling: ..." meanwhile)."""
        if job.kind not in QUIET_JOBS:
            self.ui.statusLabel.text = _("{job} stopped: the scene was closed.").format(job=JOB_TITLES[job.kind])

    def onJobCancelled(self, job):
        if job.kind in ("segment", "apply"):
            self.updateStaleState()  # (Segment cleared the notes of the inputs: the kept session's come back)
            if self.logic.session is not None:
                self.ui.statusLabel.text = _("{job} cancelled; the previous segmentation and edits are kept.").format(job=JOB_TITLES[job.kind])
            else:
                self.ui.statusLabel.text = _("{job} cancelled; nothing was changed.").format(job=JOB_TITLES[job.kind])
            return
        if job.kind == "preview":  # what is on screen would no longer match the controls
            self.clearPreview()
        self.ui.statusLabel.text = _("{job} cancelled.").format(job=JOB_TITLES[job.kind])

    def showJobProgress(self):
        job = self.job
        if job is None:
            return
        phase, done, total = job.progress.snapshot()
        if job.kind in QUIET_JOBS:
            pass  # quick bookkeeping: the bar shows it, the status keeps the last result
        elif job.cancelled:
            self.ui.statusLabel.text = _("Cancelling: {phase} ...").format(phase=phase[:1].lower() + phase[1:])
        elif total:
            self.ui.statusLabel.text = _("{phase}: {percent} %").format(phase=phase, percent=job.progress.percent)
        else:
            self.ui.statusLabel.text = _("{phase} ...").format(phase=phase)
        self.ui.progressBar.maximum = 100 if total else 0  # 0: busy, the size of this step is not known
        self.ui.progressBar.value = job.progress.percent

    def onCancel(self):
        job = self.job
        if job is None or not job.cancellable:
            return
        job.cancel()
        self.pending.discard(job.kind)
        self.showJobProgress()
        self.updateButtons()

    def request(self, kind):
        """Ask for a table, heatmap or preview update: coalesced, the latest inputs win when the worker is free."""
        self.pending.add(kind)
        self.startPending()

    def startPending(self):
        while self.job is None and self.pending and self._shown:
            kind = next(k for k in ("table", "heatmaps", "preview") if k in self.pending)
            self.pending.discard(kind)
            {"table": self.startTableJob, "heatmaps": self.startHeatmapJob, "preview": self.startPreviewJob}[kind]()

    def currentKey(self, kind):
        """What a job's result depends on, as the panel stands now."""
        if kind == "table":
            return (self._sessionNumber, self.currentSlice)
        if kind == "heatmaps":
            return (self._sessionNumber, tuple(self.selectedLatents()[:MAX_HEATMAPS]))
        if kind == "preview":
            return self.previewKey()
        return None

    # -- dependencies and Segment -----------------------------------------------------------------------------------
    def ensureDependencies(self):
        """PyTorch and the panel's packages (asks before installing); offers a restart when one is needed."""
        from SegLensLib import dependencies

        confirm = lambda text: slicer.util.confirmOkCancelDisplay(text, _("SegLens needs Python packages"))  # noqa: E731
        try:
            status = dependencies.ensure_dependencies(confirm)
        except dependencies.DependencyError as exc:
            self.showError(_("SegLens cannot start"), exc)
            return False
        if status.restart_needed:
            text = _("Installed {installed}. Slicer had already loaded {loaded}: restart Slicer now to use the new version?").format(
                installed=", ".join(status.installed), loaded=", ".join(status.restart_needed))
            if slicer.util.confirmYesNoDisplay(text, _("SegLens: restart needed")):
                slicer.util.restart()
            self.ui.statusLabel.text = _("Restart Slicer before segmenting (new package versions were installed).")
            return False
        return True

    def onSegment(self):
        if self.job is not None:  # one job at a time (a double click, a script)
            return
        if not self.ensureDependencies():
            return
        try:
            bundlePath = self.ui.bundlePathLineEdit.currentPath
            if not bundlePath:
                raise self.logic._error(_("choose a bundle folder (bundle.json, model/, sae/)"))
            volumes = self.logic.readVolumes(self.inputNodes())  # main thread: copies the voxels out of MRML
        except Exception as exc:
            self.showError(_("Cannot segment"), exc)
            return
        output = self.ui.outputSegmentationSelector.currentNode()
        if output is not None and output.GetSegmentation().GetNumberOfSegments() > 0:
            if not slicer.util.confirmOkCancelDisplay(
                    _("Segment will replace the {count} segment(s) of '{name}' with the model's segmentation. Go on?").format(
                        count=output.GetSegmentation().GetNumberOfSegments(), name=output.GetName()),
                    _("SegLens: replace a segmentation?")):  # fmt: skip
                self.ui.statusLabel.text = _("Nothing was segmented: '{name}' is kept as it is.").format(name=output.GetName())
                return
        self.ui.inputNotesLabel.text = ""
        signature = self.logic.inputSignature(self.inputNodes())  # the voxels as read: changed later, it is stale
        outputID = output.GetID() if output is not None else None
        self.startJob("segment", self.logic.prepareAndSegment, volumes, bundlePath,
                      done=lambda result: self.onSegmented(result, signature, bundlePath, outputID), reports=True, phase=_("Starting"))

    def onSegmented(self, result, signature=None, bundlePath=None, outputID=None):
        self.ui.deviceLabel.text = result.device
        self.logic.useSession(result.session, result.bundle, result.inputNodes, result.referenceNode, signature, bundlePath)
        self._stale = False
        self.observeSessionInputs()
        self._sessionNumber += 1
        self.allRows, self.rows, self.currentSlice, self.suggestion, self._previewShown = [], [], None, None, None
        output = self.logic.scene.GetNodeByID(outputID) if outputID else None
        node = self.logic.showSegmentation(result.labels, outputNode=output)
        notes = list(result.notes)
        missing = self.logic.missingModalities()
        if missing:
            notes.append(_("No {sequences}: set to zero, as the model was trained to tolerate.").format(
                sequences=", ".join("%s (%s)" % (inputs.MODALITY_TITLES[m], m) for m in missing)))
        self._inputNotes = self.ui.inputNotesLabel.text = " ".join(notes)
        if output is not None:
            self.ui.statusLabel.text = _("Wrote the segmentation into '{name}'.").format(name=node.GetName())
        else:
            self.ui.statusLabel.text = _("Created segmentation '{name}'.").format(name=node.GetName())
        last = max(self.logic.numberOfSlices() - 1, 0)
        self.ui.sliceRangeWidget.maximum = last
        if self.ui.sliceRangeWidget.maximumValue <= 0 or self.ui.sliceRangeWidget.maximumValue > last:
            self.ui.sliceRangeWidget.maximumValue = last
        self.ui.suggestionLabel.text = ""
        self.pendingFix = None
        self.ui.fixLabel.text = ""
        self.ui.fixMeasurementLabel.text = self.logic.hintMeasurement()
        self._updatingGUI = True
        try:
            self.ui.hintClassComboBox.clear()
            self.ui.hintClassComboBox.addItems([ANY_TUMOUR] + list(self.logic.classNames[1:]))
        finally:
            self._updatingGUI = False
        self.observeHintNodes()
        self.updateStaleState()  # the inputs changed while it ran: stale at once
        population = self._parameterNode.population if self._parameterNode is not None else ""
        self._updatingGUI = True
        try:
            self.ui.populationComboBox.clear()
            self.ui.populationComboBox.addItems([NO_POPULATION] + list(self.logic.session.populations))
            self.ui.populationComboBox.currentIndex = max(self.ui.populationComboBox.findText(population or NO_POPULATION), 0)
        finally:
            self._updatingGUI = False
        self.onSliceSettled()
        if self.currentSlice is None:  # the Red view is not on the volume: the table without a slice
            self.request("table")
        self.updateButtons()

    # -- following the Red view -------------------------------------------------------------------------------------------
    def redSliceNode(self):
        layoutManager = slicer.app.layoutManager()
        if layoutManager is None:
            return None
        widget = layoutManager.sliceWidget("Red")
        return widget.mrmlSliceNode() if widget is not None else None

    def observeRedSlice(self):
        sliceNode = self.redSliceNode()
        if sliceNode is not None and sliceNode is not self._sliceNode:
            if self._sliceNode is not None:
                self.removeObserver(self._sliceNode, vtk.vtkCommand.ModifiedEvent, self.onSliceModified)
            self._sliceNode = sliceNode
            self.addObserver(sliceNode, vtk.vtkCommand.ModifiedEvent, self.onSliceModified)

    def onSliceModified(self, caller=None, event=None):
        self._sliceTimer.start()

    def onFollowSliceToggled(self, *args):
        self.updateParameterNodeFromGUI()
        if self.ui.followSliceCheckBox.checked:
            self.onSliceSettled()

    def onSliceSettled(self):
        """Follow the slice shown in the Red view: geometry only here; the table and preview are worker jobs."""
        if not self.logic.isSegmented() or not self.ui.followSliceCheckBox.checked:
            return
        sliceNode = self.redSliceNode()
        if sliceNode is None:
            return
        index = self.logic.sliceIndexInView(sliceNode)
        if index is None:
            self.ui.currentSliceLabel.text = _("(outside the volume)")
            if self.currentSlice is not None:
                self.currentSlice = None
                self.clearPreview()
            return
        self.ui.currentSliceLabel.text = str(index)
        if index == self.currentSlice and self.allRows:
            return
        self.currentSlice = index
        self.request("table")
        self.requestPreview()

    # -- latent table -------------------------------------------------------------------------------------------------
    def startTableJob(self):
        if not self.logic.isSegmented():
            return
        self.startJob("table", self.logic.computeLatentTable, self.currentSlice, done=self.onTableComputed,
                      key=self.currentKey("table"), cancellable=False)

    def onTableComputed(self, rows):
        first = not self.allRows
        self.allRows = rows
        if first:
            self.refreshFilters()
        self.fillTable()
        if first:
            self.updateHeatmaps()

    def refreshFilters(self):
        parameters = self._parameterNode
        category = parameters.category if parameters is not None else latenttable.ALL
        status = parameters.status if parameters is not None else latenttable.ALL
        self._updatingGUI = True
        try:
            for combo, key, value in ((self.ui.categoryFilterComboBox, "category", category),
                                      (self.ui.statusFilterComboBox, "status", status)):
                combo.clear()
                combo.addItems(latenttable.choices(self.allRows, key))
                combo.currentIndex = max(combo.findText(value), 0)
        finally:
            self._updatingGUI = False

    def onFiltersChanged(self, *args):
        if self._updatingGUI:
            return
        self.updateParameterNodeFromGUI()
        self.fillTable()

    def fillTable(self):
        """Show the computed rows through the filters, keeping every selected latent that is still listed."""
        import qt

        selected = self.selectedLatents()
        self.rows = latenttable.filter_rows(self.allRows, self.ui.categoryFilterComboBox.currentText or latenttable.ALL,
                                            self.ui.statusFilterComboBox.currentText or latenttable.ALL)
        table = self.ui.latentTableWidget
        self._updatingTable = True
        try:
            table.setSortingEnabled(False)
            table.clearSelection()
            table.setRowCount(len(self.rows))
            for r, row in enumerate(self.rows):
                for c, column in enumerate(latenttable.COLUMNS):
                    item = qt.QTableWidgetItem()
                    value = row.get(column)
                    if column in latenttable.NUMERIC and value is not None:
                        item.setData(qt.Qt.DisplayRole, latenttable.display_value(row, column))  # numeric sort
                    else:
                        item.setText(latenttable.cell_text(row, column))
                    table.setItem(r, c, item)
            table.setSortingEnabled(True)
        finally:
            self._updatingTable = False
        self.selectTableRows(selected)
        listed = {int(row["id"]) for row in self.rows}
        kept = [j for j in selected if j in listed]
        if kept != selected:  # a filter hides some: they are no longer steered, and the label says so
            self.setSelectedLatents(kept)
            self.onSelectionChanged()
        self.updateButtons()

    def selectTableRows(self, latents):
        """Select the rows of ``latents`` (all of them: a refresh never collapses a multi-row selection)."""
        import qt

        table = self.ui.latentTableWidget
        wanted = {int(j) for j in latents}
        selection = qt.QItemSelection()
        model = table.model()
        for r in range(table.rowCount):
            item = table.item(r, 0)
            if item is not None and int(float(item.text())) in wanted:
                selection.select(model.index(r, 0), model.index(r, table.columnCount - 1))
        self._updatingTable = True
        try:
            table.clearSelection()
            table.selectionModel().select(selection, qt.QItemSelectionModel.Select)
        finally:
            self._updatingTable = False

    def tableSelection(self):
        table = self.ui.latentTableWidget
        rows = sorted({index.row() for index in table.selectedIndexes()})
        return [int(float(table.item(r, 0).text())) for r in rows]

    def onLatentSelection(self, *args):
        if self._updatingTable or self._updatingGUI or not self.logic.isSegmented():
            return
        self.setSelectedLatents(self.tableSelection())
        self.onSelectionChanged()

    def onSelectionChanged(self):
        self.updateHeatmaps()
        self.requestPreview()
        self.updateButtons()

    # -- heatmaps -----------------------------------------------------------------------------------------------------
    def heatmapLatents(self):
        return self.selectedLatents()[:MAX_HEATMAPS]

    def updateHeatmaps(self):
        """Layers for the selected latents: computed on the worker when new, shown here."""
        if not self.logic.isSegmented():
            return
        latents = self.heatmapLatents()
        if all(j in self.logic.heatmapNodes for j in latents):
            self.showHeatmapLayers({})
        else:
            self.request("heatmaps")

    def startHeatmapJob(self):
        latents = self.heatmapLatents()
        if not self.logic.isSegmented() or all(j in self.logic.heatmapNodes for j in latents):
            self.showHeatmapLayers({})
            return
        self.startJob("heatmaps", self.logic.computeHeatmaps, latents, done=self.showHeatmapLayers,
                      key=self.currentKey("heatmaps"), cancellable=False)

    def showHeatmapLayers(self, computed):
        if not self._shown:  # put into the views when the module is shown again
            self.pending.add("heatmaps")
            return
        colour = self.ui.heatmapColorSelector.currentNode()
        self.logic.showHeatmaps(self.heatmapLatents(), self.ui.heatmapThresholdSliderWidget.value,
                                self.ui.heatmapOpacitySliderWidget.value, colour.GetID() if colour else None, computed)

    def onHeatmapDisplayChanged(self, *args):
        """Threshold, opacity and colours change the display nodes only (nothing is computed again)."""
        self.updateParameterNodeFromGUI()
        if self._updatingGUI or self.logic is None:
            return
        colour = self.ui.heatmapColorSelector.currentNode()
        self.logic.setHeatmapDisplay(self.ui.heatmapThresholdSliderWidget.value, self.ui.heatmapOpacitySliderWidget.value,
                                     colour.GetID() if colour else None)  # fmt: skip

    # -- steering -----------------------------------------------------------------------------------------------------
    def setAlpha(self, alpha):
        slider = self.ui.alphaSliderWidget
        if abs(alpha) > slider.maximum:
            slider.maximum = float(abs(alpha))
            slider.minimum = -float(abs(alpha))
        slider.value = float(alpha)

    def currentEdit(self):
        return self.logic.makeEdit(
            self.selectedLatents(), self.ui.modeComboBox.currentText, self.ui.alphaSliderWidget.value,
            self.ui.regionComboBox.currentText, self.currentSlice,
            (self.ui.sliceRangeWidget.minimumValue, self.ui.sliceRangeWidget.maximumValue),
        )

    def previewKey(self):
        """Everything a preview depends on (None: nothing to preview)."""
        if not self.logic.isSegmented() or self.currentSlice is None or not self.selectedLatents() or self._stale:
            return None
        if not self.ui.livePreviewCheckBox.checked:
            return None
        return (self._sessionNumber, len(self.logic.segmentationNodes), len(self.logic.session.edits),
                tuple(self.selectedLatents()), self.ui.modeComboBox.currentText, round(float(self.ui.alphaSliderWidget.value), 6),
                self.ui.regionComboBox.currentText, round(float(self.ui.sliceRangeWidget.minimumValue)),
                round(float(self.ui.sliceRangeWidget.maximumValue)), self.currentSlice)  # fmt: skip

    def onSteeringChanged(self, *args):
        self.updateParameterNodeFromGUI()
        if not self._updatingGUI:
            self.requestPreview()

    def requestPreview(self):
        key = self.previewKey()
        if key is None:
            self.pending.discard("preview")
            self.clearPreview()
        elif key != self._previewShown:
            self.request("preview")

    def startPreviewJob(self):
        key = self.previewKey()
        if key is None or key == self._previewShown:
            return
        try:
            edit = self.currentEdit()
        except Exception as exc:
            self.clearPreview()
            self.ui.statusLabel.text = _("No preview: {problem}").format(problem=exc)
            return
        # A preview is one slice: it cannot stop half-way, Cancel drops its result.
        self.startJob("preview", self.logic.computePreview, edit, self.currentSlice, done=self.onPreviewComputed,
                      key=key, phase=_("Previewing slice {slice}").format(slice=self.currentSlice))

    def onPreviewComputed(self, changes):
        self.logic.showPreview(changes)
        self._previewShown = self.previewKey()
        added, removed, relabelled = changes.counts
        self.ui.statusLabel.text = _("Preview of slice {slice}: {added} voxels added (green), {removed} removed (magenta), "
                                     "{relabelled} relabelled (yellow).").format(
            slice=self.currentSlice, added=added, removed=removed, relabelled=relabelled)

    def clearPreview(self):
        self._previewShown = None
        if self.logic is not None:
            self.logic.clearPreview()

    def onApply(self):
        if self.job is not None or self.refuseStale():  # one job at a time: a double click applies once
            return
        try:
            edit = self.currentEdit()
        except Exception as exc:
            self.showError(_("Cannot steer"), exc)
            return
        self.pending.discard("preview")
        self.clearPreview()
        self.startJob("apply", self.logic.computeApply, [edit], done=self.onApplied, reports=True,
                      discard=lambda labels: self.logic.discardApply(1), phase=_("Steering"))

    def onApplied(self, labels):
        node = self.logic.showCorrected(labels)
        self._previewShown = None
        self.ui.statusLabel.text = _("Created '{name}' (the previous segmentation is kept).").format(name=node.GetName())
        self.suggestion = None
        self.ui.suggestionLabel.text = ""

    def onUndo(self):
        if self.job is not None:
            return
        try:
            node = self.logic.undo()
        except Exception as exc:
            self.showError(_("Undo failed"), exc)
            return
        self._previewShown = None
        self.ui.statusLabel.text = _("Undone; current segmentation: '{name}'.").format(name=node.GetName())
        self.updateButtons()
        self.requestPreview()


    # -- fixing by pointing ---------------------------------------------------------------------------------------------
    def observeHintNodes(self):
        """Follow the two point lists (made when missing): a point added, moved or removed drops the last Fix."""
        events = [slicer.vtkMRMLMarkupsNode.PointAddedEvent, slicer.vtkMRMLMarkupsNode.PointRemovedEvent,
                  slicer.vtkMRMLMarkupsNode.PointModifiedEvent]  # fmt: skip
        for node in self._hintNodes:
            for event in events:
                self.removeObserver(node, event, self.onHintsModified)
        self._hintNodes = [self.logic.hintNode(sign) for sign in HINT_LISTS]
        for node in self._hintNodes:
            for event in events:
                self.addObserver(node, event, self.onHintsModified)
        self.onHintsModified()

    def onHintsModified(self, caller=None, event=None):
        plus = minus = 0
        if self._hintNodes:
            plus, minus = (node.GetNumberOfControlPoints() for node in self._hintNodes)
        self.ui.hintCountLabel.text = "%d +, %d -" % (plus, minus) if plus or minus else _("none placed")
        if self.pendingFix is not None and caller is not None:
            self.pendingFix = None
            self.ui.fixLabel.text = _("The points changed: press Fix again.")
        self.updateButtons()

    def onHintClassChanged(self, *args):
        if self._updatingGUI or self.logic is None or not self.logic.isSegmented():
            return
        self.logic.setHintClass(self.ui.hintClassComboBox.currentText)

    def onPlaceHint(self, sign):
        """Start placing points of ``sign`` in the slice views (Slicer's place mode, the sign's list active)."""
        if not self.logic.isSegmented():
            return
        if sign == "+":
            self.logic.setHintClass(self.ui.hintClassComboBox.currentText)
        node = self.logic.hintNode(sign)
        selection = slicer.app.applicationLogic().GetSelectionNode() if hasattr(slicer.app, "applicationLogic") else None
        interaction = slicer.app.applicationLogic().GetInteractionNode() if selection is not None else None
        if selection is not None and interaction is not None:
            selection.SetReferenceActivePlaceNodeClassName("vtkMRMLMarkupsFiducialNode")
            selection.SetActivePlaceNodeID(node.GetID())
            interaction.SetPlaceModePersistence(1)
            interaction.SetCurrentInteractionMode(interaction.Place)
        if sign == "+":
            self.ui.statusLabel.text = _("Click on tumour the mask missed in a slice view (Esc or the arrow tool stops placing).")
        else:
            self.ui.statusLabel.text = _("Click on false tumour in a slice view (Esc or the arrow tool stops placing).")

    def onFix(self):
        if self.job is not None or self.refuseStale():
            return
        try:
            hints = self.logic.readHints()
        except Exception as exc:
            self.showError(_("Cannot fix"), exc)
            return
        self.pendingFix = None
        self.startJob("fix", self.logic.computeFix, hints, done=self.onFixed,
                      phase=_("Fitting a latent edit to {count} point(s)").format(count=len(hints)))

    def onFixed(self, fix):
        self.lastFix = fix
        self.pendingFix = fix if fix.edits else None
        self.ui.fixLabel.text = self.logic.fixDescription(fix)
        if not fix.edits:
            self.ui.statusLabel.text = _("No fix found for these points.")
            return
        self.pending.discard("preview")
        self.ui.statusLabel.text = _("Fix ready: the preview shows it on the current slice; Apply fix re-segments.")
        if self.currentSlice is not None and self._shown:
            self.startJob("preview", self.logic.computePreview, list(fix.edits), self.currentSlice, done=self.onFixPreviewed,
                          phase=_("Previewing the fix on slice {slice}").format(slice=self.currentSlice))

    def onFixPreviewed(self, changes):
        self.logic.showPreview(changes)
        self._previewShown = None  # the steering controls' preview may replace it
        added, removed, relabelled = changes.counts
        self.ui.statusLabel.text = _("Fix on slice {slice}: {added} voxels added (green), {removed} removed (magenta), "
                                     "{relabelled} relabelled (yellow). Apply fix re-segments the volume.").format(
            slice=self.currentSlice, added=added, removed=removed, relabelled=relabelled)

    def onApplyFix(self):
        if self.job is not None or self.pendingFix is None or self.refuseStale():
            return
        edits = list(self.pendingFix.edits)
        self.pending.discard("preview")
        self.clearPreview()
        self.startJob("apply", self.logic.computeApply, edits, done=self.onFixApplied, reports=True,
                      discard=lambda labels: self.logic.discardApply(1), phase=_("Steering"))

    def onFixApplied(self, labels):
        node = self.logic.showCorrected(labels, "fixed")
        self._previewShown = None
        self.pendingFix = None
        self.ui.fixLabel.text = ""
        self.ui.statusLabel.text = _("Created '{name}' with the fix (the previous segmentation is kept; Undo goes back).").format(
            name=node.GetName())

    def onClearHints(self):
        self.logic.clearHints()
        self.pendingFix = None
        self.ui.fixLabel.text = ""
        self.updateButtons()

    # -- suggested corrections ------------------------------------------------------------------------------------------
    def onSuggest(self):
        if self.job is not None or self.refuseStale():
            return
        population = self.ui.populationComboBox.currentText
        population = None if population in ("", NO_POPULATION) else population
        method = self.ui.suggestionMethodComboBox.currentText or SUGGESTION_METHODS[0]
        # The session does not change while a suggestion is computed: Cancel drops the result.
        self.startJob("suggest", self.logic.computeSuggestion, population, method, done=self.onSuggested, reports=True,
                      phase=_("Finding a correction ({method})").format(method=method))

    def onSuggested(self, suggestion):
        """Put the suggestion into the steering controls: the live preview shows it, Apply applies it (and the
        recipe records it) like any other edit."""
        self.suggestion = suggestion
        text = suggestion.describe()
        if len(suggestion.edits) > 1:
            text += " " + _("(the controls show the first of its {count} edits)").format(count=len(suggestion.edits))
        self.ui.suggestionLabel.text = text
        if not suggestion.edits:
            self.ui.statusLabel.text = _("No correction suggested for this case.")
            return
        edit = suggestion.edits[0]
        self._updatingGUI = True
        try:
            self.ui.modeComboBox.currentIndex = max(self.ui.modeComboBox.findText(edit.mode), 0)
            self.setAlpha(edit.alpha)
            self.ui.regionComboBox.currentIndex = self.ui.regionComboBox.findText("whole volume")
            for combo in (self.ui.categoryFilterComboBox, self.ui.statusFilterComboBox):
                combo.currentIndex = max(combo.findText(latenttable.ALL), 0)
        finally:
            self._updatingGUI = False
        self.updateParameterNodeFromGUI()
        self.setSelectedLatents(list(edit.latents))
        self.fillTable()
        self.onSelectionChanged()
        self.ui.statusLabel.text = _("Suggested correction in the steering controls: check the preview, then Apply.")

    # -- recipes ------------------------------------------------------------------------------------------------------
    def onRecipePathChanged(self, *args):
        self.updateParameterNodeFromGUI()

    def onLoadRecipe(self):
        if self.job is not None or self.refuseStale():
            return
        path = self.ui.recipePathLineEdit.currentPath
        self.pending.discard("preview")
        self.clearPreview()
        # Cancelled, the session keeps its edits (the replay puts them back); a result that comes after Cancel is
        # dropped the same way.
        self.startJob("recipe", self.logic.computeRecipe, path, done=lambda labels: self.onRecipeLoaded(labels, path), reports=True,
                      discard=lambda _labels: self.logic.discardRecipe(), phase=_("Replaying {file}").format(file=Path(path).name))

    def onRecipeLoaded(self, labels, path):
        node = self.logic.showRecipe(labels, path)
        self._previewShown = None
        self.ui.statusLabel.text = _("Replayed {count} edit(s) of {file}: created '{name}'.").format(
            count=len(self.logic.session.edits), file=Path(path).name, name=node.GetName())

    # -- export -------------------------------------------------------------------------------------------------------
    def onExportFolderChanged(self, folder):
        import qt

        if folder:
            qt.QSettings().setValue(EXPORT_FOLDER_SETTING, folder)

    def onExport(self):
        if self.job is not None or self.refuseStale():
            return
        folder = self.ui.exportDirectoryButton.directory
        name = self.ui.exportNameLineEdit.text.strip() or f"{self.logic.referenceNode.GetName()}_seglens"
        overwrite = self.ui.overwriteCheckBox.checked
        try:  # what would be overwritten is refused before any work
            if not folder or not os.path.isdir(folder):
                raise self.logic._error(_("choose an existing export folder (now: '{folder}')").format(folder=folder))
            targets = self.logic.exportTargets(os.path.join(folder, name), overwrite=overwrite)
        except Exception as exc:
            self.showExportError(exc)
            return
        # The NIfTI labels and the recipe are written on the worker; Slicer's writers then run here.
        self.startJob("export", self.logic.computeExport, targets, overwrite, done=lambda written: self.onExported(targets, written, folder, overwrite),
                      cancellable=False, phase=_("Exporting to {folder}").format(folder=folder))  # fmt: skip

    def onExported(self, targets, written, folder, overwrite):
        import qt

        try:
            paths = self.logic.finishExport(targets, written, overwrite)
        except Exception as exc:
            self.showExportError(exc)
            return
        qt.QSettings().setValue(EXPORT_FOLDER_SETTING, folder)
        self.ui.statusLabel.text = _("Exported {files} to {folder}").format(files=", ".join(p.name for p in paths.values()), folder=folder)

    def showExportError(self, exc):
        if type(exc).__name__ == "OutputExistsError":  # the panel's words, not the command line's (--overwrite)
            exc = self.logic._error(_("{path} already exists; choose another name or tick 'Overwrite existing files'").format(path=exc.path))
        self.showError(_("Export failed"), exc)

    # -- state of the buttons, errors -------------------------------------------------------------------------------------
    def updateButtons(self):
        if self.logic is None:
            return
        busy = self.job is not None
        ready = not busy and not self._stale and self.logic.isSegmented() and self.logic.currentSegmentationNode is not None
        selected = self.selectedLatents()
        self.ui.segmentButton.enabled = not busy
        self.ui.cancelButton.enabled = busy and self.job.cancellable and not self.job.cancelled
        self.ui.applyButton.enabled = ready and bool(selected)
        self.ui.undoButton.enabled = ready and len(self.logic.segmentationNodes) > 1
        self.ui.exportButton.enabled = ready
        self.ui.suggestButton.enabled = ready and getattr(self.logic.session, "suggestions", None) is not None
        hints = self.logic.hintCount() if ready else 0
        self.ui.placePlusButton.enabled = self.ui.placeMinusButton.enabled = ready
        self.ui.fixButton.enabled = ready and hints > 0
        self.ui.applyFixButton.enabled = ready and self.pendingFix is not None
        self.ui.clearHintsButton.enabled = not busy and hints > 0
        self.ui.loadRecipeButton.enabled = ready and bool(self.ui.recipePathLineEdit.currentPath)
        text = ", ".join(str(j) for j in selected) or _("(select latents in the table)")
        if len(selected) > MAX_HEATMAPS:
            text += " " + _("(heatmaps of the first {count} are shown)").format(count=MAX_HEATMAPS)
        self.ui.selectedLatentsLabel.text = text

    def showError(self, context, exc):
        """A clear message; a traceback only for what is not a problem with the user's input (and in the console)."""
        message = "%s: %s" % (context, exc)
        self.ui.statusLabel.text = message
        if isUserError(exc):
            slicer.util.errorDisplay(message, windowTitle=_("SegLens"))
        else:
            details = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            logging.error("%s\n%s", message, details)
            slicer.util.errorDisplay("%s: %s: %s" % (context, type(exc).__name__, exc), windowTitle=_("SegLens"), detailedText=details)


def shippedModels():
    """``[(title, bundle folder)]`` of the bundles shipped in ``Resources/`` (the reference first), titled from their
    manifests: name, architecture and hook point. Empty when SegLensLogic or the resources are not there."""
    try:
        from SegLensLogic.resources import shipped_bundles
        from SegLensLogic.storage import read_json
    except ImportError:
        return []
    models = []
    for folder in shipped_bundles():
        try:
            manifest = read_json(folder / "bundle.json")
            model = manifest.get("model") or {}
            title = "%s (%s, %s)" % (manifest.get("name", folder.name), model.get("arch", "?"), model.get("hook_point", "?"))
        except Exception:  # an unreadable manifest: listed by its folder; loading it will say what is wrong
            title = folder.name
        models.append((title, folder.resolve()))
    return models


def referenceBundlePath():
    """The shipped reference bundle's folder (``Resources/adult-glioma-segformer``), or None."""
    try:
        from SegLensLogic.resources import reference_bundle_path
    except ImportError:  # SegLensLogic not found beside the module: the user picks a bundle
        return None
    return reference_bundle_path(required=False)


#
# SegLensTest
#
class SegLensTest(ScriptedLoadableModuleTest):
    """Self-test for a running Slicer: a small phantom case and a small bundle are made on the fly (no download),
    then segment, heatmap, steer, undo and export are each checked against the session's own arrays."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SegLensWorkflow()

    def _makeBundle(self, folder):
        """A tiny untrained U-Net and SAE on phantom-sized inputs, packed as a bundle (seconds on a CPU)."""
        import torch

        from SegLensLogic.bundle import build_bundle
        from SegLensLogic.data.labels import TUMOUR_CLASSES
        from SegLensLogic.networks import SegmenterConfig, build_segmenter
        from SegLensLogic.sae import BatchTopKSAE
        from SegLensLogic.sae.model import SAEConfig

        torch.manual_seed(0)
        config = SegmenterConfig(arch="unet", modalities=["t1n", "t1c", "t2w", "t2f"], class_names=list(TUMOUR_CLASSES),
                                 image_size=64, arch_options={"features": [8, 8, 16, 32, 64, 8]})
        model = build_segmenter(config)
        model.save_pretrained(folder / "model")
        # An untrained SAE still needs an inference threshold to encode a volume.
        sae = BatchTopKSAE(SAEConfig(d_in=32, expansion=4, k=8, threshold=0.0, hook_point=model.config.hook_point))
        sae.save(folder / "sae")
        return build_bundle(folder / "model", folder / "sae", folder / "bundle", name="selftest").root

    def test_SegLensWorkflow(self):
        import shutil
        import tempfile

        from SegLensLib.dependencies import ensure_dependencies

        self.delayDisplay("Checking dependencies")
        # Installing is the user's decision: asked as the panel asks, and refused when no one is there to answer
        # (Slicer run with --testing), so that a self-test never installs packages on its own.
        app = getattr(slicer, "app", None)  # (none: Slicer's MRML libraries without the application)
        unattended = app is None or app.testingEnabled()
        ensure_dependencies(lambda text: False if unattended else slicer.util.confirmOkCancelDisplay(text, _("SegLens needs Python packages")))
        work = Path(tempfile.mkdtemp(prefix="SegLensTest-"))
        try:
            self._runWorkflow(work)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _runWorkflow(self, work):
        import numpy as np

        from SegLensLogic.data.phantoms import make_phantom

        images, labels = make_phantom(shape=(64, 64, 24), seed=0)
        affine = np.diag([1.0, 1.0, 2.0, 1.0])  # phantoms are in RAS voxel order
        volumes = {}
        for modality, array in images.items():
            volumes[modality] = slicer.util.addVolumeFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)), affine, modality)
        bundle = self._makeBundle(work)

        logic = SegLensLogic()
        case = logic.caseFromVolumes(volumes)
        logic.openSession(case, bundlePath=bundle)
        self.delayDisplay("Segmenting")
        segmentation = logic.segment()
        self.assertEqual(segmentation.GetSegmentation().GetNumberOfSegments(), len(logic.classNames) - 1)
        self.assertTrue(np.array_equal(nodes.labels_from_segmentation(segmentation, logic.referenceNode, logic.colourTableNode),
                                       logic.session.labels))
        latent = int(logic.latentTable()[0]["id"])
        self.delayDisplay(f"Heatmap of latent {latent}")
        heat = logic.showHeatmap(latent)
        self.assertTrue(nodes.same_geometry(heat, logic.referenceNode))
        self.assertTrue(np.allclose(nodes.volume_array(heat), logic.session.heatmap(latent)))
        self.delayDisplay("Steering")
        corrected = logic.applyEdit(logic.makeEdit([latent], "zero"))
        self.assertIsNot(corrected, segmentation)
        self.assertIsNotNone(slicer.mrmlScene.GetNodeByID(segmentation.GetID()))
        paths = logic.export(work / "export" / "selftest")
        for path in paths.values():
            self.assertTrue(path.is_file(), path)
        self.assertIs(logic.undo(), segmentation)
        self.delayDisplay("SegLens self-test passed")
