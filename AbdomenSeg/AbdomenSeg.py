"""AbdomenSeg: abdominal organ segmentation (CT/MR, 2D/3D U-Nets) with per-organ Dice/IoU.

Thin Slicer layer: all behaviour lives in AbdomenSegLib (engine) and AbdomenSegLib.slicer_logic
(MRML operations, tested outside Slicer). Nothing here imports torch, shows dialogs or downloads at
import or in setup(), so Slicer's generic module tests pass without PyTorch installed.
"""
import os
import sys
from typing import Annotated, Optional, Union

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

# In a source checkout the engine sits beside this folder; in a packaged extension, beside this file.
_here = os.path.dirname(os.path.abspath(__file__))
for _candidate in (_here, os.path.dirname(_here)):
    if os.path.isdir(os.path.join(_candidate, "AbdomenSegLib")) and _candidate not in sys.path:
        sys.path.insert(0, _candidate)
        break


class AbdomenSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("AbdomenSeg")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["AbdomenSeg developers"]
        self.parent.helpText = _(
            "Segments abdominal organs (liver, spleen, kidneys, pancreas and the other BTCV structures) in CT and MR "
            "with 3D U-Nets, and compares segmentations with a reference (Dice, IoU, volumes, HD95, surface Dice). "
            "See the README for the models' validated accuracy.")
        self.parent.acknowledgementText = _(
            "Models trained on BTCV (Synapse multi-organ CT, research use) and CHAOS MR (CC BY-SA 4.0).")


@parameterNodeWrapper
class AbdomenSegParameterNode:
    inputVolume: slicer.vtkMRMLScalarVolumeNode
    outputSegmentation: slicer.vtkMRMLSegmentationNode
    referenceNode: Optional[Union[slicer.vtkMRMLSegmentationNode, slicer.vtkMRMLLabelMapVolumeNode]] = None
    model: str = ""
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    largestComponent: Annotated[str, Choice(["model", "all", "none"])] = "model"
    fillHoles: bool = False
    reviewSegments: bool = False
    tolerance: float = 2.0


class AbdomenSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._running = False
        self._cancelRequested = False

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        from AbdomenSegLib.models import RESOURCES
        uiWidget = slicer.util.loadUI(str(RESOURCES / "UI" / "AbdomenSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = AbdomenSegLogic()
        self._fillModels()
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.compareButton.connect("clicked(bool)", self.onCompareButton)
        self.ui.compareModelsButton.connect("clicked(bool)", self.onCompareModelsButton)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self._onModelChanged)
        self.initializeParameterNode()

    def _fillModels(self):
        """Catalog entries (reads JSON only; no torch)."""
        from AbdomenSegLib.models import catalog, default_model_name
        self._cards = catalog()
        self.ui.modelComboBox.clear()
        self.ui.modelsListWidget.clear()
        for name, card in self._cards.items():
            t = card.get("timing", {})
            label = f"{name} ({card['modality']}, {card['dimensions']}D, CPU ~{t.get('cpu_seconds', '?')} s)"
            self.ui.modelComboBox.addItem(label, name)
            self.ui.modelComboBox.setItemData(self.ui.modelComboBox.count - 1, card.summary(), 3)  # tooltip
            self.ui.modelsListWidget.addItem(name)
        if self._cards:
            # A broken default package is left out of the catalog; then the first working model is shown.
            names = list(self._cards)
            default = default_model_name()
            self.ui.modelComboBox.setCurrentIndex(names.index(default) if default in names else 0)

    def _onModelChanged(self, index):
        name = self.ui.modelComboBox.itemData(index)
        if self._parameterNode and name:
            self._parameterNode.model = name
        self.ui.organsListWidget.clear()
        card = self._cards.get(name)
        for organ in (card["labels"].values() if card else []):
            item = self._checkableItem(organ)
            self.ui.organsListWidget.addItem(item)

    @staticmethod
    def _checkableItem(text):
        import qt
        item = qt.QListWidgetItem(text)
        item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
        item.setCheckState(qt.Qt.Checked)
        return item

    def _selectedOrgans(self):
        import qt
        items = [self.ui.organsListWidget.item(i) for i in range(self.ui.organsListWidget.count)]
        chosen = [i.text() for i in items if i.checkState() == qt.Qt.Checked]
        return None if len(chosen) == len(items) else chosen

    # -- parameter node lifecycle ---------------------------------------------------------------
    def cleanup(self):
        self._cancelRequested = True
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event):
        self._cancelRequested = True
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.inputVolume = first

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)

    # -- actions ---------------------------------------------------------------------------------
    def _progress(self, fraction, message):
        self.ui.progressBar.value = int(fraction * 100)
        self.ui.statusLabel.text = message
        slicer.app.processEvents()  # keeps the Cancel button responsive during blocking inference

    def onApplyButton(self):
        if self._running:
            self._cancelRequested = True
            self.ui.statusLabel.text = _("Cancelling…")
            return
        p = self._parameterNode
        output = p.outputSegmentation
        replace = False
        if output is not None and output.GetSegmentation().GetNumberOfSegments():
            replace = slicer.util.confirmYesNoDisplay(
                _("'{name}' already has segments. Replace them?").format(name=output.GetName()))
            if not replace:
                return
        self._running, self._cancelRequested = True, False
        self.ui.applyButton.text = _("Cancel")
        try:
            with slicer.util.tryWithErrorDisplay(_("Segmentation failed."), waitCursor=True):
                self.logic.ensureDependencies(interactive=True)
                seg = self.logic.segment(p.inputVolume, model=p.model, device=p.device, organs=self._selectedOrgans(),
                                         segmentationNode=output, replaceExisting=replace,
                                         largestComponent=p.largestComponent, fillHoles=p.fillHoles,
                                         progress=self._progress, cancel=lambda: self._cancelRequested,
                                         confirmCpu=self._confirmCpu)
                if seg is not None:
                    p.outputSegmentation = seg
                    self.ui.show3DButton.setSegmentationNode(seg)
                    table = self.logic.organVolumes(seg, p.inputVolume)
                    self.ui.tableView.setMRMLTableNode(table)
        finally:
            self._running = False
            self.ui.applyButton.text = _("Segment")

    def _confirmCpu(self, seconds):
        return slicer.util.confirmOkCancelDisplay(
            _("CUDA is not available. Run on the CPU instead (about {s} s for a typical abdominal CT)?").format(s=seconds))

    def onCompareButton(self):
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Comparison failed."), waitCursor=True):
            table = self.logic.compareWithReference(p.outputSegmentation, p.referenceNode, volumeNode=p.inputVolume,
                                                    toleranceMm=p.tolerance, review=p.reviewSegments)
            self.ui.tableView.setMRMLTableNode(table)

    def onCompareModelsButton(self):
        p = self._parameterNode
        models = [i.text() for i in self.ui.modelsListWidget.selectedItems()]
        with slicer.util.tryWithErrorDisplay(_("Model comparison failed."), waitCursor=True):
            self.logic.ensureDependencies(interactive=True)
            _segs, table, chart = self.logic.compareModels(p.inputVolume, models, device=p.device,
                                                           referenceNode=p.referenceNode, progress=self._progress,
                                                           cancel=lambda: self._cancelRequested)
            self.ui.tableView.setMRMLTableNode(table)
            if chart is not None:
                slicer.modules.plots.logic().ShowChartInLayout(chart)


class AbdomenSegLogic(ScriptedLoadableModuleLogic):
    """Scripting entry points; blocking and popup-free unless `interactive` callbacks are given."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self._core = None

    def getParameterNode(self):
        return AbdomenSegParameterNode(super().getParameterNode())

    @property
    def core(self):
        if self._core is None:
            from AbdomenSegLib.slicer_logic import AbdomenSegCore
            self._core = AbdomenSegCore(slicer.mrmlScene, log=lambda m: print(m))
        return self._core

    def ensureDependencies(self, interactive=False):
        from AbdomenSegLib.install import ensure_dependencies
        confirm = slicer.util.confirmOkCancelDisplay if interactive else None
        return ensure_dependencies(confirm=confirm)

    def segment(self, volumeNode, model=None, device="auto", organs=None, segmentationNode=None,
                replaceExisting=False, largestComponent="model", fillHoles=False, progress=None, cancel=None,
                confirmCpu=None):
        """Segment a volume; returns the segmentation node (None if the user declined a CPU run)."""
        from AbdomenSegLib.errors import Cancelled
        if device == "cuda" and confirmCpu is not None:
            import torch
            if not torch.cuda.is_available():
                from AbdomenSegLib.models import find_model
                if not confirmCpu(find_model(model or None).get("timing", {}).get("cpu_seconds", "?")):
                    return None
                device = "cpu"
        try:
            return self.core.segment(volumeNode, model=model or None, device=device, organs=organs,
                                     segmentation_node=segmentationNode, replace_existing=replaceExisting,
                                     largest_component=largestComponent, fill_holes=fillHoles,
                                     progress=progress, cancel=cancel)
        except Cancelled:
            slicer.util.showStatusMessage(_("Segmentation cancelled."), 3000)
            return None

    def organVolumes(self, segmentationNode, volumeNode):
        return self.core.organ_volumes(segmentationNode, volumeNode)

    def compareWithReference(self, segmentationNode, referenceNode, volumeNode=None, toleranceMm=2.0,
                             referenceConvention="abdomenseg", review=False):
        return self.core.compare_with_reference(segmentationNode, referenceNode, volume_node=volumeNode,
                                                tolerance_mm=toleranceMm, reference_convention=referenceConvention,
                                                review=review)

    def compareModels(self, volumeNode, models, device="auto", referenceNode=None, progress=None, cancel=None):
        return self.core.compare_models(volumeNode, models, device=device, reference_node=referenceNode,
                                        progress=progress, cancel=cancel)


class AbdomenSegTest(ScriptedLoadableModuleTest):
    """Self-test inside Slicer: segment the synthetic phantom with the shipped default model."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_segment_phantom()

    def test_segment_phantom(self):
        import importlib.util
        if importlib.util.find_spec("torch") is None:
            self.delayDisplay("PyTorch is not installed: skipping the segmentation self-test")
            return
        from AbdomenSegLib.phantom import make_phantom
        from AbdomenSegLib.slicer_logic import scalar_volume_node_from_image, segmentation_to_labels
        ct, _labels = make_phantom()
        volume = scalar_volume_node_from_image(slicer.mrmlScene, ct, "synthetic phantom CT")
        seg = AbdomenSegLogic().segment(volume, device="cpu")
        self.assertIsNotNone(seg)
        labels = segmentation_to_labels(slicer.mrmlScene, seg, volume)
        self.assertEqual(labels.GetSize(), ct.GetSize())
        self.assertEqual(labels.GetDirection(), ct.GetDirection())
        self.delayDisplay("AbdomenSeg self-test passed")
