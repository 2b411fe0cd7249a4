"""The panel's runs: one or several models on a volume, each in a background process, driven by a timer.

The widget calls `BackgroundRun.step()` from a QTimer on Slicer's main thread; `step` reads the child's
progress without blocking and, when a model has finished, imports its label map into MRML (which only
the main thread may touch). Nothing here imports Qt, so it is tested against slicer-core with real
child processes. Each run has its own cancel state: cancelling one never affects the next (the old
panel's cancel flag stayed set after a Cancel and made the next model comparison stop at once).

The panel's runs go to one long-lived engine process (`shared_worker()`, engine_worker.py) so that the second
Segment skips Python start-up and model loading; a run that finds it busy runs in a process of its own.
"""

from __future__ import annotations

from AbdomenSegLib.core.errors import AbdomenSegError
from AbdomenSegLib.models.choice import resolve
from AbdomenSegLib.slicer.background import SegmentationProcess
from AbdomenSegLib.slicer.engine_worker import EngineWorker

_SHARED_WORKER: EngineWorker | None = None


def shared_worker(temp_root=None) -> EngineWorker:
    """The session's engine worker (started at its first run, not here)."""
    global _SHARED_WORKER
    if _SHARED_WORKER is None:
        _SHARED_WORKER = EngineWorker(temp_root=temp_root)
    return _SHARED_WORKER


def stop_shared_worker() -> None:
    """End the session's engine worker and give its memory back (the module's cleanup; Slicer's exit closes its
    stdin, which ends it as well)."""
    global _SHARED_WORKER
    worker, _SHARED_WORKER = _SHARED_WORKER, None
    if worker is not None:
        worker.stop()


class BackgroundRun:
    def __init__(
        self,
        core,
        volume_node,
        models,
        *,
        device="auto",
        organs=None,
        segmentation_node=None,
        replace_existing=False,
        largest_component="model",
        fill_holes=False,
        tta=False,
        quality="standard",
        temp_root=None,
        process_factory=None,
        worker: EngineWorker | None = None,
    ):
        # Everything a run needs is checked before any process starts (no volume, no organ, existing
        # segments, a non-linear transform, a model choice the engine refuses: an ensemble of models that cannot
        # be averaged, mirroring for a model trained without), and the volume is captured where it lies now.
        self.core, self.volumeNode, self.models = core, volume_node, list(models)
        if not self.models:
            raise AbdomenSegError("no model is selected", "select at least one model")
        for model in self.models:  # each a name, a package folder or an ensemble `a+b`, as `--model` takes
            resolve(model, tta, quality=quality)  # a fine second stage that cannot run, too
        self.image = core.prepare(volume_node, organs, segmentation_node, replace_existing)
        self.options = dict(
            device=device,
            organs=organs,
            largest_component=largest_component,
            fill_holes=fill_holes,
            tta=tta,
            quality=quality,
        )
        self.segmentation_node, self.replace_existing = segmentation_node, replace_existing
        self.temp_root = temp_root  # Slicer's own temporary folder in the app
        # With a worker, each model is a request to it (unless another run holds it: then a process of its own).
        self.process_factory = process_factory or (
            lambda: SegmentationProcess(worker=worker if worker is not None and not worker.busy else None)
        )
        self.results: dict = {}  # card name -> segmentation node, in the order the models ran
        self.warnings: list = []  # the result check's, per model
        self.notes: list = []
        self.error: str | None = None
        self.cancelled = False
        self.progress = (0.0, "starting")
        self._index = -1
        self._process: SegmentationProcess | None = None

    @property
    def running(self) -> bool:
        return not (self.cancelled or self.error) and self._index < len(self.models)

    def step(self) -> bool:
        """Advance without blocking; True while the run goes on."""
        if not self.running:
            return False
        if self._process is None:
            self._start_next()
            return self.running
        process = self._process
        process.poll()
        label = self._label()
        self.progress = ((self._index + process.progress) / len(self.models), f"{label}{process.message}")
        if not process.finished:
            return True
        try:
            if not process.succeeded:
                self.error = f"{label}{process.error}"
                return False
            if not self._import(process):
                return False
        finally:
            process.cleanup()
            self._process = None
        self._index += 1
        if self._index < len(self.models):
            self._start_next()
        else:
            self.progress = (1.0, "done")
        return self.running

    def cancel(self) -> None:
        """Stop the child process (within about a second) and drop this run's pending work."""
        self.cancelled = True
        if self._process is not None:
            self._process.cancel()
            self._process = None
        self.progress = (self.progress[0], "cancelled")

    def _label(self) -> str:
        return f"{self.models[self._index]}: " if len(self.models) > 1 else ""

    def _start_next(self) -> None:
        if self._index < 0:
            self._index = 0
        self._process = self.process_factory()
        self._process.start(self.image, model=self.models[self._index], temp_root=self.temp_root, **self.options)
        self.progress = (self._index / len(self.models), f"{self._label()}starting")

    def _import(self, process) -> bool:
        labels = process.result()
        # Only a single-model run writes into the user's chosen segmentation; a comparison makes one per model.
        target = self.segmentation_node if len(self.models) == 1 else None
        try:
            node = self.core.import_result(
                self.volumeNode,
                labels,
                target,
                model=process.model or self.models[self._index],
                device=process.device or self.options["device"],
                organs=self.options["organs"],
                qc=process.qc,
            )
        except AbdomenSegError as exc:  # an empty result: a message, not a crash
            self.error = f"{self._label()}{exc}"
            return False
        except Exception as exc:  # a failed import ends the run: never start the same model again
            self.error = f"{self._label()}the result could not be imported ({type(exc).__name__}: {exc})"
            return False
        self.results[node.GetAttribute("AbdomenSeg.model")] = node
        from AbdomenSegLib.slicer.logic import qc_messages

        warnings, notes = qc_messages(process.qc)
        self.warnings += [f"{self._label()}{text}" for text in warnings]
        self.notes += [f"{self._label()}{text}" for text in notes]
        return True
