"""Renders Resources/Screenshots/AbdomenSeg-result.png (the extension's screenshot): the project's SYNTHETIC phantom
CT segmented by the default model, organ outlines in their colours. Drawn from the phantom so that no picture in
the repository comes from the development data (../shared/data is never redistributed). Not a benchmark; kept
here so the picture can be made again: `python bench/render_screenshot.py`."""

import matplotlib
import numpy as np
import SimpleITK as sitk

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from skimage import segmentation as skseg

from AbdomenSegLib.core.organs import BY_LABEL
from AbdomenSegLib.inference.predictor import get_segmenter
from AbdomenSegLib.io.phantom import make_phantom
from AbdomenSegLib.preprocessing.preprocess import reorient

ct, _ = make_phantom()
labels = get_segmenter(None, "cpu").segment(ct)
ct_l, lab_l = reorient(ct, "LPS"), reorient(labels, "LPS")
a, lab = sitk.GetArrayFromImage(ct_l).astype(float), sitk.GetArrayFromImage(lab_l)
sp = ct_l.GetSpacing()
win = np.clip((a + 160) / 400, 0, 1)


def overlay(img, lab):
    rgb = np.dstack([img] * 3)
    for v in np.unique(lab):
        if v == 0:
            continue
        edge = skseg.find_boundaries(lab == v, mode="inner")
        rgb[edge] = np.array(BY_LABEL[int(v)].color_float)
    return rgb


z = int(np.argmax([(lab[k] > 0).sum() for k in range(lab.shape[0])]))
y = int(np.argmax([(lab[:, k] > 0).sum() for k in range(lab.shape[1])]))
fig, ax = plt.subplots(1, 2, figsize=(10, 5.2), facecolor="black")
ax[0].imshow(overlay(win[z], lab[z]), aspect=sp[1] / sp[0])
ax[0].set_title("axial", color="w")
ax[1].imshow(overlay(win[:, y][::-1], lab[:, y][::-1]), aspect=sp[2] / sp[0])
ax[1].set_title("coronal", color="w")
present = [BY_LABEL[int(v)] for v in np.unique(lab) if v]
handles = [plt.Line2D([], [], color=o.color_float, lw=3, label=o.display_name) for o in present]
fig.legend(handles=handles, loc="lower center", ncol=5, facecolor="black", labelcolor="w", fontsize=8, frameon=False)
for x in ax:
    x.axis("off")
fig.suptitle(
    "AbdomenSeg default model (btcv-ct-3d-unet) on the SYNTHETIC phantom CT (not anatomy)", color="w", fontsize=10
)
plt.subplots_adjust(bottom=0.14, top=0.9, wspace=0.02)
fig.savefig("Resources/Screenshots/AbdomenSeg-result.png", dpi=90, facecolor="black")
