"""Which model a run uses, checked before any work: one name, several joined by '+' (an ensemble, ensemble_card.py),
with or without test-time mirroring (tta.py). The command line, the Slicer panel and its batch script resolve their
model option here, so they accept and refuse the same choices with the same `<problem>. <fix>` message.

The panel checks models in a list; `select(names)` says what the checked names make: the model argument (`a`, or
`a+b` as the command line's `--model a+b`), the error that refuses it, and whether the mirroring box may be ticked
(and if not, why). The parameter node stores that argument, so a saved scene holds what the command line would be
given, and a scene saved with one model name reads back unchanged. Nothing here touches Qt or MRML, and nothing
loads a network: cards are JSON.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from AbdomenSegLib.core.errors import AbdomenSegError
from AbdomenSegLib.models.card import ModelCard, StrPath
from AbdomenSegLib.models.mirroring import check_tta
from AbdomenSegLib.models.packages import default_model_name, find_model

if TYPE_CHECKING:
    import SimpleITK as sitk

TTA_TIP = (
    "Average the result over mirror images of the scan along the axes the model was trained to mirror "
    "(2^k passes: that much slower)"
)


QUALITY_TIP = (
    "high: after the model, its fine second-stage model re-segments the box around the small organs (pancreas, "
    "adrenals, gallbladder, esophagus, portal/splenic vein) at a finer spacing and relabels those its card takes "
    "(the shipped one: adrenals, gallbladder, esophagus); about 3-5x slower"
)


def resolve(
    model: ModelCard | StrPath | None = None,
    tta: bool = False,
    models_dir: StrPath | None = None,
    quality: str = "standard",
) -> ModelCard:
    """The card `model` names (a name, a package folder, `a+b`, a card already read; None: the default), refused
    where the engine would refuse it: an ensemble of models that cannot be averaged, a fine second stage that
    cannot run (`quality` "high", or a second-stage card named directly), or mirroring (`tta`) for a model, or
    either stage, trained without."""
    from AbdomenSegLib.models.cascade_card import cascade_stages

    card = model if isinstance(model, ModelCard) else find_model(model, models_dir)
    stages = cascade_stages(card, quality, models_dir)
    if tta:
        for stage in stages or (card,):
            check_tta(stage)
    return card


MODALITY_TAG = "0008|0060"  # DICOM Modality, kept on images read from a DICOM series (io/images.py)


def looks_like_mr(image: sitk.Image) -> bool:
    """An image that fails the CT-in-HU check the way an MR scan does: nothing near air's -1000 HU (the lowest
    value above -200), not an 8-bit windowed CT (BTCV's 0-255 files), and not unrescaled CT (0..4095, where soft
    tissue piles up at 1024 + 0..100: at least 15% of the voxels in 974-1124). TotalSegmentator's example MR
    (-47..833) and the CHAOS T2 scans (0..~1000) pass; its example CT (-1207..3382) and BTCV (0..255) do not."""
    import numpy as np
    import SimpleITK as sitk

    array = sitk.GetArrayViewFromImage(image)
    if array.size == 0:
        return False
    low, high = float(array.min()), float(array.max())
    if low <= -200 or high <= 255:
        return False
    sample = np.asarray(array[::4, ::4, ::4], dtype=np.float64)
    unrescaled_ct = np.count_nonzero((sample >= 974) & (sample <= 1124)) / max(sample.size, 1)
    return bool(unrescaled_ct < 0.15)


def _modality_tag(image: sitk.Image) -> str:
    """The DICOM Modality a series read by io/images.py kept, or ""."""
    # SimpleITK's methods carry no annotations (SWIG): typed here, once.
    has = image.HasMetaDataKey(MODALITY_TAG)  # type: ignore[no-untyped-call]
    return str(image.GetMetaData(MODALITY_TAG)) if has else ""  # type: ignore[no-untyped-call]


def image_modality(image: sitk.Image, dicom_modality: str = "") -> str:
    """ "MR", "CT" or "" (unknown) for a scan: its DICOM Modality where known (`dicom_modality`, or the tag kept
    on a series read by io/images.py), else "MR" when its values look like MR (looks_like_mr)."""
    tag = dicom_modality or _modality_tag(image)
    tag = tag.strip().upper()
    if tag in ("MR", "CT"):
        return tag
    return "MR" if looks_like_mr(image) else ""


def model_for_image(image: sitk.Image, dicom_modality: str = "", models_dir: StrPath | None = None) -> tuple[str, str]:
    """(model name, line to show) when no model is named: an MR scan gets the catalog's recommended MR model
    (said on one line); anything else the default model, with no line."""
    from AbdomenSegLib.models.packages import recommended_model

    modality = image_modality(image, dicom_modality)
    if modality == "MR":
        name = recommended_model("MR", models_dir)
        if name and name != default_model_name(models_dir):
            why = "DICOM Modality MR" if (dicom_modality or _modality_tag(image)) else "MR-like values"
            return name, f"the scan is MR ({why}): using the recommended MR model {name} (--model names another)"
    return default_model_name(models_dir), ""


def argument(names: Iterable[str]) -> str:
    """The model argument of the checked names: the name itself, or `a+b` (an ensemble); "" for none."""
    return "+".join(names)


def _parts(model: str | None) -> list[str]:
    """The names a stored model argument holds (argument's inverse): `a+b` -> [a, b]; "" or None -> []."""
    return [part.strip() for part in (model or "").split("+") if part.strip()]


def names_in(model: str, installed: Iterable[str]) -> list[str]:
    """The names of `installed` (in its order) that a stored model argument checks; names no longer installed
    are left out."""
    parts = set(_parts(model))
    return [name for name in installed if name in parts]


def missing_note(model: str, installed: Collection[str], checked: Iterable[str]) -> str:
    """The panel's line when a stored model argument (a saved scene's) names models not installed here, so that
    the list's other check (`checked`) is never silent; "" when all are installed."""
    missing = [part for part in _parts(model) if part not in installed]
    if not missing:
        return ""
    now = f"{argument(checked)} is checked instead" if checked else "check a model"
    return f"The scene's model {', '.join(repr(m) for m in missing)} is not installed here: {now}."


def default_names(cards: Collection[str]) -> list[str]:
    """What the list checks first: the catalog's default model, or the first working one of `cards` when the
    default is broken or the catalog names none."""
    if not cards:
        return []
    try:
        default = default_model_name()
    except (AbdomenSegError, KeyError):  # no usable catalog default must not keep the panel from opening
        default = None
    return [default if default is not None and default in cards else next(iter(cards))]


def label(card: ModelCard) -> str:
    """A model's line in the panel's list: name, modality, 2D/3D or ensemble, expected CPU time."""
    kind = "ensemble" if card.members else f"{card['dimensions']}D"
    seconds = card.get("timing", {}).get("cpu_seconds")
    cpu = "CPU time not measured" if seconds is None else f"CPU ~{seconds} s"
    return f"{card.name} ({card['modality']}, {kind}, {cpu})"


@dataclass(frozen=True)
class Selection:
    names: tuple[str, ...]  # the checked models, in list order
    model: str  # the engine's model argument (argument(names))
    card: ModelCard | None  # what runs; None when nothing is checked or the choice is refused
    error: str  # "error: <problem>. <fix>", the command line's line for the same --model; "" when it can run
    tta_allowed: bool  # every model in the choice was trained with mirroring
    tta_tip: str  # the mirroring box's tooltip: what it does, or why it is off
    high_allowed: bool = False  # a fine second stage is installed for the choice (quality "high" can run)
    high_tip: str = "Check a model first"  # the Quality choice's tooltip: what high does, or why it is off


def select(names: Iterable[str], models_dir: StrPath | None = None) -> Selection:
    """What the checked `names` make (see Selection); never raises for a choice the user can fix."""
    names = tuple(names)
    model = argument(names)
    if not names:
        return Selection(names, model, None, "", False, "Check a model first")
    try:
        card = resolve(model, models_dir=models_dir)
    except AbdomenSegError as exc:
        return Selection(names, model, None, f"error: {exc}", False, f"Unavailable: {exc.problem}")
    from AbdomenSegLib.models.cascade_card import cascade_stages

    try:
        cascade_stages(card, "high", models_dir)
        high = (True, QUALITY_TIP)
    except AbdomenSegError as exc:
        high = (False, f"high unavailable: {exc.problem}")
    try:
        check_tta(card)
    except AbdomenSegError as exc:
        return Selection(names, model, card, "", False, f"Unavailable: {exc.problem}", *high)
    return Selection(names, model, card, "", True, TTA_TIP, *high)
