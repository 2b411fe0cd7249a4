"""AbdomenSeg: abdominal organ segmentation (CT/MR, 2D/3D U-Nets) with per-organ Dice/IoU.

Thin Slicer layer: all behaviour lives in AbdomenSegLib (engine) and AbdomenSegLib.slicer.logic /
slicer/runs.py (MRML operations and background runs, tested outside Slicer). Nothing here imports torch,
shows dialogs or downloads at import or in setup(), so Slicer's generic module tests pass without
PyTorch installed. Segmentation runs in a background process (as SlicerTotalSegmentator and
SlicerMONAIAuto3DSeg do), polled by a timer on the main thread, so the panel never freezes.
"""

import logging
import os
import sys
from typing import Annotated, Optional, Union

import qt
import slicer
import vtk
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

# In a source checkout the engine sits beside this folder; in a packaged extension, beside this file.
_here = os.path.dirname(os.path.abspath(__file__))
for _candidate in (_here, os.path.dirname(_here)):
    if os.path.isdir(os.path.join(_candidate, "AbdomenSegLib")) and _candidate not in sys.path:
        sys.path.insert(0, _candidate)
        break

# The option values the engine and the command line use (standard library only: nothing heavy loads with Slicer).
from AbdomenSegLib.core.options import DEVICES, LARGEST_COMPONENT, QUALITIES, REFERENCE_CONVENTIONS  # noqa: E402

DOCUMENTATION = "https://github.com/abdomenseg/SlicerAbdomenSeg#readme"


class AbdomenSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("AbdomenSeg")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["AbdomenSeg developers (https://github.com/abdomenseg/SlicerAbdomenSeg)"]
        self.parent.helpText = _(
            "Segments abdominal organs (liver, spleen, kidneys, pancreas and the other BTCV structures) in CT and MR "
            "with 2D/3D U-Nets, and compares segmentations with a reference (Dice, IoU, volumes, HD95, surface Dice). "
            "Validated accuracy, limits and the command line: <a href=\"{url}\">documentation</a>."
        ).format(url=DOCUMENTATION)
        self.parent.acknowledgementText = _(
            "Models trained on BTCV (Synapse multi-organ CT, research use only) and CHAOS MR (CC BY-SA 4.0). "
            "Not a medical device."
        )
        # ScriptedLoadableModule looks for <module dir>/Resources/Icons/<name>.png (Slicer v5.6.2
        # Base/Python/slicer/ScriptedLoadableModule.py:35-41); that is where a built extension has it, but
        # in a source checkout Resources/ sits one folder up.
        checkout_icon = os.path.join(_here, os.pardir, "Resources", "Icons", "AbdomenSeg.png")
        if not os.path.isfile(os.path.join(_here, "Resources", "Icons", "AbdomenSeg.png")) and os.path.isfile(
            checkout_icon
        ):
            self.parent.icon = qt.QIcon(checkout_icon)


# How the fields reach the widgets (Slicer v5.6.2 Base/Python/slicer/parameterNodeWrapper/guiConnectors.py):
# a str with Choice on a QComboBox (QComboBoxToStringableConnector, :351-396) clears the combo and fills it
# with the choices, so the choice strings are what the user sees; a float on a QDoubleSpinBox (:286-348) takes
# WithinRange as the spin box's minimum and maximum, so a negative tolerance cannot be entered; a bool on a
# QCheckBox (QCheckBoxToBoolConnector, :162-192 at 583e9b37) follows its checked state. `model` has no Choice (the
# installed models are known only at run time) and no connector reads a list of checked items, so it is bound by
# hand (_showParameterNodeModel); it holds the engine's model argument: one name, or `a+b` for an ensemble.
@parameterNodeWrapper
class AbdomenSegParameterNode:
    inputVolume: slicer.vtkMRMLScalarVolumeNode
    outputSegmentation: slicer.vtkMRMLSegmentationNode
    referenceNode: Optional[Union[slicer.vtkMRMLSegmentationNode, slicer.vtkMRMLLabelMapVolumeNode]] = None
    model: str = ""  # the checked models of segmentModelsListWidget, as models.choice.argument() joins them
    tta: bool = False  # test-time mirroring; off (and its box disabled) unless every checked model allows it
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    # high: the model's fine second stage re-segments the small organs' region (refused where none is installed)
    quality: Annotated[str, Choice(list(QUALITIES))] = "standard"
    largestComponent: Annotated[str, Choice(list(LARGEST_COMPONENT))] = "model"
    fillHoles: bool = False
    referenceConvention: Annotated[str, Choice(list(REFERENCE_CONVENTIONS))] = REFERENCE_CONVENTIONS[0]
    reviewSegments: bool = False
    tolerance: Annotated[float, WithinRange(0.1, 50.0)] = 2.0


class AbdomenSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    POLL_MS = 100

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._cards = {}
        self._selection = None  # AbdomenSegLib.models.choice.Selection of the checked models
        self._run = None  # the background run in progress (AbdomenSegLib.slicer.runs.BackgroundRun)
        self._runKind = None  # "segment" or "compare"
        self._timer = qt.QTimer()
        self._timer.setInterval(self.POLL_MS)
        self._timer.connect("timeout()", self._onTimer)
        self._missing = {}  # name -> catalog entry of a listed model that is published apart and not installed
        self._installation = None  # AbdomenSegLib.slicer.install.Installation whose pip step runs in the background
        self._afterInstall = None  # what to do once it is done
        self._installTimer = qt.QTimer()
        self._installTimer.setInterval(self.POLL_MS * 5)
        self._installTimer.connect("timeout()", self._onInstallTimer)

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        from AbdomenSegLib.models.packages import RESOURCES

        uiWidget = slicer.util.loadUI(str(RESOURCES / "UI" / "AbdomenSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = AbdomenSegLogic()
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.compareButton.connect("clicked(bool)", self.onCompareButton)
        self.ui.compareModelsButton.connect("clicked(bool)", self.onCompareModelsButton)
        # Checkable items, as this panel's organ list and Slicer's own LoadModulesDialog
        # (Modules/Scripted/ExtensionWizard/ExtensionWizardLib/LoadModulesDialog.py:107-113 at 583e9b37).
        self.ui.segmentModelsListWidget.connect("itemChanged(QListWidgetItem*)", self._onModelsChecked)
        self.ui.organsListWidget.connect("itemChanged(QListWidgetItem*)", self._checkCanApply)
        self.ui.modelsListWidget.connect("itemSelectionChanged()", self._checkCanApply)
        self._fillModels()
        self.initializeParameterNode()

    def _fillModels(self):
        """Catalog entries, ensemble entries included (reads JSON only; no torch); broken packages are logged."""
        from AbdomenSegLib.core.errors import AbdomenSegError
        from AbdomenSegLib.models.choice import default_names, label
        from AbdomenSegLib.models.packages import catalog_with_problems
        from AbdomenSegLib.models.store import describe, downloadable

        try:
            self._cards, broken = catalog_with_problems()
        except AbdomenSegError as exc:  # a malformed catalog.json: say so in the panel, do not fail to open
            self._cards, broken = {}, {}
            self.ui.statusLabel.text = _("No model can be listed: {error}").format(error=exc)
        models = self.ui.segmentModelsListWidget
        models.blockSignals(True)
        models.clear()
        self.ui.modelsListWidget.clear()
        for name, card in self._cards.items():
            item = qt.QListWidgetItem(label(card))
            item.setData(qt.Qt.UserRole, name)
            item.setToolTip(card.summary())
            item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
            item.setCheckState(qt.Qt.Unchecked)
            models.addItem(item)
            self.ui.modelsListWidget.addItem(name)
        # Models the catalog lists but that are published apart (release assets) and not installed: listed, and
        # checking one offers to download it (size and terms shown first).
        self._missing = {n: e for n, e in downloadable().items() if n not in self._cards}
        for name, entry in self._missing.items():
            size = entry["download"].get("size") or 0
            item = qt.QListWidgetItem(_("{name} (not installed, {mb} MB download)").format(name=name, mb=size // 10**6))
            item.setData(qt.Qt.UserRole, name)
            item.setToolTip(describe(entry))
            item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
            item.setCheckState(qt.Qt.Unchecked)
            models.addItem(item)
        models.blockSignals(False)
        for name, error in broken.items():
            if name not in self._missing:
                logging.warning(f"AbdomenSeg: model package '{name}' is broken: {error}")
        self._checkModels(default_names(self._cards))

    def _modelItems(self):
        models = self.ui.segmentModelsListWidget
        return [models.item(i) for i in range(models.count)]

    def _checkModels(self, names):
        """Check exactly `names` in the list, then act on the new selection once."""
        self.ui.segmentModelsListWidget.blockSignals(True)
        for item in self._modelItems():
            item.setCheckState(qt.Qt.Checked if item.data(qt.Qt.UserRole) in names else qt.Qt.Unchecked)
        self.ui.segmentModelsListWidget.blockSignals(False)
        self._onModelsChecked()

    def _onModelsChecked(self, *args):
        """The checked models: into the parameter node, the organ list, the mirroring box, and the status line
        (where a choice the engine refuses is named, with the command line's `error: <problem>. <fix>`)."""
        from AbdomenSegLib.models.choice import select

        names = [i.data(qt.Qt.UserRole) for i in self._modelItems() if i.checkState() == qt.Qt.Checked]
        wanted = [n for n in names if n in self._missing]
        if wanted:  # checked a model that is not installed: offer it, then check it once it is there
            self._checkModels([n for n in names if n not in self._missing])
            self._offerModel(wanted[0])
            return
        before = self._selection
        self._selection = selection = select(names)
        p = self._parameterNode
        if p and p.model != selection.model:
            p.model = selection.model
        self._showOrgans(selection.card or (self._cards.get(names[0]) if names else None))
        self.ui.ttaCheckBox.enabled = selection.tta_allowed
        self.ui.ttaCheckBox.toolTip = selection.tta_tip
        if p and p.tta and not selection.tta_allowed:
            p.tta = False
        # Quality "high" only where a fine second stage is installed for the choice (else standard, and why)
        self.ui.qualityComboBox.enabled = selection.high_allowed
        self.ui.qualityComboBox.toolTip = selection.high_tip
        if p and p.quality != "standard" and not selection.high_allowed:
            p.quality = "standard"
        if selection.error or (before is not None and before.error and self.ui.statusLabel.text == before.error):
            self.ui.statusLabel.text = selection.error
        self._checkCanApply()

    def _showOrgans(self, card):
        """The organs of the checked models (an ensemble's members segment the same ones); the checks stay when
        the organs do."""
        from AbdomenSegLib.core.organs import organ_choices

        organs = list(card["labels"].values()) if card else []
        shown = self.ui.organsListWidget
        if [shown.item(i).data(qt.Qt.UserRole) for i in range(shown.count)] == organs:
            return
        shown.clear()
        # The names the segments get, in the user's language (the `_()`/translate pattern); the engine gets the
        # machine name kept in the item's data.
        for organ, text in organ_choices(organs, translate):
            item = qt.QListWidgetItem(text)
            item.setData(qt.Qt.UserRole, organ)
            item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
            item.setCheckState(qt.Qt.Checked)
            self.ui.organsListWidget.addItem(item)

    def _showParameterNodeModel(self, initial=False):
        """The list shows the parameter node's models (after a scene load, the saved ones; none installed: the
        default), and the status line names any saved model that is not installed here."""
        from AbdomenSegLib.models.choice import default_names, missing_note, names_in

        p = self._parameterNode
        if p is None:
            return
        names = names_in(p.model, self._cards) or (default_names(self._cards) if initial else [])
        note = missing_note(p.model, self._cards, names)  # a saved scene's model not installed here: say so
        if self._selection is None or tuple(names) != self._selection.names or p.model != self._selection.model:
            self._checkModels(names)
        else:  # e.g. a scene saved when the model allowed these
            if p.tta and not self._selection.tta_allowed:
                p.tta = False
            if p.quality != "standard" and not self._selection.high_allowed:
                p.quality = "standard"
        if note:
            self.ui.statusLabel.text = note

    def _checkedOrgans(self):
        items = [self.ui.organsListWidget.item(i) for i in range(self.ui.organsListWidget.count)]
        return [i.data(qt.Qt.UserRole) for i in items if i.checkState() == qt.Qt.Checked], len(items)

    def _selectedOrgans(self):
        """None for every organ the model has; else the checked ones (never an empty list: Segment is off then)."""
        chosen, total = self._checkedOrgans()
        return None if len(chosen) == total else chosen

    # -- parameter node lifecycle ---------------------------------------------------------------
    def cleanup(self):
        self._cancelRun()
        self._timer.stop()
        self._installTimer.stop()  # a pip process under way finishes on its own
        self.removeObservers()
        runs = sys.modules.get("AbdomenSegLib.slicer.runs")  # loaded only if a run was ever started
        if runs is not None:
            runs.stop_shared_worker()  # the engine process and the models it holds in memory

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        # The Slicer v5.10.0 scripted-module template (Utilities/Templates/Modules/Scripted/TemplateKey.py:184-191).
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event):
        self._cancelRun()  # its volume is going away
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first and not first.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = first

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._showParameterNodeModel(initial=True)
        self._checkCanApply()

    def _onParameterNodeModified(self, caller=None, event=None):
        self._showParameterNodeModel()
        self._suggestModelForInput()
        self._checkCanApply()

    def _suggestModelForInput(self):
        """A new input volume while the default model is checked: an MR volume gets the recommended MR model,
        said on the status line (as the command line does when no --model is given)."""
        from AbdomenSegLib.models.choice import default_names

        p = self._parameterNode
        volume = p.inputVolume if p else None
        if volume is None or volume is getattr(self, "_suggestedFor", None):
            return
        self._suggestedFor = volume
        if self._selection is None or list(self._selection.names) != default_names(self._cards):
            return  # the user chose a model: keep it
        try:
            name, line = self.logic.core().model_for_volume(volume)
        except Exception as exc:  # noqa: BLE001 - a suggestion must never break the panel
            logging.warning(f"AbdomenSeg: no model suggestion for '{volume.GetName()}': {exc}")
            return
        if line and name in self._cards:
            self._checkModels([name])
            self.ui.statusLabel.text = line

    def _checkCanApply(self, *args):
        """Buttons are enabled only when their inputs are there; the tooltip says what is missing."""
        p = self._parameterNode
        busy = self._run is not None
        chosen, _total = self._checkedOrgans()
        selection = self._selection
        missing = (
            _("Select an input volume")
            if not (p and p.inputVolume)
            else _("No model is installed")
            if not self._cards
            else _("Check a model")
            if not (p and p.model)
            else selection.error  # a choice the engine refuses (e.g. models of two modalities), as it says
            if selection and selection.error
            else _("Check at least one organ")
            if not chosen
            else ""
        )
        self.ui.applyButton.enabled = (self._runKind == "segment") or (not busy and not missing)
        self.ui.applyButton.toolTip = missing or _("Segment the input; click again to cancel")
        self.ui.applyButton.text = _("Cancel") if self._runKind == "segment" else _("Segment")
        self.ui.compareButton.enabled = bool(not busy and p and p.outputSegmentation and p.referenceNode)
        models = self.ui.modelsListWidget.selectedItems()
        self.ui.compareModelsButton.enabled = (self._runKind == "compare") or bool(
            not busy and p and p.inputVolume and models
        )
        self.ui.compareModelsButton.text = (
            _("Cancel") if self._runKind == "compare" else _("Run selected models and compare")
        )

    # -- background runs -------------------------------------------------------------------------
    def _start(self, kind, models, segmentationNode=None, replace=False, tta=False, quality="standard"):
        p = self._parameterNode
        device = self.logic.resolveDevice(p.device, models[0], confirmCpu=self._confirmCpu)
        if device is None:
            return
        self.ui.qcLabel.text = ""
        self._run = self.logic.startRun(
            p.inputVolume,
            models,
            device=device,
            organs=self._selectedOrgans() if kind == "segment" else None,
            segmentationNode=segmentationNode,
            replaceExisting=replace,
            largestComponent=p.largestComponent,
            fillHoles=p.fillHoles,
            tta=tta,
            quality=quality,
        )
        self._runKind = kind
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = _("Starting…")
        self._checkCanApply()
        self._timer.start()

    def _onTimer(self):
        run = self._run
        if run is None:
            self._timer.stop()
            return
        try:
            running = run.step()  # imports finished results into MRML: main thread only, as here
        except Exception as exc:  # an import failure must not leave the timer spinning, nor look like success
            run.error = run.error or f"{type(exc).__name__}: {exc}"
            self._finish()
            return
        fraction, message = run.progress
        self.ui.progressBar.value = int(fraction * 100)
        self.ui.statusLabel.text = message
        if not running:
            self._finish()

    def _finish(self):
        run, kind = self._run, self._runKind
        self._timer.stop()
        self._run, self._runKind = None, None
        self._checkCanApply()
        if run is None:
            return
        if run.cancelled:
            self.ui.statusLabel.text = _("Cancelled.")
            return
        if run.error:
            self.ui.statusLabel.text = _("Failed.")
            slicer.util.errorDisplay(_("Segmentation failed:") + f"\n{run.error}")
            return
        self._showResultCheck(run.warnings, run.notes)
        if run.warnings:
            slicer.util.warningDisplay(_("Check this result before using it:") + "\n\n" + "\n\n".join(run.warnings))
        p = self._parameterNode
        if kind == "segment" and run.results:
            seg = next(iter(run.results.values()))
            if p:
                p.outputSegmentation = seg
            self.ui.show3DButton.setSegmentationNode(seg)
            self.ui.tableView.setMRMLTableNode(self.logic.organVolumes(seg, run.volumeNode))
        elif kind == "compare" and run.results:
            with slicer.util.tryWithErrorDisplay(_("Model comparison failed."), waitCursor=True):
                table, chart = self.logic.core.model_comparison(
                    run.volumeNode,
                    run.results,
                    p.referenceNode if p else None,
                    p.referenceConvention if p else REFERENCE_CONVENTIONS[0],
                    p.tolerance if p else 2.0,
                )
                self.ui.tableView.setMRMLTableNode(table)
                if chart is not None:
                    slicer.modules.plots.logic().ShowChartInLayout(chart)
        self.ui.statusLabel.text = _("Done.")

    def _showResultCheck(self, warnings, notes):
        """The result check in the panel: warnings in red, notes in orange, or a quiet green line."""
        import html

        for text in warnings:
            logging.warning(f"AbdomenSeg: {text}")
        lines = [f'<span style="color:#c0392b">&#9888; {html.escape(t)}</span>' for t in warnings]
        lines += [f'<span style="color:#b9770e">&#8226; {html.escape(t)}</span>' for t in notes]
        self.ui.qcLabel.text = (
            "<br>".join(lines) if lines else '<span style="color:#1e8449">' + _("Result check: no flags") + "</span>"
        )

    def _cancelRun(self):
        if self._run is not None:
            self._run.cancel()
            self._finish()

    # -- actions ---------------------------------------------------------------------------------
    def onApplyButton(self):
        if self._runKind == "segment":
            self._cancelRun()
            return
        p = self._parameterNode
        output = p.outputSegmentation
        replace = False
        if output is not None and output.GetSegmentation().GetNumberOfSegments():
            replace = slicer.util.confirmYesNoDisplay(
                _("'{name}' already has segments. Replace them?").format(name=output.GetName())
            )
            if not replace:
                return
        # One model argument: a checked model, or `a+b`, the checked ones as one ensemble (as the command line).
        tta = p.tta and self._selection.tta_allowed
        self._whenReady(
            [p.model],
            lambda: self._start(
                "segment", [p.model], segmentationNode=output, replace=replace, tta=tta, quality=p.quality
            ),
        )

    def _confirmCpu(self, seconds):
        return slicer.util.confirmOkCancelDisplay(
            _("CUDA is not available. Run on the CPU instead (about {s} s for a typical abdominal CT)?").format(
                s=seconds
            )
        )

    def onCompareButton(self):
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Comparison failed."), waitCursor=True):
            table = self.logic.compareWithReference(
                p.outputSegmentation,
                p.referenceNode,
                volumeNode=p.inputVolume,
                toleranceMm=p.tolerance,
                referenceConvention=p.referenceConvention,
                review=p.reviewSegments,
            )
            self.ui.tableView.setMRMLTableNode(table)

    def onCompareModelsButton(self):
        if self._runKind == "compare":
            self._cancelRun()
            return
        models = [i.text() for i in self.ui.modelsListWidget.selectedItems()]
        self._whenReady(models, lambda: self._start("compare", models), _("Model comparison failed."))

    # -- before a run: terms, Python packages (no wait cursor: every question comes first) --------------------------
    def _whenReady(self, models, then, failed=None):
        """Ask for the models' terms and for missing Python packages, each without a wait cursor, install them in
        the background (polled by a timer: Slicer 5.6-5.10's pip_install would block for minutes), then `then()`."""
        from AbdomenSegLib.core.errors import AbdomenSegError
        from AbdomenSegLib.slicer.install import Installation, confirm_message

        if self._installation is not None:
            return  # an installation is under way; its end starts the run
        if not all(self._acceptTerms(model) for model in models):
            return
        try:
            installation = Installation(self._cards.values(), log=logging.info)
        except AbdomenSegError as exc:
            slicer.util.errorDisplay(str(exc))
            return
        if installation.problems:
            if not slicer.util.confirmOkCancelDisplay(
                confirm_message(installation.problems), _("AbdomenSeg - Install Python packages")
            ):
                self.ui.statusLabel.text = str(installation.refuse())
                return
            self.ui.statusLabel.text = _("Installing Python packages (see the Python console)…")
            slicer.app.processEvents()
            with slicer.util.tryWithErrorDisplay(_("Installing Python packages failed.")):
                installation.start()  # the PyTorch extension's step, if any, runs here; pip then runs in the background
                self._installation, self._afterInstall = installation, (then, failed)
                self._installTimer.start()
            return
        # `then` starts a background run (it returns at once) and may ask (CPU instead of CUDA): no wait cursor.
        with slicer.util.tryWithErrorDisplay(failed or _("Segmentation failed.")):
            then()

    def _onInstallTimer(self):
        from AbdomenSegLib.core.errors import AbdomenSegError

        installation = self._installation
        try:
            if not installation.poll():
                line = installation.pip.last_line if installation.pip is not None else ""
                self.ui.statusLabel.text = _("Installing Python packages…") + (f" {line[:100]}" if line else "")
                return
            self._installTimer.stop()
            self._installation = None
            installation.finish()
        except AbdomenSegError as exc:
            self._installTimer.stop()
            self._installation = None
            self.ui.statusLabel.text = _("Failed.")
            slicer.util.errorDisplay(_("Installing Python packages failed:") + f"\n{exc}")
            return
        self.ui.statusLabel.text = _("Python packages installed.")
        then, failed = self._afterInstall
        with slicer.util.tryWithErrorDisplay(failed or _("Segmentation failed.")):
            then()

    def _acceptTerms(self, model):
        """True when every non-permissive licence behind `model` is accepted (asked once per licence text, kept in
        Slicer's settings): the ExtensionsIndex asks for explicit approval of non-permissive parts."""
        from AbdomenSegLib.models.store import catalog_entries, terms_of, terms_to_accept

        settings = qt.QSettings()
        accepted = {n: settings.value(f"AbdomenSeg/AcceptedTerms/{n}") for n in catalog_entries()}
        for entry in terms_to_accept(model, accepted):
            terms = terms_of(entry)
            if not slicer.util.confirmOkCancelDisplay(
                _("Model '{name}' comes under these terms: {licence}.\n\n{text}\n\nDo you accept them?").format(
                    name=entry["name"], licence=terms.get("licence", ""), text=terms.get("text", "")
                ),
                _("AbdomenSeg - Model terms"),
            ):
                self.ui.statusLabel.text = _("The model's terms were not accepted.")
                return False
            settings.setValue(f"AbdomenSeg/AcceptedTerms/{entry['name']}", terms.get("licence", ""))
        return True

    def _offerModel(self, name):
        """Download and install a listed model that is not installed, after showing its size and terms."""
        from AbdomenSegLib.models.store import describe, install, needs_acceptance, terms_of

        entry = self._missing[name]
        question = _("Download and install this model into your model folder?") + "\n\n" + describe(entry)
        if needs_acceptance(entry):
            question += "\n\n" + _("Installing it means accepting these terms.")
        if not slicer.util.confirmOkCancelDisplay(question, _("AbdomenSeg - Install model")):
            return
        if needs_acceptance(entry):
            qt.QSettings().setValue(f"AbdomenSeg/AcceptedTerms/{name}", terms_of(entry).get("licence", ""))
        progress = slicer.util.createProgressDialog(
            labelText=_("Downloading {name}…").format(name=name), maximum=100, windowTitle=_("AbdomenSeg")
        )

        def step(done, total):
            progress.setValue(int(100 * done / total) if total else 0)
            slicer.app.processEvents()

        try:
            with slicer.util.tryWithErrorDisplay(_("Installing the model failed.")):
                install(name, accept_terms=True, progress=step, log=logging.info)
        finally:
            progress.close()
        self._fillModels()
        if name in self._cards:
            self._checkModels([name])


class AbdomenSegLogic(ScriptedLoadableModuleLogic):
    """Scripting entry points: `segment`, `compareWithReference`, `compareModels` block and show no pop-ups;
    `startRun` is what the panel uses (a background process)."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self._core = None

    def getParameterNode(self):
        return AbdomenSegParameterNode(super().getParameterNode())

    @property
    def core(self):
        if self._core is None:
            from AbdomenSegLib.slicer.logic import AbdomenSegCore

            self._core = AbdomenSegCore(slicer.mrmlScene, log=logging.info)
        return self._core

    def ensureDependencies(self, interactive=False):
        from AbdomenSegLib.slicer.install import ensure_dependencies

        confirm = slicer.util.confirmOkCancelDisplay if interactive else None
        return ensure_dependencies(confirm=confirm, log=logging.info)

    def resolveDevice(self, device, model=None, confirmCpu=None):
        """`device`, or "cpu" when CUDA was asked for but is missing and `confirmCpu(seconds)` agrees; None if not."""
        if device != "cuda":
            return device
        import torch

        if torch.cuda.is_available():
            return device
        if confirmCpu is None:
            return "cpu"
        from AbdomenSegLib.models.packages import find_model

        return "cpu" if confirmCpu(find_model(model or None).get("timing", {}).get("cpu_seconds", "?")) else None

    def startRun(
        self,
        volumeNode,
        models,
        device="auto",
        organs=None,
        segmentationNode=None,
        replaceExisting=False,
        largestComponent="model",
        fillHoles=False,
        tta=False,
        quality="standard",
    ):
        """`models`: each a name, a package folder or an ensemble `a+b`, run one after the other (a comparison
        when several); `tta`: test-time mirroring, refused (AbdomenSegError) for a model trained without;
        `quality` "high": the model's fine second stage too (cascade.py), refused where none is installed."""
        from AbdomenSegLib.slicer.runs import BackgroundRun, shared_worker

        return BackgroundRun(
            self.core,
            volumeNode,
            models,
            device=device,
            organs=organs,
            segmentation_node=segmentationNode,
            replace_existing=replaceExisting,
            largest_component=largestComponent,
            fill_holes=fillHoles,
            tta=tta,
            quality=quality,
            temp_root=slicer.app.temporaryPath,
            worker=shared_worker(temp_root=slicer.app.temporaryPath),
        )

    def segment(
        self,
        volumeNode,
        model=None,
        device="auto",
        organs=None,
        segmentationNode=None,
        replaceExisting=False,
        largestComponent="model",
        fillHoles=False,
        progress=None,
        cancel=None,
        confirmCpu=None,
        tta=False,
        quality="standard",
    ):
        """Segment a volume, blocking; returns the segmentation node (None if the user declined a CPU run).
        `model`: a name, a package folder or an ensemble `a+b`; `tta`: test-time mirroring; `quality` "high":
        the model's fine second stage too."""
        from AbdomenSegLib.core.errors import Cancelled

        device = self.resolveDevice(device, model, confirmCpu)
        if device is None:
            return None
        try:
            return self.core.segment(
                volumeNode,
                model=model or None,
                device=device,
                organs=organs,
                segmentation_node=segmentationNode,
                replace_existing=replaceExisting,
                largest_component=largestComponent,
                fill_holes=fillHoles,
                progress=progress,
                cancel=cancel,
                tta=tta,
                quality=quality,
            )
        except Cancelled:
            logging.info("AbdomenSeg: segmentation cancelled")
            return None

    def organVolumes(self, segmentationNode, volumeNode):
        return self.core.organ_volumes(segmentationNode, volumeNode)

    def compareWithReference(
        self,
        segmentationNode,
        referenceNode,
        volumeNode=None,
        toleranceMm=2.0,
        referenceConvention=REFERENCE_CONVENTIONS[0],
        review=False,
    ):
        return self.core.compare_with_reference(
            segmentationNode,
            referenceNode,
            volume_node=volumeNode,
            tolerance_mm=toleranceMm,
            reference_convention=referenceConvention,
            review=review,
        )

    def compareModels(
        self,
        volumeNode,
        models,
        device="auto",
        referenceNode=None,
        referenceConvention=REFERENCE_CONVENTIONS[0],
        progress=None,
        cancel=None,
    ):
        return self.core.compare_models(
            volumeNode,
            models,
            device=device,
            reference_node=referenceNode,
            reference_convention=referenceConvention,
            progress=progress,
            cancel=cancel,
        )


class AbdomenSegTest(ScriptedLoadableModuleTest):
    """Self-test inside Slicer: segment the synthetic phantom with the shipped default model."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_segment_phantom()

    def test_segment_phantom(self):
        from AbdomenSegLib.slicer.install import missing_packages

        missing = missing_packages()
        if missing:  # Slicer's generic tests run this without the extension's Python packages
            self.delayDisplay(
                f"Python packages {', '.join(missing)} are not installed: skipping the segmentation self-test"
            )
            return
        from AbdomenSegLib.core.errors import AbdomenSegError
        from AbdomenSegLib.models.packages import find_model

        try:
            find_model(None)
        except AbdomenSegError as exc:  # the packaged extension leaves the weights out (docs/slicer.md)
            self.delayDisplay(f"The default model is not installed ({exc}): skipping the segmentation self-test")
            return
        from AbdomenSegLib.io.phantom import make_phantom
        from AbdomenSegLib.slicer.logic import scalar_volume_node_from_image, segmentation_to_labels

        ct, _labels = make_phantom()
        volume = scalar_volume_node_from_image(slicer.mrmlScene, ct, "synthetic phantom CT")
        seg = AbdomenSegLogic().segment(volume, device="cpu")
        self.assertIsNotNone(seg)
        labels = segmentation_to_labels(slicer.mrmlScene, seg, volume)
        self.assertEqual(labels.GetSize(), ct.GetSize())
        self.assertEqual(labels.GetDirection(), ct.GetDirection())
        self.delayDisplay("AbdomenSeg self-test passed")
