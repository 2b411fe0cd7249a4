"""The region a second-stage model works in (cascade.py): the box around some organs of a label map, plus a
margin in mm, as an index box of that map's grid, and the crop of an image to it.

A region is {"organs": [names], "margin_mm": [x, y, z]}: the margin along the world axis (LPS x, y, z) each
image axis is closest to, so a rotated or reordered image gets the same millimetres. The crop is SimpleITK's
RegionOfInterest: the same voxels, spacing and direction, its origin moved to the box's first voxel, so a result
on the crop lies exactly on the input's grid. Training caches (datasets.py) and the validation of a second-stage
model (training/export.py) crop around the reference labels the way inference crops around the first stage's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from AbdomenSegLib.core.organs import BY_NAME


@dataclass(frozen=True)
class Box:
    """An index box of an image grid, (x, y, z) like SimpleITK's index and size."""

    index: tuple
    size: tuple

    @property
    def slices(self) -> tuple:
        """The box as (z, y, x) slices of the image's numpy array."""
        return tuple(slice(i, i + n) for i, n in zip(self.index[::-1], self.size[::-1]))


def organ_values(organs) -> list:
    """Our label values of the organ names."""
    return [BY_NAME[name].label for name in organs]


def region_box(labels: sitk.Image, organs, margin_mm) -> Box | None:
    """The index box of `labels`' voxels labelled one of `organs`, widened by `margin_mm` (x, y, z world mm, each
    rounded up to whole voxels) and clipped to the image; None when none of the organs is there."""
    from AbdomenSegLib.preprocessing.pipeline import per_image_axis

    mask = np.isin(sitk.GetArrayViewFromImage(labels), organ_values(organs)).astype(np.uint8)
    if not mask.any():
        return None
    binary = sitk.GetImageFromArray(mask)
    binary.CopyInformation(labels)
    shape = sitk.LabelShapeStatisticsImageFilter()
    shape.Execute(binary)
    bounds = shape.GetBoundingBox(1)  # x, y, z index, then x, y, z size
    start, size = bounds[:3], bounds[3:]
    margin = per_image_axis(labels, margin_mm)  # mm along each image axis
    low, high = [], []
    for axis, extent in enumerate(labels.GetSize()):
        voxels = math.ceil(margin[axis] / labels.GetSpacing()[axis] - 1e-6)
        low.append(max(0, start[axis] - voxels))
        high.append(min(extent, start[axis] + size[axis] + voxels))
    return Box(tuple(low), tuple(h - lo for lo, h in zip(low, high)))


def crop(image: sitk.Image, box: Box) -> sitk.Image:
    """The box of `image`, its geometry exact (RegionOfInterest)."""
    return sitk.RegionOfInterest(image, [int(n) for n in box.size], [int(i) for i in box.index])


def reference_crop(image: sitk.Image, label: sitk.Image, convention: str, region: dict) -> tuple:
    """(image, organ labels, "abdomenseg": their convention, our table) of a dataset case cut to the region around
    its reference labels, both in the image's grid; the whole case when none of the region's organs is labelled."""
    from AbdomenSegLib.core.organs import convert_labels
    from AbdomenSegLib.io.images import _same_geometry
    from AbdomenSegLib.preprocessing.preprocess import resample_to_reference

    organs = sitk.GetImageFromArray(convert_labels(sitk.GetArrayFromImage(label), convention))
    organs.CopyInformation(label)
    if not _same_geometry(organs, image):
        organs = resample_to_reference(organs, image, is_label=True)
    box = region_box(organs, region["organs"], region["margin_mm"])
    if box is None:
        return image, organs, "abdomenseg"
    return crop(image, box), crop(organs, box), "abdomenseg"
