"""Renders the project's pictures of a real result, from the sample scan that ships with it
(Resources/Samples/example_ct.nii.gz, TotalSegmentator's example CT, Apache-2.0) segmented by the default model:

- Resources/Screenshots/AbdomenSeg-result.png, the extension's screenshot: axial view at the kidneys and pancreas
  and a coronal view, organ outlines in their colours, with the legend;
- docs/images/example_ct_result.png, the README's picture: the engine's own result sheet (qc/sheet.py), as
  `segment --qc-png` writes it.

Both are drawn by the engine (matplotlib), not captured from 3D Slicer's window (no display here). Not a benchmark;
kept so the pictures can be made again: `python bench/render_screenshot.py` (one thread, about 15 s).
"""

from pathlib import Path

import matplotlib
import numpy as np
import SimpleITK as sitk
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from skimage import segmentation as skseg  # noqa: E402

from AbdomenSegLib.core.organs import BY_LABEL  # noqa: E402
from AbdomenSegLib.inference.predictor import get_segmenter  # noqa: E402
from AbdomenSegLib.inference.segmenter import Options  # noqa: E402
from AbdomenSegLib.models.packages import SAMPLE_CT  # noqa: E402
from AbdomenSegLib.qc.outputs import assess_result  # noqa: E402
from AbdomenSegLib.qc.sheet import _centre_slices, _lps_views, render_case_sheet  # noqa: E402
from AbdomenSegLib.qc.statistics import intensity_unit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)
ct = sitk.ReadImage(str(SAMPLE_CT))
segmenter = get_segmenter(None, "cpu")
options = Options()
labels = segmenter.segment(ct, options)
report = assess_result(segmenter, labels, options, ct)

# The README picture: the engine's result sheet.
sheet = ROOT / "docs" / "images" / "example_ct_result.png"
sheet.parent.mkdir(parents=True, exist_ok=True)
data = report.as_dict(case="example_ct", model=segmenter.card.name, modality="CT", intensity_unit=intensity_unit("CT"))
render_case_sheet(ct, labels, data, sheet, title=f"example_ct ({segmenter.card.name})")

# The extension's screenshot: the same slices as the sheet (axial through kidneys and pancreas).
a, lab, sp, _, _keep = _lps_views(ct, labels)
a = a.astype(float)
(z, y, _), _ = _centre_slices(lab)
win = np.clip((a + 160) / 400, 0, 1)


def overlay(img, lab):
    rgb = np.dstack([img] * 3)
    for v in np.unique(lab):
        if v == 0:
            continue
        edge = skseg.find_boundaries(lab == v, mode="inner")
        rgb[edge] = np.array(BY_LABEL[int(v)].color_float)
    return rgb


fig, ax = plt.subplots(1, 2, figsize=(10, 5.2), facecolor="black")
ax[0].imshow(overlay(win[z], lab[z]), aspect=sp[1] / sp[0])
ax[0].set_title(f"axial {z + 1}/{lab.shape[0]}: kidneys and pancreas", color="w")
ax[1].imshow(overlay(win[::-1, y], lab[::-1, y]), aspect=sp[2] / sp[0])
ax[1].set_title(f"coronal {y + 1}/{lab.shape[1]}", color="w")
present = [BY_LABEL[int(v)] for v in np.unique(lab) if v and report.organs[BY_LABEL[int(v)].name].volume_ml >= 0.5]
handles = [plt.Line2D([], [], color=o.color_float, lw=3, label=o.display_name) for o in present]
fig.legend(handles=handles, loc="lower center", ncol=5, facecolor="black", labelcolor="w", fontsize=8, frameon=False)
for x in ax:
    x.axis("off")
fig.suptitle(
    "AbdomenSeg default model (btcv-ct-3d-unet) on TotalSegmentator's example CT (the shipped sample, Apache-2.0)",
    color="w",
    fontsize=10,
)
plt.subplots_adjust(bottom=0.14, top=0.9, wspace=0.02)
fig.savefig(ROOT / "Resources" / "Screenshots" / "AbdomenSeg-result.png", dpi=90, facecolor="black")
print(f"wrote {sheet} and Resources/Screenshots/AbdomenSeg-result.png")
