"""Renders experiments/figures/synth_samples.png: synthetic training images (synth.py) beside real MR.

Row 1: real images - a CHAOS T2-SPIR slice (the sequence the shipped MR model knows), the TotalSegmentator
example MR (another sequence, where that model scores 0), and the tissue label maps the synthesis starts from
(tissue_labels.py: BTCV CT-derived and CHAOS MR-derived). Rows 2-3: synthetic images from those two label maps,
one axial slice each, different seeds. Synthesis runs on a 3D slab around the slice at the case's own spacing
(the thick-slice simulation needs the third axis). All panels in LPS orientation shown radiologically
(anterior up, patient's left on the right).

Needs ../shared/data. BTCV's terms forbid redistributing its data, and a tissue map or a synthetic image made
from a BTCV case is derived from it: the committed figure shows only CHAOS (CC BY-SA 4.0) and TotalSegmentator
(Apache-2.0) data, with a second row of CHAOS samples where the BTCV ones would be. --with-btcv adds the BTCV
tissue map and its synthetic samples, --with-btcv-ct the CT itself (for looking at here, not for committing).
Run: .venv/bin/python experiments/render_synth_samples.py [--with-btcv] [--with-btcv-ct]
"""

import sys
from pathlib import Path

import matplotlib
import numpy as np
import SimpleITK as sitk

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
from AbdomenSegLib.preprocessing.preprocess import body_mask, mr_normalize, reorient  # noqa: E402
from AbdomenSegLib.training import tissue_labels as tl  # noqa: E402
from AbdomenSegLib.training.synth import synthesize  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
OUT = ROOT / "experiments" / "figures" / "synth_samples.png"
BTCV_DIRECTION = (1, 0, 0, 0, -1, 0, 0, 0, 1)


def load(folder, name, direction=None):
    image = sitk.ReadImage(str(DATA / folder / "images" / name))
    label = sitk.ReadImage(str(DATA / folder / "labels" / name))
    if direction is not None:
        for im in (image, label):
            im.SetDirection([float(v) for v in direction])
    image, label = reorient(image), reorient(label)
    return sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(label), image.GetSpacing()[::-1]


def normalised_mr(array):
    body = body_mask(array.astype(np.float32), np.percentile(array, 99) * 0.05)
    return mr_normalize(array, (0.5, 99.5), body)


def tissue_cmap():
    colours = np.zeros((tl.LAST_TISSUE + 1, 3))
    colours[1 : tl.FIRST_TISSUE] = (0.85, 0.35, 0.3)  # organs
    for value, rgb in {
        tl.AIR_OUTSIDE: (0, 0, 0),
        tl.AIR_INSIDE: (0.25, 0.25, 0.85),
        tl.FAT: (1, 0.95, 0.4),
        tl.FLUID: (0.35, 0.8, 1),
        tl.SOFT_TISSUE: (0.6, 0.4, 0.4),
        tl.BONE: (1, 1, 1),
        tl.BOWEL_CONTRAST: (0.2, 0.9, 0.2),
        tl.MR_DARK: (0.3, 0.3, 0.3),
        tl.MR_MID: (0.55, 0.5, 0.6),
        tl.MR_BRIGHT: (0.85, 0.85, 0.95),
    }.items():
        colours[value] = rgb
    return ListedColormap(colours)


def show(ax, array, spacing, title, **kw):
    ax.imshow(array, cmap=kw.pop("cmap", "gray"), aspect=spacing[1] / spacing[2], interpolation="nearest", **kw)
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def main():
    with_ct = "--with-btcv-ct" in sys.argv
    with_btcv = with_ct or "--with-btcv" in sys.argv
    ct, ct_lab, ct_sp = load("btcv_ct", "btcv_img0001.nii.gz", BTCV_DIRECTION)
    ct_tissue = tl.ct_tissue_labels(ct, ct_lab, ct_sp)
    mr, mr_lab, mr_sp = load("chaos_mr_t2", "chaosT2_05.nii.gz")
    mr_tissue = tl.mr_tissue_labels(mr, mr_lab, mr_sp)
    ts = reorient(sitk.ReadImage(str(DATA / "totalseg_example" / "example_mr_sm.nii.gz")))
    ts_array, ts_sp = sitk.GetArrayFromImage(ts), ts.GetSpacing()[::-1]

    zc = int(np.argwhere(ct_lab == 1)[:, 0].mean())  # BTCV 1 = spleen: a slice with liver, spleen, kidneys
    zm = int(np.argwhere(mr_lab == 4)[:, 0].mean())  # CHAOS 4 = spleen
    ct_slab = ct_tissue[zc - 8 : zc + 8]
    mr_slab = mr_tissue[max(0, zm - 4) : zm + 4]
    mr_z = zm - max(0, zm - 4)

    seeds = [1, 2, 3, 4]
    real = [
        (normalised_mr(mr)[zm], mr_sp, "real CHAOS T2-SPIR (CC BY-SA 4.0)"),
        (normalised_mr(ts_array)[ts_array.shape[0] // 2], ts_sp, "real TotalSegmentator example MR"),
    ]
    if with_ct:
        real.append((ct[zc] / 255.0, ct_sp, "real BTCV CT (window -125..275 HU)"))
    columns = max(len(seeds), len(real) + 2)
    fig, axes = plt.subplots(3, columns, figsize=(3.1 * columns, 9.6))
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (image, sp, title) in zip(axes[0], real):
        show(ax, image, sp, title)
    cmap = tissue_cmap()
    if with_btcv:
        show(
            axes[0, len(real)],
            ct_tissue[zc],
            ct_sp,
            "tissue map from BTCV CT + labels",
            cmap=cmap,
            vmin=-0.5,
            vmax=tl.LAST_TISSUE + 0.5,
        )
    show(
        axes[0, len(real) + int(with_btcv)],
        mr_tissue[zm],
        mr_sp,
        "tissue map from CHAOS MR + labels",
        cmap=cmap,
        vmin=-0.5,
        vmax=tl.LAST_TISSUE + 0.5,
    )
    for ax, seed in zip(axes[1], seeds):
        if with_btcv:
            image, info = synthesize(ct_slab, ct_sp, np.random.default_rng(seed), return_info=True)
            show(ax, image[8], ct_sp, f"synthetic from BTCV map, seed {seed}\n(gamma {info['gamma']:.2f})")
        else:
            image, info = synthesize(mr_slab, mr_sp, np.random.default_rng(seed + 10), return_info=True)
            show(ax, image[mr_z], mr_sp, f"synthetic from CHAOS map, seed {seed + 10}\n(gamma {info['gamma']:.2f})")
    for ax, seed in zip(axes[2], seeds):
        image, info = synthesize(mr_slab, mr_sp, np.random.default_rng(seed), return_info=True)
        show(ax, image[mr_z], mr_sp, f"synthetic from CHAOS map, seed {seed}\n(gamma {info['gamma']:.2f})")
    fig.suptitle(
        "Contrast-agnostic training: every synthetic sample draws new per-tissue intensities, blur, "
        "thick slices, bias field, noise and gamma (AbdomenSegLib/synth.py)",
        fontsize=10,
    )
    fig.tight_layout()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT, dpi=80)
    print(OUT)


if __name__ == "__main__":
    main()
