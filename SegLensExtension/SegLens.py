"""SegLens: segment a brain MRI, see the model's sparse-autoencoder latents as layers, steer them, export the fix.

A thin shell over ``SegLensLogic.steering.SteeringSession`` (all computation happens there):

- ``SegLens``: module metadata.
- ``SegLensWidget``: the panel (``Resources/UI/SegLens.ui``): inputs and bundle, Segment with progress and Cancel,
  the latent table, heatmap layers, the steering panel with live preview, Apply / Undo, Export.
- ``SegLensLogic``: everything the panel does, without Qt (so it runs headless, in scripts and in CI on the
  ``slicer-core`` MRML libraries). It imports PyTorch and SegLensLogic only when first used.
- ``SegLensTest``: the self-test for a running Slicer.

Note: the template's Logic class name ``SegLensLogic`` shadows the ``SegLensLogic`` package name inside this
file only; the package is always imported inside functions (``from SegLensLogic.x import y``), which resolves
through ``sys.modules`` and never through this file's globals.
"""

import logging
import os
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

from SegLensLib import latenttable, nodes
from SegLensLib.worker import Progress, Worker

# Steering modes offered in the panel and the region choices, as the session names them.
STEERING_MODES = ("scale", "add", "zero")
REGIONS = ("current slice", "slice range", "whole volume")
MODALITY_SELECTORS = {"t1n": "t1nSelector", "t1c": "t1cSelector", "t2w": "t2wSelector", "t2f": "t2fSelector"}


#
# SegLens
#
class SegLens(ScriptedLoadableModule):
    """Module metadata (title, category, help)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "SegLens"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["SegLens developers"]
        self.parent.helpText = (
            "Segment a brain-tumour MRI with a SegLens bundle, inspect the sparse-autoencoder latents of the model "
            "as heatmap layers with their automatic labels, steer latents with a live preview of the current slice, "
            "and export the corrected mask (.seg.nrrd, .nii.gz) with the steering recipe (Med-SegLens)."
        )
        self.parent.acknowledgementText = (
            "Implements Med-SegLens (sparse autoencoders for segmentation models). BraTS data: Menze et al., IEEE "
            "TMI 2015; Bakas et al., Sci. Data 2017; Baid et al., arXiv:2107.02314."
        )


#
# SegLensLogic
#
class SegLensLogic(ScriptedLoadableModuleLogic):
    """What the SegLens panel does, callable from Python without the panel.

    Nodes the user made are never modified or removed: Segment creates a new segmentation node, Apply another one
    (the previous is kept), and only heatmap/preview nodes made by this logic are ever replaced.

    Thread use: ``open*``/``compute*`` methods touch no MRML and may run on a worker thread; ``show*`` methods and
    the one-call versions (``segment``, ``applyEdit``, ``previewEdit``, ``undo``, ``export``) update MRML and must
    run on the main thread.
    """

    def __init__(self, scene=None):
        ScriptedLoadableModuleLogic.__init__(self)
        self._scene = scene
        self.session = None
        self.bundle = None
        self.inputNodes = {}
        self.referenceNode = None
        self.colourTableNode = None
        self.originalSegmentationNode = None
        self.segmentationNodes = []  # original, then one per applied edit (the history shown as nodes)
        self.heatmapNodes = {}  # latent id -> volume node
        self.previewNode = None
        self.classNames = []
        self.classColours = []

    # -- scene and inputs -------------------------------------------------------------------------------------------
    @property
    def scene(self):
        return self._scene if self._scene is not None else slicer.mrmlScene

    def caseFromVolumes(self, inputNodes, caseId=None):
        """A ``CaseImages`` from volume nodes ``{modality: vtkMRMLScalarVolumeNode}`` (arrays copied, no disk).

        The first node (in t1n, t1c, t2w, t2f order) is the reference grid; every other must share it exactly.
        """
        from SegLensLogic.data.cases import MODALITIES, canonical_modality, case_from_arrays
        from SegLensLogic.errors import SegLensError

        given = {canonical_modality(name): node for name, node in inputNodes.items() if node is not None}
        if not given:
            raise SegLensError("select at least one input volume")
        ordered = {m: given[m] for m in MODALITIES if m in given}
        reference = next(iter(ordered.values()))
        for modality, node in ordered.items():
            if node.GetImageData() is None:
                raise SegLensError(f"volume '{node.GetName()}' ({modality}) has no voxels")
            if not nodes.same_geometry(node, reference):
                raise SegLensError(
                    f"volume '{node.GetName()}' ({modality}) is not on the grid of '{reference.GetName()}': "
                    "resample the volumes onto one grid first (Resample Scalar/Vector/DWI Volume module)"
                )
        arrays = {m: nodes.volume_array(node) for m, node in ordered.items()}
        self.inputNodes = ordered
        self.referenceNode = reference
        return case_from_arrays(arrays, nodes.ijk_to_ras(reference), caseId or reference.GetName())

    # -- session ------------------------------------------------------------------------------------------------------
    def openSession(self, case, bundlePath=None, modelDir=None, saeDir=None, labelsPath=None, alignmentPaths=(),
                    device=None):
        """Load the model and SAE for ``case`` (from a bundle folder, or model and SAE folders); no MRML."""
        from SegLensLogic.steering import SteeringSession

        if bundlePath:
            from SegLensLogic.bundle import load_bundle

            self.bundle = load_bundle(bundlePath)
            missing = [m for m in self.bundle.modalities if m not in case.images]
            if missing:
                raise self._error(f"bundle '{self.bundle.name}' needs input volumes for {', '.join(missing)}")
            self.session = SteeringSession.from_bundle(self.bundle, case, device=device)
            self.classNames = list(self.bundle.class_names)
            self.classColours = [tuple(c) for c in self.bundle.colours]
        else:
            from SegLensLogic.bundle import class_colours

            self.bundle = None
            self.session = SteeringSession.open(modelDir, saeDir, case, labels=labelsPath,
                                                alignments=list(alignmentPaths), device=device)
            config = self.session.model.config
            self.classNames = list(config.class_names)
            self.classColours = [tuple(c) for c in class_colours(config.label_scheme, len(config.class_names))]
        return self.session

    def _error(self, message):
        from SegLensLogic.errors import SegLensError

        return SegLensError(message)

    def _requireSession(self):
        if self.session is None:
            raise self._error("no SegLens session: choose input volumes and a bundle, then press Segment")
        return self.session

    def numberOfSlices(self):
        """Axial slices of the input (the model's slicing axis: the voxel axis closest to superior)."""
        reference = self.referenceNode
        affine = nodes.ijk_to_ras(reference)
        axis = int(abs(affine[2, :3]).argmax())
        return nodes.volume_shape(reference)[axis]

    # -- segmentation -------------------------------------------------------------------------------------------------
    def computeSegmentation(self, progress=None):
        """Run the unedited model over the volume (worker thread): labels ``(I, J, K)`` on the input grid."""
        return self._requireSession().segment(progress=progress)

    def showSegmentation(self, labels, name=None):
        """A new segmentation node (named, coloured class segments) from ``labels``; the original result."""
        if self.colourTableNode is None or self.scene.GetNodeByID(self.colourTableNode.GetID()) is None:
            self.colourTableNode = nodes.colour_table_node(self.scene, self.classNames, self.classColours, "SegLens classes")
        node = nodes.segmentation_from_labels(
            self.scene, labels, self.referenceNode, self.colourTableNode, name or f"{self.referenceNode.GetName()} SegLens"
        )
        node.SetAttribute("SegLens.Role", "original")
        self.originalSegmentationNode = node
        self.segmentationNodes = [node]
        return node

    def segment(self, progress=None):
        """Segment the opened case and return the new segmentation node (main thread)."""
        return self.showSegmentation(self.computeSegmentation(progress))

    @property
    def currentSegmentationNode(self):
        return self.segmentationNodes[-1] if self.segmentationNodes else None

    # -- latents ------------------------------------------------------------------------------------------------------
    def sliceIndexOfPoint(self, ras):
        """The model's axial slice index under a RAS point (mm), e.g. the centre of the Red view."""
        return int(self._requireSession().slice_of_point(tuple(float(x) for x in ras)))

    def latentTable(self, sliceIndex=None, category=latenttable.ALL, status=latenttable.ALL,
                    sortColumn="slice_activation", descending=True):
        """Rows ``{id, label, category, status, slice_activation, volume_activation}``, filtered and sorted."""
        rows = self._requireSession().latent_table(slice_index=sliceIndex)
        if sliceIndex is None and sortColumn == "slice_activation":
            sortColumn = "volume_activation"
        return latenttable.sort_rows(latenttable.filter_rows(rows, category, status), sortColumn, descending)

    def latentLabel(self, latent):
        for row in self._requireSession().latent_table():
            if int(row["id"]) == int(latent):
                return row.get("label") or row.get("category") or ""
        return ""

    def showHeatmap(self, latent, threshold=0.1, opacity=0.5, colourNodeID=None):
        """A float volume of latent ``latent``'s activation on the input's grid, as the slice views' foreground.

        Args:
            threshold: fraction (0-1) of the latent's largest activation below which voxels are transparent.
            opacity: foreground opacity (0-1).
            colourNodeID: a colour node ID; default Inferno (or another heat map present in the scene).

        Returns:
            The heatmap volume node (reused for the same latent, values refreshed), named with its label.
        """
        latent = int(latent)
        heat = self._requireSession().heatmap(latent)
        label = self.latentLabel(latent)
        name = f"SegLens latent {latent}" + (f": {label}" if label else "")
        node = self.heatmapNodes.get(latent)
        if node is None or self.scene.GetNodeByID(node.GetID()) is None:
            node = nodes.add_volume_like(self.scene, self.referenceNode, heat.astype("float32"), name)
            node.SetAttribute("SegLens.Latent", str(latent))
            self.heatmapNodes[latent] = node
        else:
            nodes.set_volume_array(node, heat.astype("float32"))
        upper = float(heat.max()) if heat.size else 0.0
        nodes.style_heatmap(node, upper, threshold * upper, colourNodeID)
        nodes.show_layers(self.scene, background=self.referenceNode, foreground=node, foreground_opacity=opacity)
        return node

    def removeHeatmap(self, latent):
        node = self.heatmapNodes.pop(int(latent), None)
        if node is not None and self.scene.GetNodeByID(node.GetID()) is not None:
            self.scene.RemoveNode(node)

    def showHeatmaps(self, latents, threshold=0.1, opacity=0.5, colourNodeID=None):
        """Heatmap nodes for exactly ``latents`` (others made by SegLens are removed); the last is in front."""
        for latent in [j for j in self.heatmapNodes if j not in {int(x) for x in latents}]:
            self.removeHeatmap(latent)
        return [self.showHeatmap(j, threshold, opacity, colourNodeID) for j in latents]

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
            raise self._error("select one or more latents in the table to steer")
        if region == "current slice":
            if sliceIndex is None:
                raise self._error("no current slice: show the input in a slice view")
            where = Region.slice(int(sliceIndex))
        elif region == "slice range":
            first, last = (int(v) for v in sliceRange)
            where = Region.slices(min(first, last), max(first, last) + 1)
        elif region == "whole volume":
            where = Region.volume()
        else:
            raise self._error(f"unknown region '{region}'; choose one of {', '.join(REGIONS)}")
        return LatentEdit(latents=tuple(int(j) for j in latents), mode=mode, alpha=float(alpha), region=where)

    def computePreview(self, edit, sliceIndex):
        """Volume labels with only slice ``sliceIndex`` recomputed under ``edit`` (worker thread)."""
        return self._requireSession().preview(edit, int(sliceIndex))

    def showPreview(self, labels, opacity=0.6):
        """Show preview labels in the slice views' label layer (one labelmap node, reused)."""
        if self.previewNode is None or self.scene.GetNodeByID(self.previewNode.GetID()) is None:
            self.previewNode = nodes.add_volume_like(self.scene, self.referenceNode, labels.astype("uint8"),
                                                     "SegLens preview", "vtkMRMLLabelMapVolumeNode")
            self.previewNode.GetDisplayNode().SetAndObserveColorNodeID(self.colourTableNode.GetID())
        else:
            nodes.set_volume_array(self.previewNode, labels.astype("uint8"))
        nodes.show_layers(self.scene, label=self.previewNode, label_opacity=opacity)
        return self.previewNode

    def previewEdit(self, edit, sliceIndex):
        return self.showPreview(self.computePreview(edit, sliceIndex))

    def computeApply(self, edit):
        """Apply ``edit`` on the session (worker thread): the corrected volume labels."""
        return self._requireSession().apply(edit)

    def showCorrected(self, labels):
        """A new segmentation node for the corrected labels; earlier nodes (and the original) are kept."""
        number = len(self.segmentationNodes)
        node = nodes.segmentation_from_labels(
            self.scene, labels, self.referenceNode, self.colourTableNode,
            f"{self.referenceNode.GetName()} SegLens corrected {number}",
        )
        node.SetAttribute("SegLens.Role", "corrected")
        node.SetAttribute("SegLens.Edits", str(len(self._requireSession().edits)))
        self.segmentationNodes.append(node)
        self._showOnly(node)
        return node

    def applyEdit(self, edit):
        return self.showCorrected(self.computeApply(edit))

    def undo(self):
        """Undo the last applied edit: the session steps back and that edit's corrected node is removed.

        Returns the segmentation node now current (the original after undoing every edit).
        """
        session = self._requireSession()
        if not session.edits:
            raise self._error("nothing to undo")
        session.undo()
        if len(self.segmentationNodes) > 1:
            node = self.segmentationNodes.pop()
            if self.scene.GetNodeByID(node.GetID()) is not None:
                self.scene.RemoveNode(node)
        self._showOnly(self.currentSegmentationNode)
        return self.currentSegmentationNode

    def _showOnly(self, shown):
        for node in self.segmentationNodes:
            display = node.GetDisplayNode()
            if display is not None:
                display.SetVisibility(node is shown)

    # -- export -------------------------------------------------------------------------------------------------------
    def export(self, basePath, overwrite=False):
        """Write the current segmentation as ``<base>.seg.nrrd`` and ``<base>.nii.gz`` (+ its recipe JSON from
        the session, and ``<base>.ctbl``, Slicer's colour table of the label values).

        Label values are the class indices (0 background, then the colour table's order) in every file.

        Returns:
            ``{"seg_nrrd", "nifti", "recipe", "colour_table"}`` -> Path.
        """
        from SegLensLogic.errors import refuse_existing

        session = self._requireSession()
        node = self.currentSegmentationNode
        if node is None:
            raise self._error("nothing to export: press Segment first")
        base = Path(str(basePath))
        for suffix in (".seg.nrrd", ".nii.gz", ".ctbl"):
            if base.name.endswith(suffix):
                base = base.with_name(base.name[: -len(suffix)])
        targets = {"seg_nrrd": base.with_name(base.name + ".seg.nrrd"), "colour_table": base.with_name(base.name + ".ctbl")}
        for path in targets.values():
            refuse_existing(path, overwrite)
        nifti, recipe = session.export(base.with_name(base.name + ".nii.gz"), overwrite=overwrite)
        nodes.write_segmentation(node, targets["seg_nrrd"], overwrite=overwrite)
        nodes.write_colour_table(self.colourTableNode, targets["colour_table"], overwrite=overwrite)
        return {"seg_nrrd": targets["seg_nrrd"], "nifti": Path(nifti), "recipe": Path(recipe),
                "colour_table": targets["colour_table"]}

    def clear(self):
        """Forget the session (nodes stay in the scene)."""
        self.session = None
        self.segmentationNodes = []
        self.originalSegmentationNode = None
        self.heatmapNodes = {}
        self.previewNode = None


#
# SegLensWidget
#
class SegLensWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel. Every handler reads the GUI, calls the logic (model work on the worker thread), shows results."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.worker = None
        self.progress = None
        self.rows = []
        self.currentSlice = None
        self._sliceTimer = None
        self._previewTimer = None
        self._updatingTable = False

    def setup(self):
        import qt

        ScriptedLoadableModuleWidget.setup(self)
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
        self.ui.latentTableWidget.setColumnCount(len(latenttable.HEADERS))
        self.ui.latentTableWidget.setHorizontalHeaderLabels(list(latenttable.HEADERS))
        self.ui.latentTableWidget.setSortingEnabled(True)
        self.ui.progressBar.hide()
        self.ui.cancelButton.enabled = False
        heat = nodes.heatmap_colour_node_id(slicer.mrmlScene)
        if heat:
            self.ui.heatmapColorSelector.setCurrentNodeID(heat)

        self.ui.segmentButton.connect("clicked(bool)", self.onSegment)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.latentTableWidget.connect("itemSelectionChanged()", self.onLatentSelection)
        self.ui.categoryFilterComboBox.connect("currentIndexChanged(int)", self.updateLatentTable)
        self.ui.statusFilterComboBox.connect("currentIndexChanged(int)", self.updateLatentTable)
        self.ui.heatmapThresholdSliderWidget.connect("valueChanged(double)", self.onLatentSelection)
        self.ui.heatmapOpacitySliderWidget.connect("valueChanged(double)", self.onLatentSelection)
        self.ui.heatmapColorSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onLatentSelection)
        self.ui.alphaSliderWidget.connect("valueChanged(double)", self.onSteeringChanged)
        self.ui.modeComboBox.connect("currentIndexChanged(int)", self.onSteeringChanged)
        self.ui.applyButton.connect("clicked(bool)", self.onApply)
        self.ui.undoButton.connect("clicked(bool)", self.onUndo)
        self.ui.exportButton.connect("clicked(bool)", self.onExport)

        # Scrolling a slice view fires many Modified events: refresh the table once it settles.
        self._sliceTimer = qt.QTimer()
        self._sliceTimer.setSingleShot(True)
        self._sliceTimer.setInterval(150)
        self._sliceTimer.connect("timeout()", self.onSliceSettled)
        self._previewTimer = qt.QTimer()
        self._previewTimer.setSingleShot(True)
        self._previewTimer.setInterval(100)
        self._previewTimer.connect("timeout()", self.onPreview)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.observeRedSlice()
        self.updateButtons()

    def cleanup(self):
        self.removeObservers()
        if self.worker is not None:
            self.worker.shutdown()

    def onSceneStartClose(self, caller, event):
        self.logic.clear()
        self.rows = []
        self.ui.latentTableWidget.setRowCount(0)
        self.updateButtons()

    # -- helpers ------------------------------------------------------------------------------------------------------
    def redSliceNode(self):
        layoutManager = slicer.app.layoutManager()
        if layoutManager is None:
            return None
        widget = layoutManager.sliceWidget("Red")
        return widget.mrmlSliceNode() if widget is not None else None

    def observeRedSlice(self):
        sliceNode = self.redSliceNode()
        if sliceNode is not None:
            self.addObserver(sliceNode, vtk.vtkCommand.ModifiedEvent, self.onSliceModified)

    def inputNodes(self):
        return {modality: getattr(self.ui, name).currentNode() for modality, name in MODALITY_SELECTORS.items()}

    def selectedLatents(self):
        rows = sorted({index.row() for index in self.ui.latentTableWidget.selectedIndexes()})
        return [int(self.ui.latentTableWidget.item(row, 0).text()) for row in rows]

    def updateButtons(self):
        ready = self.logic is not None and self.logic.session is not None and self.logic.currentSegmentationNode is not None
        self.ui.applyButton.enabled = ready and bool(self.selectedLatents())
        self.ui.undoButton.enabled = ready and bool(self.logic.session.edits)
        self.ui.exportButton.enabled = ready
        self.ui.selectedLatentsLabel.text = ", ".join(str(j) for j in self.selectedLatents()) or "(select latents in the table)"

    def runOnWorker(self, function, *args, **kwargs):
        """Run a model call on the worker thread while the panel stays responsive; returns its result."""
        import qt

        qt.QApplication.setOverrideCursor(qt.Qt.WaitCursor)
        try:
            return self.worker.run(function, *args, pump=slicer.app.processEvents, on_progress=self.showProgress, **kwargs)
        finally:
            qt.QApplication.restoreOverrideCursor()

    def showProgress(self):
        if self.progress is not None:
            self.ui.progressBar.value = self.progress.percent
            if self.progress.total:
                self.ui.statusLabel.text = f"Segmenting slice {self.progress.done} of {self.progress.total}"

    # -- handlers -----------------------------------------------------------------------------------------------------
    def onSegment(self):
        from SegLensLib.dependencies import DependencyError, ensure_dependencies

        confirm = lambda text: slicer.util.confirmOkCancelDisplay(text, "SegLens needs Python packages")  # noqa: E731
        try:
            device = ensure_dependencies(confirm)
        except DependencyError as exc:
            slicer.util.errorDisplay(str(exc))
            return
        self.ui.deviceLabel.text = device
        with slicer.util.tryWithErrorDisplay("SegLens: segmentation failed.", waitCursor=False):
            case = self.logic.caseFromVolumes(self.inputNodes())
            bundlePath = self.ui.bundlePathLineEdit.currentPath
            if not bundlePath:
                raise self.logic._error("choose a bundle folder (bundle.json, model/, sae/)")
            self.ui.statusLabel.text = "Loading the model ..."
            self.runOnWorker(self.logic.openSession, case, bundlePath=bundlePath)
            self.progress = Progress()
            self.ui.progressBar.value = 0
            self.ui.progressBar.show()
            self.ui.cancelButton.enabled = True
            self.ui.segmentButton.enabled = False
            try:
                labels = self.runOnWorker(self.logic.computeSegmentation, self.progress.callback)
            except Exception as exc:
                if type(exc).__name__ == "PredictionCancelled":  # the user pressed Cancel
                    self.ui.statusLabel.text = "Segmentation cancelled."
                    return
                raise
            finally:
                self.progress = None
                self.ui.progressBar.hide()
                self.ui.cancelButton.enabled = False
                self.ui.segmentButton.enabled = True
            node = self.logic.showSegmentation(labels)
            self.ui.statusLabel.text = f"Created segmentation '{node.GetName()}'."
            self.ui.sliceRangeWidget.maximum = self.logic.numberOfSlices() - 1
            self.ui.sliceRangeWidget.maximumValue = self.logic.numberOfSlices() - 1
            self.refreshFilters()
            self.onSliceSettled()
        self.updateButtons()

    def onCancel(self):
        if self.progress is not None:
            self.progress.cancel()
            self.ui.statusLabel.text = "Cancelling after the current slice ..."

    def onSliceModified(self, caller=None, event=None):
        self._sliceTimer.start()

    def onSliceSettled(self):
        if self.logic.session is None or not self.ui.followSliceCheckBox.checked:
            return
        sliceNode = self.redSliceNode()
        if sliceNode is None:
            return
        self.currentSlice = self.logic.sliceIndexOfPoint(nodes.slice_centre_ras(sliceNode))
        self.ui.currentSliceLabel.text = str(self.currentSlice)
        self.updateLatentTable()
        if self.ui.livePreviewCheckBox.checked and self.selectedLatents():
            self._previewTimer.start()

    def refreshFilters(self):
        rows = self.logic.latentTable()
        for combo, key in ((self.ui.categoryFilterComboBox, "category"), (self.ui.statusFilterComboBox, "status")):
            combo.blockSignals(True)
            combo.clear()
            combo.addItems(latenttable.choices(rows, key))
            combo.blockSignals(False)

    def updateLatentTable(self, *args):
        import qt

        if self.logic.session is None:
            return
        selected = set(self.selectedLatents())
        self.rows = self.logic.latentTable(self.currentSlice, self.ui.categoryFilterComboBox.currentText or latenttable.ALL,
                                           self.ui.statusFilterComboBox.currentText or latenttable.ALL)
        table = self.ui.latentTableWidget
        self._updatingTable = True
        table.setSortingEnabled(False)
        table.setRowCount(len(self.rows))
        for r, row in enumerate(self.rows):
            for c, column in enumerate(latenttable.COLUMNS):
                item = qt.QTableWidgetItem()
                value = row.get(column)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    item.setData(qt.Qt.DisplayRole, value)  # numeric sort
                else:
                    item.setText(latenttable.cell_text(row, column))
                table.setItem(r, c, item)
            if int(row["id"]) in selected:
                table.selectRow(r)
        table.setSortingEnabled(True)
        self._updatingTable = False

    def onLatentSelection(self, *args):
        if self._updatingTable or self.logic.session is None:
            return
        colour = self.ui.heatmapColorSelector.currentNode()
        with slicer.util.tryWithErrorDisplay("SegLens: could not show the heatmap.", waitCursor=True):
            self.logic.showHeatmaps(self.selectedLatents(), self.ui.heatmapThresholdSliderWidget.value,
                                    self.ui.heatmapOpacitySliderWidget.value, colour.GetID() if colour else None)
        self.updateButtons()

    def currentEdit(self):
        return self.logic.makeEdit(
            self.selectedLatents(), self.ui.modeComboBox.currentText, self.ui.alphaSliderWidget.value,
            self.ui.regionComboBox.currentText, self.currentSlice,
            (self.ui.sliceRangeWidget.minimumValue, self.ui.sliceRangeWidget.maximumValue),
        )

    def onSteeringChanged(self, *args):
        if self.ui.livePreviewCheckBox.checked and self.selectedLatents() and self.currentSlice is not None:
            self._previewTimer.start()

    def onPreview(self):
        if self.logic.session is None or self.currentSlice is None or not self.selectedLatents():
            return
        with slicer.util.tryWithErrorDisplay("SegLens: preview failed.", waitCursor=False):
            labels = self.runOnWorker(self.logic.computePreview, self.currentEdit(), self.currentSlice)
            self.logic.showPreview(labels)

    def onApply(self):
        with slicer.util.tryWithErrorDisplay("SegLens: steering failed.", waitCursor=False):
            labels = self.runOnWorker(self.logic.computeApply, self.currentEdit())
            node = self.logic.showCorrected(labels)
            self.ui.statusLabel.text = f"Created '{node.GetName()}' (the previous segmentation is kept)."
        self.updateButtons()

    def onUndo(self):
        with slicer.util.tryWithErrorDisplay("SegLens: undo failed.", waitCursor=True):
            node = self.logic.undo()
            self.ui.statusLabel.text = f"Undone; current segmentation: '{node.GetName()}'."
        self.updateButtons()

    def onExport(self):
        folder = self.ui.exportDirectoryButton.directory
        name = self.ui.exportNameLineEdit.text.strip() or f"{self.logic.referenceNode.GetName()}_seglens"
        with slicer.util.tryWithErrorDisplay("SegLens: export failed.", waitCursor=True):
            paths = self.logic.export(os.path.join(folder, name), overwrite=self.ui.overwriteCheckBox.checked)
            self.ui.statusLabel.text = "Exported " + ", ".join(p.name for p in paths.values())


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
        ensure_dependencies(lambda text: True)
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
