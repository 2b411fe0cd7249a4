"""The engine in one call per task, for scripts and notebooks (re-exported as `AbdomenSegLib.segment`, ...).

    import AbdomenSegLib as abdomenseg

    labels = abdomenseg.segment("CT.nii.gz", "organs.nii.gz")              # the default CT model
    rows = abdomenseg.evaluate("organs.nii.gz", "reference.nii.gz", reference_labels="btcv")
    summary = abdomenseg.compare(["btcv-ct-3d-unet"], "data/btcv", "out/", labels="btcv")
    names = [card.name for card in abdomenseg.list_models()]

Each function takes paths or SimpleITK images and checks its inputs before any long work, raising
`AbdomenSegError` (its text reads `<problem>. <fix>`, as the command line prints it). Outputs are in the input's
exact grid and written atomically; an existing output is only replaced with `overwrite=True`. Modules are imported
inside the functions, so `import AbdomenSegLib` stays light (no torch).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from AbdomenSegLib.core.options import (
    Device,
    InputIntensity,
    LargestComponent,
    LogCallback,
    Precision,
    ProgressCallback,
    Quality,
)

if TYPE_CHECKING:
    import SimpleITK as sitk

    from AbdomenSegLib.models.card import ModelCard


def _image(value: str | Path | sitk.Image, *, segmentation_ok: bool) -> sitk.Image:
    import SimpleITK as sitk

    from AbdomenSegLib.io.images import read_image

    return value if isinstance(value, sitk.Image) else read_image(value, segmentation_ok=segmentation_ok)


def segment(
    image: str | Path | sitk.Image,
    output: str | Path | None = None,
    *,
    model: str | Path | None = None,
    device: Device = "auto",
    quality: Quality = "standard",
    precision: Precision = "auto",
    organs: Sequence[str] | None = None,
    largest_component: LargestComponent = "model",
    fill_holes: bool = False,
    input_intensity: InputIntensity = "native",
    tta: bool = False,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
    log: LogCallback = print,
) -> sitk.Image:
    """Segment a CT or MR scan; returns the label map (uint8, our organ values, the input's grid) and writes it to
    `output` when given (`.nii.gz`, `.nrrd`, `.seg.nrrd` with names and colours, or `.dcm` DICOM SEG for a DICOM
    series folder). `model`: a catalog name or package folder (None: the default model). The options are those of
    `python -m AbdomenSegLib segment`.

    >>> labels = segment("CT.nii.gz", "organs.nii.gz", organs=["liver", "spleen"])  # doctest: +SKIP
    """
    from AbdomenSegLib.cohort.runner import model_identity
    from AbdomenSegLib.core.errors import AbdomenSegError
    from AbdomenSegLib.core.organs import BY_NAME
    from AbdomenSegLib.inference.predictor import get_segmenter
    from AbdomenSegLib.inference.segmenter import Options
    from AbdomenSegLib.io.files import prepare_output
    from AbdomenSegLib.io.images import check_output_can_hold, check_output_type, write_labels
    from AbdomenSegLib.models.packages import find_model

    card = find_model(None if model is None else str(model))
    unknown = [o for o in organs or [] if o not in BY_NAME or o not in card["labels"].values()]
    if unknown:
        raise AbdomenSegError(
            f"model '{card.name}' does not segment {', '.join(unknown)}",
            f"choose among {', '.join(card['labels'].values())}",
        )
    source = None if not isinstance(image, (str, Path)) else Path(image)
    if output is not None:
        check_output_type(output, [source] if source else None)
        if source is not None and Path(output).resolve() == source.resolve():
            raise AbdomenSegError(f"output '{output}' is the input", "choose another output name")
        prepare_output(output, overwrite=overwrite)
    scan = _image(image, segmentation_ok=False)
    if output is not None:
        check_output_can_hold(scan.GetDirection(), output)
    segmenter = get_segmenter(card, device, log=log, quality=quality)
    options = Options(
        input_intensity=input_intensity,
        organs=list(organs) if organs else None,
        largest_component=largest_component,
        fill_holes=fill_holes,
        precision=precision,
        tta=tta,
    )
    labels = segmenter.segment(scan, options, progress=progress)
    if output is not None:
        protect = [source] if source else []
        write_labels(
            labels, output, protect=protect, overwrite=overwrite, source=source, model=model_identity(segmenter)
        )
    return labels


def evaluate(
    prediction: str | Path | sitk.Image,
    reference: str | Path | sitk.Image,
    *,
    reference_labels: str = "abdomenseg",
    prediction_labels: str = "abdomenseg",
    organs: Sequence[str] | None = None,
    tolerance_mm: float = 2.0,
) -> list[dict]:
    """Per-organ Dice, IoU, HD95 and surface Dice of a label map against a reference (one dict per organ). The
    reference is mapped onto the prediction's grid when their grids differ; `reference_labels` names its numbering
    (`abdomenseg`, `btcv`, `totalseg`, ...: `python -m AbdomenSegLib evaluate --help` lists them).

    >>> rows = evaluate("organs.nii.gz", "label0001.nii.gz", reference_labels="btcv")  # doctest: +SKIP
    """
    from AbdomenSegLib.evaluation.metrics import evaluate as evaluate_maps

    return evaluate_maps(
        _image(prediction, segmentation_ok=True),
        _image(reference, segmentation_ok=True),
        reference_convention=reference_labels,
        prediction_convention=prediction_labels,
        organs=list(organs) if organs else None,
        tolerance_mm=tolerance_mm,
    )


def compare(
    models: Sequence[str],
    data: str | Path,
    out: str | Path,
    *,
    labels: str = "btcv",
    cases: Sequence[str] | None = None,
    cases_from: str | None = None,
    input_intensity: InputIntensity = "native",
    device: Device = "auto",
    tta: bool = False,
    overwrite: bool = False,
    log: LogCallback = print,
) -> list[dict]:
    """Segment a labelled dataset folder with each model and score it: writes metrics.csv, comparison.csv,
    comparison.md and dice_boxplot.png into `out`; returns the per-model, per-organ summary rows.

    >>> summary = compare(["btcv-ct-3d-unet", "btcv-ct-2d-unet-r18"], "btcv/", "cmp/", cases_from="btcv-ct-3d-unet")  # doctest: +SKIP
    """
    from AbdomenSegLib.evaluation.compare import run_comparison

    return run_comparison(
        list(models),
        Path(data),
        labels,
        Path(out),
        cases=list(cases) if cases else None,
        cases_from=cases_from,
        input_intensity=input_intensity,
        device=device,
        overwrite=overwrite,
        tta=tta,
        log=log,
    )


def list_models(models_dir: str | Path | None = None) -> list[ModelCard]:
    """The installed models' cards, in catalog order (the default first is not implied: see `default_model`)."""
    from AbdomenSegLib.models.packages import catalog

    return list(catalog(models_dir).values())


def default_model(models_dir: str | Path | None = None) -> ModelCard:
    """The card of the model `segment` uses when none is named."""
    from AbdomenSegLib.models.packages import find_model

    return find_model(None, models_dir)
