"""Checks on a finished result that catch answers which are likely wrong: nothing found, or organs that
sit where anatomy never puts them (the signature of a mirrored or flipped image header).

A flagged result is still written (the user may know better), but it is reported loudly and the command
line exits with status 3 instead of 0, so neither a person nor a script takes it as a clean answer.

Positions are compared in patient coordinates (ITK's LPS: +x towards the patient's left, +y posterior,
+z superior), computed from the label map and its geometry, so they hold for any voxel order or
direction matrix. The relations used hold in normal adult anatomy (situs solitus); each was checked on
the 24 BTCV reference label maps and TotalSegmentator's example CT (Testing/test_qc.py):
- liver on the patient's right of the spleen, right kidney on the right of the left kidney;
- liver centroid above the right kidney's, spleen's above the left kidney's;
- left kidney posterior of the stomach, right kidney posterior of the liver's centroid, aorta posterior of
  the pancreas.
Situs inversus (1 in ~10,000) reverses the left-right relations; the message says so.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .organs import BY_LABEL

MIN_ML = 5.0  # organs smaller than this (a few stray voxels) say nothing about position

# (a, b, axis, sign): organ a's centroid minus organ b's along the LPS axis must have this sign.
_LEFT_RIGHT = (("liver", "spleen", 0, -1), ("kidney_right", "kidney_left", 0, -1))
_SUPERIOR_INFERIOR = (("liver", "kidney_right", 2, +1), ("spleen", "kidney_left", 2, +1))
_ANTERIOR_POSTERIOR = (("kidney_left", "stomach", 1, +1), ("kidney_right", "liver", 1, +1),
                       ("aorta", "pancreas", 1, +1))
_AXES = {
    "left-right": (_LEFT_RIGHT, "the liver or right kidney lies on the patient's left of the spleen or left kidney"),
    "superior-inferior": (_SUPERIOR_INFERIOR, "the kidneys lie above the liver or spleen"),
    "anterior-posterior": (_ANTERIOR_POSTERIOR, "the kidneys or aorta lie in front of the stomach, liver or pancreas"),
}


@dataclass(frozen=True)
class Flag:
    code: str
    problem: str
    fix: str

    def __str__(self) -> str:
        return f"{self.problem}. {self.fix}"


def organ_volumes_and_centroids(labels: sitk.Image) -> tuple:
    """({organ: mL}, {organ: LPS centroid in mm}) for every organ present."""
    array = sitk.GetArrayViewFromImage(labels)
    counts = np.bincount(np.asarray(array).ravel(), minlength=256)
    voxel_ml = float(np.prod(labels.GetSpacing())) / 1000.0
    present = [v for v in np.flatnonzero(counts) if v in BY_LABEL]
    volumes = {BY_LABEL[v].name: float(counts[v]) * voxel_ml for v in present}
    if not present:
        return volumes, {}
    # Every other voxel is plenty for a centroid and 8x cheaper on a full-resolution CT.
    step = 2 if min(array.shape) >= 8 else 1
    sub = np.asarray(array[::step, ::step, ::step])
    with np.errstate(invalid="ignore", divide="ignore"):  # organs too small to survive the subsampling
        centres = ndimage.center_of_mass(np.ones_like(sub, dtype=np.uint8), sub, present)
    centroids = {}
    for value, (z, y, x) in zip(present, centres):
        if np.isfinite(z):
            centroids[BY_LABEL[value].name] = np.array(
                labels.TransformContinuousIndexToPhysicalPoint((x * step, y * step, z * step)))
    return volumes, centroids


def _liver_spleen_sizes(volumes: dict) -> list:
    """A network shown a left-right mirrored abdomen keeps the organs' usual sides but mixes up liver and
    spleen (TotalSegmentator's example CT, header mirrored: liver 1191 -> 367 mL, spleen 271 -> 643 mL),
    so their positions look normal and only their sizes give it away. The spleen is 5-27% of the liver's
    volume in the 24 BTCV references; only massive splenomegaly (btcv_img0009: 3.1 L against 2.2 L)
    makes it larger, which deserves a look as well."""
    liver, spleen = volumes.get("liver", 0.0), volumes.get("spleen", 0.0)
    if liver < MIN_ML or spleen < MIN_ML or spleen <= liver:
        return []
    return [Flag("spleen_larger_than_liver",
                 f"the spleen came out larger than the liver ({spleen:.0f} vs {liver:.0f} mL): either massive "
                 "splenomegaly, or liver and spleen are mixed up, as when the image header is mirrored left-right",
                 "look at the result: if the liver is on the image's left side or is labelled spleen, fix the "
                 "header's left-right direction and segment again")]


def check_result(labels: sitk.Image, organs=None) -> list:
    """Flags for a label map in our organ table; `organs`: the organ names that were asked for."""
    volumes, centroids = organ_volumes_and_centroids(labels)
    if not volumes:
        asked = ", ".join(organs) if organs else "any organ"
        return [Flag("empty", f"no organ was found ({asked})",
                     "check that the image covers the abdomen, that its spacing and intensities are right, and "
                     "that the model fits the modality")]
    usable = {name: c for name, c in centroids.items() if volumes.get(name, 0.0) >= MIN_ML}
    flags = _liver_spleen_sizes(volumes)
    for axis, (rules, what) in _AXES.items():
        verdicts = [np.sign(usable[a][dim] - usable[b][dim]) == sign
                    for a, b, dim, sign in rules if a in usable and b in usable]
        if verdicts and not any(verdicts):
            extra = " (or the patient has situs inversus)" if axis == "left-right" else ""
            flags.append(Flag(f"flipped_{axis}",
                              f"organs lie mirrored {axis}: {what}; the image header is probably flipped "
                              f"{axis}{extra}",
                              "check the image's orientation (direction matrix) against the scanner's, fix the "
                              "header, and segment again; do not use this result as it is"))
        elif verdicts and not all(verdicts):
            flags.append(Flag(f"inconsistent_{axis}",
                              f"organ positions disagree {axis} ({what}, for some organs but not others)",
                              "look at the result before using it: some organs are probably mislabelled"))
    return flags
