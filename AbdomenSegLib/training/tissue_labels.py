"""Whole-image tissue label maps for contrast-agnostic (SynthSeg-style) training.

`synth.py` paints a training image from a label map, drawing a random intensity distribution for every
class. The organ labels alone would leave most of the image as one "background" class, so the network would
learn "organ = whatever differs from one flat background" instead of shape and context. These functions
split the unlabelled region of a BTCV CT or CHAOS MR case into a few tissue classes from its own intensities.
Organ voxels keep their label (our `abdomenseg` numbering, organs.py); the extra classes take values from
`FIRST_TISSUE` up, above every organ label, and must be mapped to background in the training target
(`synth.to_target`).

BTCV CT (uint8 = HU window [-125, 275] scaled to 0..255: HU = v * 400 / 255 - 125, v = (HU + 125) * 255 / 400;
0 and 255 are saturated). The image is first smoothed (Gaussian, sigma 1 mm in-plane, 1.5 mm across slices)
so the ~10-20 HU quantum noise does not turn every boundary into salt-and-pepper; the thresholds below act on
the smoothed values:

  AIR_OUTSIDE    v < 2 (HU < -122) connected to the outside of the body: the body is the largest connected
                 non-air region with its holes filled slice by slice. The CT table and anything else outside
                 the body go here too (they are invisible on MR, where they carry no signal).
  AIR_INSIDE     v < 2 inside the body: lung bases and bowel gas. Fat darker than -122 HU (rare after
                 smoothing; fat is about -120..-80 HU) falls in here too: approximate.
  FAT            2 <= v < 61 (HU -122 .. -30): -30 HU is the usual upper bound of adipose tissue; the lower
                 bound is set by the window's saturation at -125 HU, not by anatomy.
  FLUID          61 <= v < 96 (HU -30 .. +25): water density - bowel content and fluid, urine (the bladder is
                 not labelled in BTCV), ascites, and partial volume between fat and soft tissue. Bowel content
                 is not separable from the bowel wall or other unlabelled tissue at 3 mm by intensity alone, so
                 this class is "water-like", not "bowel content"; unenhanced muscle starts at ~40 HU.
  SOFT_TISSUE    96 <= v < 208 (HU +25 .. +201): muscle, bowel wall, unlabelled vessels and organs (colon,
                 small bowel, lymph nodes, uterus/prostate), enhanced in the portal-venous phase.
  BONE           v >= 208 (HU > 201) outside the labelled organs (dilated by one voxel, so the rim of an
                 enhanced aorta or kidney does not count), after an in-plane opening (3x3 cross) that removes
                 thin contrast-filled vessels; then, slice by slice (in 3D the spine, ribs, pelvis and a loop
                 touching a rib merge), each connected part of >= 0.2 mL is bone if >= 30 % of it lies in the
                 spine zone (more than 10 mm behind the aorta's centre in that slice, within 50 mm of it
                 left-right; 80 mm wide where the slice has no aorta: sacrum, iliac bones) or if >= 50 % of it
                 lies within 25 mm of the body surface and it is at most 8 cm2 in the slice (ribs, sternum, iliac
                 crest). Marrow below 200 HU enclosed by that cortex in the slice (holes up to 25 cm2: a vertebral
                 body) is bone too. Posterior is the side of the aorta away from the labelled organs' centre.
                 Approximate: deep bowel loops with oral contrast right beside the spine can count as bone, and
                 osteopenic bone without a closed cortex as SOFT_TISSUE.
  BOWEL_CONTRAST the other bright parts (>= 0.2 mL, v >= 208): positive oral contrast in stomach/bowel loops,
                 which BTCV shows often (a stomach's 95th percentile is at the window top). Parts too thin for
                 the opening or smaller than 0.2 mL (small vessels, calcifications) join SOFT_TISSUE.

CHAOS MR T2-SPIR (signal without absolute scale): AIR_OUTSIDE is everything outside the body, the body being
the largest component above 5 % of the volume's 99th percentile (as the MR inference pipeline's body mask,
pipeline.to_model_space) with holes filled slice by slice. The body's unlabelled voxels, smoothed like the CT,
are split by a 1D k-means into three pseudo-tissues MR_DARK / MR_MID / MR_BRIGHT (in order of mean signal;
k-means on log signal, started at the terciles). On fat-suppressed T2 that roughly is: dark = suppressed fat,
air in lung and bowel, cortical bone, muscle; mid = muscle, bowel wall, marrow; bright = fluid (bowel content,
CSF, gallbladder, bladder, cysts) and vessels with slow flow. They are clusters of intensity, not anatomy: all
synthesis needs is that each class be a region of one appearance in this image.

Arrays are (z, y, x); `spacing` is (z, y, x) in mm, like augment.py. The orientation does not matter (the spine
zone is found from the aorta and the body's centre, not from the axis direction).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from AbdomenSegLib.core.organs import MAX_LABEL, convert_labels

# Extra tissue classes, above every organ label of organs.py (MAX_LABEL) with room for new organs.
FIRST_TISSUE = 20
AIR_OUTSIDE = 20
AIR_INSIDE = 21
FAT = 22
FLUID = 23
SOFT_TISSUE = 24
BONE = 25
BOWEL_CONTRAST = 26
MR_DARK = 27
MR_MID = 28
MR_BRIGHT = 29
PERIRENAL_FAT = 30
RENAL_FASCIA = 31
LAST_TISSUE = 31
TISSUE_NAMES = {
    AIR_OUTSIDE: "air_outside",
    AIR_INSIDE: "air_inside",
    FAT: "fat",
    FLUID: "fluid",
    SOFT_TISSUE: "soft_tissue",
    BONE: "bone",
    BOWEL_CONTRAST: "bowel_contrast",
    MR_DARK: "mr_dark",
    MR_MID: "mr_mid",
    MR_BRIGHT: "mr_bright",
    PERIRENAL_FAT: "perirenal_fat",
    RENAL_FASCIA: "renal_fascia",
}
# Classes that are (almost) no signal on any MR sequence: synth.py keeps them dark.
DARK_CLASSES = (AIR_OUTSIDE, AIR_INSIDE)
assert FIRST_TISSUE > MAX_LABEL

# BTCV uint8 thresholds (on the smoothed image) and the HU they stand for; see the module docstring.
CT_AIR_BELOW = 2  # HU -121.9
CT_FAT_BELOW = 61  # HU -29.3
CT_FLUID_BELOW = 96  # HU +25.6
CT_BRIGHT_FROM = 208  # HU +201.3
BRIGHT_MIN_ML = 0.2
SURFACE_MM = 25.0
SPINE_HALF_WIDTH_MM = 50.0
PELVIS_HALF_WIDTH_MM = 80.0  # where no slice of the aorta is: sacrum and iliac bones
SPINE_BEHIND_MM = 10.0  # the zone starts this far behind the aorta's centre (its radius: loops beside it stay out)
RIB_MAX_CM2 = 8.0  # a superficial bright part larger than this in a slice is a bowel loop, not a rib
MARROW_MAX_CM2 = 25.0  # holes of the bone mask up to this area (a vertebral body: ~10-15 cm2) are marrow
AORTA = 8  # abdomenseg label of the aorta
KIDNEYS = (3, 4)  # abdomenseg labels of the kidneys
PERIRENAL_MM = 15.0  # how far from the kidney fat counts as perirenal (the fat of the renal fascia's cone)
SINUS_CLOSING = 3  # in-plane closing iterations (7.5 mm at 2.5 mm) that shut the hilum: the renal sinus inside


def uint8_to_hu(v):
    """HU of a BTCV uint8 value (window [-125, 275])."""
    return np.asarray(v, dtype=np.float64) * 400.0 / 255.0 - 125.0


def hu_to_uint8(hu):
    return (np.asarray(hu, dtype=np.float64) + 125.0) * 255.0 / 400.0


def _smooth(image: np.ndarray, spacing, sigma_mm=(1.5, 1.0, 1.0)) -> np.ndarray:
    sigma = [s / float(sp) for s, sp in zip(sigma_mm, spacing)]
    return ndimage.gaussian_filter(image.astype(np.float32), sigma, truncate=2.5)


def _fill_holes_by_slice(mask: np.ndarray) -> np.ndarray:
    out = np.empty_like(mask)
    for z in range(mask.shape[0]):
        out[z] = ndimage.binary_fill_holes(mask[z])
    return out


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == sizes.argmax()


def ct_tissue_labels(image: np.ndarray, organs: np.ndarray, spacing, convention: str = "btcv") -> np.ndarray:
    """Tissue label map (uint8) of a windowed BTCV-style CT: organs in abdomenseg numbering, the rest in the
    tissue classes above. `image` is the uint8 window [-125, 275] HU (0..255); `organs` the reference label map
    in `convention` numbering; `spacing` (z, y, x) mm."""
    if image.shape != organs.shape:
        raise ValueError(f"image {image.shape} and labels {organs.shape} differ in shape")
    spacing = np.asarray(spacing, dtype=np.float64)
    organ = convert_labels(organs, convention)
    labelled = organ > 0
    v = _smooth(image, spacing)

    air = v < CT_AIR_BELOW
    body = _fill_holes_by_slice(_largest_component(~air)) | labelled
    out = np.full(image.shape, SOFT_TISSUE, dtype=np.uint8)
    out[v < CT_FLUID_BELOW] = FLUID
    out[v < CT_FAT_BELOW] = FAT
    out[air] = AIR_INSIDE
    out[~body] = AIR_OUTSIDE

    # Bright structures: bone or positive oral contrast, told apart slice by slice (3D they merge: the spine,
    # ribs and pelvis touch each other and, at 3 mm, a contrast-filled loop touching a rib).
    near_organ = ndimage.binary_dilation(labelled, iterations=1)
    bright = (v >= CT_BRIGHT_FROM) & body & ~near_organ
    cross = ndimage.generate_binary_structure(2, 1)[None]  # 3x3 cross in-plane, one slice thick
    bright = ndimage.binary_opening(bright, structure=cross)
    depth = ndimage.distance_transform_edt(body, sampling=spacing)  # mm below the body surface
    spine = _spine_zone(organ, spacing)
    pixel_cm2 = float(spacing[1] * spacing[2]) / 100.0
    min_pixels = BRIGHT_MIN_ML * 1000.0 / float(np.prod(spacing))
    for z in np.flatnonzero(bright.any(axis=(1, 2))):
        parts, count = ndimage.label(bright[z])
        index = np.arange(1, count + 1)
        sizes = ndimage.sum_labels(np.ones_like(parts), parts, index)
        superficial = ndimage.mean(depth[z] <= SURFACE_MM, parts, index)
        spinal = ndimage.mean(spine[z], parts, index)
        keep = sizes >= min_pixels
        is_bone = keep & ((spinal >= 0.3) | ((superficial >= 0.5) & (sizes * pixel_cm2 <= RIB_MAX_CM2)))
        lut = np.zeros(count + 1, dtype=np.uint8)
        lut[1:][keep] = BOWEL_CONTRAST
        lut[1:][is_bone] = BONE
        cls = lut[parts]
        # Marrow: less dense than 200 HU, but enclosed by the cortex in the slice (vertebral body, pelvis).
        bone = cls == BONE
        holes = ndimage.binary_fill_holes(ndimage.binary_closing(bone, iterations=1)) & ~bone & ~labelled[z]
        if holes.any():
            hole_parts, n = ndimage.label(holes)
            small = (
                ndimage.sum_labels(np.ones_like(hole_parts), hole_parts, np.arange(1, n + 1)) * pixel_cm2
                <= MARROW_MAX_CM2
            )
            cls[np.concatenate([[False], small])[hole_parts]] = BONE
        out[z][cls > 0] = cls[cls > 0]
    out[labelled] = organ[labelled]
    return out


def perirenal_classes(tissue: np.ndarray, spacing) -> np.ndarray:
    """A copy of a CT tissue map where the fat around each kidney is PERIRENAL_FAT, wrapped in a one-voxel
    RENAL_FASCIA shell; apply it on the model grid (a one-voxel fascia at native resolution vanishes when the map
    is resampled).

    Why: on MR with bright fat (T1, opposed-phase) the renal fascia draws a thin dark line around the perirenal
    fat, which then looks like a kidney-shaped organ with the (dark) kidney inside it, and networks trained on
    maps where that fat runs on into all other fat label the whole compartment as kidney (TotalSegmentator's
    example MR). With the compartment and its fascia as classes of their own, the synthesis draws that pattern
    as background. Approximate: the compartment is fat within PERIRENAL_MM of the kidney (the real cone is
    thicker behind and below the kidney); the renal sinus (fat inside the kidney's in-plane closing) stays FAT.
    """
    out = np.array(tissue, copy=True)
    kidney = np.isin(out, KIDNEYS)
    if not kidney.any():
        return out
    spacing = np.asarray(spacing, dtype=np.float64)
    near = ndimage.distance_transform_edt(~kidney, sampling=spacing) <= PERIRENAL_MM
    cross = ndimage.generate_binary_structure(2, 1)[None]
    sinus = ndimage.binary_closing(kidney, structure=cross, iterations=SINUS_CLOSING, border_value=0)
    peri = (out == FAT) & near & ~sinus
    fascia = ndimage.binary_dilation(peri) & ~peri & np.isin(out, (FAT, FLUID, SOFT_TISSUE))
    out[peri] = PERIRENAL_FAT
    out[fascia] = RENAL_FASCIA
    return out


def _spine_zone(organ: np.ndarray, spacing) -> np.ndarray:
    """Per slice, the voxels more than SPINE_BEHIND_MM posterior of the aorta's centre and within
    SPINE_HALF_WIDTH_MM of it left-right
    (axis 2). The aorta of the nearest slice that has one stands in below its bifurcation and above the
    diaphragm, and there the zone is PELVIS_HALF_WIDTH_MM wide (sacrum, iliac bones). Posterior is the side away
    from the centre of the labelled organs, so the axis direction in the file does not matter."""
    zone = np.zeros(organ.shape, dtype=bool)
    aorta = organ == AORTA
    slices = np.flatnonzero(aorta.any(axis=(1, 2)))
    if slices.size == 0:
        return zone
    organ_y = np.argwhere(organ[::2, ::2, ::2] > 0)[:, 1].mean() * 2
    y = np.arange(organ.shape[1])[:, None]
    x = np.arange(organ.shape[2])[None, :]
    centres = {z: np.argwhere(aorta[z]).mean(0) for z in slices}
    posterior = -1.0 if organ_y > np.mean([c[0] for c in centres.values()]) else 1.0
    for z in range(organ.shape[0]):
        nearest = slices[np.abs(slices - z).argmin()]
        ay, ax = centres[nearest]
        half_width = SPINE_HALF_WIDTH_MM if nearest == z else PELVIS_HALF_WIDTH_MM
        zone[z] = ((y - ay) * posterior * spacing[1] > SPINE_BEHIND_MM) & (np.abs(x - ax) * spacing[2] <= half_width)
    return zone


def _kmeans_1d(values: np.ndarray, k: int = 3, iterations: int = 20) -> np.ndarray:
    """Sorted cluster centres of a 1D k-means started at the quantiles."""
    centres = np.quantile(values, (np.arange(k) + 0.5) / k)
    for _ in range(iterations):
        edges = (centres[1:] + centres[:-1]) / 2.0
        assign = np.searchsorted(edges, values)
        new = np.array([values[assign == i].mean() if np.any(assign == i) else centres[i] for i in range(k)])
        if np.allclose(new, centres):
            break
        centres = np.sort(new)
    return centres


def mr_tissue_labels(
    image: np.ndarray, organs: np.ndarray, spacing, convention: str = "chaos", body_fraction: float = 0.05
) -> np.ndarray:
    """Tissue label map (uint8) of an MR case: organs in abdomenseg numbering, outside the body AIR_OUTSIDE,
    the body's unlabelled voxels MR_DARK / MR_MID / MR_BRIGHT by a 1D k-means of their smoothed log signal."""
    if image.shape != organs.shape:
        raise ValueError(f"image {image.shape} and labels {organs.shape} differ in shape")
    organ = convert_labels(organs, convention)
    labelled = organ > 0
    raw = image.astype(np.float32)
    threshold = np.percentile(raw, 99) * body_fraction
    body = _fill_holes_by_slice(_largest_component(raw > threshold)) | labelled
    v = np.log1p(np.maximum(_smooth(raw, spacing), 0.0))
    out = np.full(image.shape, AIR_OUTSIDE, dtype=np.uint8)
    rest = body & ~labelled
    values = v[rest]
    if values.size:
        centres = _kmeans_1d(values[:: max(1, values.size // 200000)])
        edges = (centres[1:] + centres[:-1]) / 2.0
        out[rest] = np.array([MR_DARK, MR_MID, MR_BRIGHT], dtype=np.uint8)[np.searchsorted(edges, values)]
    out[labelled] = organ[labelled]
    return out


def tissue_fractions(tissue: np.ndarray) -> dict:
    """{class name: fraction of the volume} of the tissue classes (organs summed as 'organs')."""
    counts = np.bincount(tissue.ravel(), minlength=LAST_TISSUE + 1) / tissue.size
    out = {"organs": float(counts[1:FIRST_TISSUE].sum())}
    out.update({name: float(counts[value]) for value, name in TISSUE_NAMES.items()})
    return out
