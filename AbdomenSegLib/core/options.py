"""The option values shared by the command line, the Slicer panel and the engine, and the callback types.

One definition each: cli.py builds its choices from these, the Slicer module's parameter node its Choice lists,
the engine's Options its annotations. Standard library only, so that the Slicer module can import it when
Slicer starts without loading the engine's dependencies (Testing/test_slicer_packaging.py checks that).
"""

from __future__ import annotations

from typing import Callable, Literal, get_args

Device = Literal["auto", "cpu", "cuda"]
"""Where the network runs: auto = CUDA when available, else the CPU."""
Precision = Literal["auto", "fp32", "bf16"]
"""CPU arithmetic: auto = bf16 where the CPU has native bf16 and the model's card records a bf16 validation."""
InputIntensity = Literal["native", "btcv_uint8"]
"""How input values are stored: native (HU / MR signal), or BTCV's 0-255 window."""
LargestComponent = Literal["model", "all", "none"]
"""Keep only the largest piece of: the organs the card names (anatomically single), every organ, or none."""
OutputFormat = Literal[".nii.gz", ".nrrd", ".seg.nrrd", ".dcm"]
"""Output type of folder runs (.dcm: a DICOM SEG, for DICOM series inputs)."""
Quality = Literal["standard", "high"]
"""standard: the model alone; high: a fine second-stage model re-segments the small organs' region (cascade.py)."""
LabelConvention = Literal["abdomenseg", "btcv", "chaos", "totalseg", "totalseg_mr"]
"""Label numbering of a reference or prediction label map (organs.CONVENTIONS)."""

DEVICES: tuple[str, ...] = get_args(Device)
PRECISIONS: tuple[str, ...] = get_args(Precision)
INPUT_INTENSITIES: tuple[str, ...] = get_args(InputIntensity)
LARGEST_COMPONENT: tuple[str, ...] = get_args(LargestComponent)
OUTPUT_FORMATS: tuple[str, ...] = get_args(OutputFormat)
LABEL_CONVENTIONS: tuple[str, ...] = get_args(LabelConvention)
QUALITIES: tuple[str, ...] = get_args(Quality)

FROM_COLOR_NAMES = "colour table names"
"""The Slicer panel's default reference convention: organs named by the reference's colour table / segments."""
REFERENCE_CONVENTIONS: tuple[str, ...] = (FROM_COLOR_NAMES, *LABEL_CONVENTIONS)

ProgressCallback = Callable[[float, str], None]
"""progress(fraction, message): fraction of the whole job done (0..1, never decreasing), what runs now."""
CancelCallback = Callable[[], bool]
"""cancel() -> True when the user asked to stop; long work checks it between steps and raises errors.Cancelled."""
LogCallback = Callable[[str], None]
"""log(message): one line for the user (stderr on the command line, the Python console in Slicer)."""
