"""resample_back.py (cells) against the per-organ-box linear resampling it replaces (Segmenter._smooth_back).

The cell method is designed to give exactly the boxes' labels (resample_back's docstring has the argument),
so synthetic cases, random geometry included, must agree voxel for voxel. On real data through the
Segmenter the stated tolerance is: differing voxels <= 0.01% of the organ voxels (either map) and every
organ's Dice between the two >= 0.999 (measured: 0 differing voxels).
"""

import numpy as np
import pytest
import SimpleITK as sitk

from AbdomenSegLib.inference import resample_back as rb
from AbdomenSegLib.inference.predictor import get_segmenter
from AbdomenSegLib.inference.segmenter import Options, Segmenter
from AbdomenSegLib.io.phantom import rotation
from AbdomenSegLib.preprocessing import preprocess as pp
from helpers import shared

MAX_DIFFERING_FRACTION = 1e-4  # of the organ voxels
MIN_DICE = 0.999


class _Boxes:
    """Just enough of a Segmenter to run the reference `_smooth_back` on channel labels."""

    _resample_box = staticmethod(Segmenter._resample_box)

    def _channels_to_organs(self, channels):
        return channels


def boxes_reference(probabilities, box, model_image, reference):
    """Today's algorithm, as `_to_input_grid` runs it: full model grid, argmax, `_smooth_back`."""
    full = np.zeros((probabilities.shape[0],) + model_image.GetSize()[::-1], dtype=np.float32)
    full[0] = 1.0
    full[(slice(None),) + box] = probabilities
    return Segmenter._smooth_back(_Boxes(), full, full.argmax(0).astype(np.uint8), model_image, reference)


def random_direction(rng, oblique=True):
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = rng.uniform(0.1, 0.6) if oblique else 0.0
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    turn = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k
    flips = np.diag(rng.choice([-1.0, 1.0], size=3))
    order = np.eye(3)[rng.permutation(3)]
    return turn @ order @ flips


def grid(size, spacing, direction, centre):
    """An empty image of that geometry, centred on `centre` (LPS mm)."""
    image = sitk.Image([int(n) for n in size], sitk.sitkFloat32)
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(v) for v in np.asarray(direction).ravel()])
    half = np.asarray(direction) @ ((np.asarray(size) - 1) / 2.0 * np.asarray(spacing))
    image.SetOrigin((np.asarray(centre) - half).tolist())
    return image


def probabilities_for(shape, rng, channels=6, onehot=False):
    """Softmax of smooth random blobs on a model grid of `shape`: organs of a few voxels to many, some
    touching the grid's edge, channel channels-1 never the winner (the reference ignores such channels);
    and the body box: a random sub-box (outside it, certain background)."""
    z, y, x = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    logits = [np.full(shape, 1.0)]
    for c in range(1, channels):
        centre = rng.uniform(0, 1, size=3) * (np.array(shape) - 1)
        if c == 1:
            centre[rng.integers(3)] = 0  # an organ cut by the grid's edge
        radius = rng.uniform(0.12, 0.35, size=3) * np.array(shape)
        r2 = sum(((axis - centre[a]) / radius[a]) ** 2 for a, axis in enumerate((z, y, x)))
        logits.append(rng.uniform(2.0, 6.0) * (1.0 - r2) + 1.0 + rng.normal(0, 0.3, size=shape))
    logits[-1] = np.minimum(logits[-1], np.maximum.reduce(logits[:-1]) - 0.05)  # never wins
    logits = np.stack(logits)
    p = np.exp(logits - logits.max(0))
    p = (p / p.sum(0)).astype(np.float32)
    if onehot:  # hard labels: interpolation ties everywhere between two organs
        p = (np.arange(channels)[:, None, None, None] == p.argmax(0)).astype(np.float32)
    low = [int(rng.integers(0, 3)) for _ in shape]
    high = [n - int(rng.integers(0, 3)) for n in shape]
    box = tuple(slice(lo, hi) for lo, hi in zip(low, high))
    return p[(slice(None),) + box], box


def reoriented_case(rng, finer):
    """The Segmenter's geometry: the model grid is the input's, reoriented (axes permuted/flipped) and
    resampled to the model spacing. Input oblique, flipped, anisotropic; finer or coarser than the model."""
    model_spacing = np.array([2.0, 2.0, 3.0])
    spacing = model_spacing * (rng.uniform(0.25, 0.6, size=3) if finer else rng.uniform(1.3, 2.2, size=3))
    size = np.round(rng.uniform(50, 70, size=3) * model_spacing / spacing).astype(int)
    reference = grid(size, spacing, random_direction(rng), rng.normal(0, 30, size=3))
    model_image = pp.resample_to_spacing(
        pp.reorient(reference, str(rng.choice(["LAS", "LPS", "RAS"]))), model_spacing.tolist()
    )
    return model_image, reference


def unrelated_case(rng, finer):
    """Any two grids over roughly the same region: the model grid oblique to the input's."""
    centre = rng.normal(0, 30, size=3)
    model_spacing = rng.uniform(1.5, 3.5, size=3)
    model_image = grid(rng.integers(24, 40, size=3), model_spacing, random_direction(rng), centre)
    spacing = model_spacing * (rng.uniform(0.4, 0.8, size=3) if finer else rng.uniform(1.2, 1.8, size=3))
    size = np.round(np.array(model_image.GetSize()) * model_spacing / spacing * rng.uniform(1.0, 1.3)).astype(int)
    reference = grid(size, spacing, random_direction(rng), centre + rng.normal(0, 5, size=3))
    return model_image, reference


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("finer", [True, False])
@pytest.mark.parametrize("make", [reoriented_case, unrelated_case])
def test_equal_to_the_boxes_on_random_geometry(make, finer, seed, monkeypatch):
    rng = np.random.default_rng(seed + (100 if finer else 0))
    model_image, reference = make(rng, finer)
    probabilities, box = probabilities_for(model_image.GetSize()[::-1], rng)
    old = boxes_reference(probabilities, box, model_image, reference)
    interpolated = []
    evaluate = rb._Cells.evaluate
    monkeypatch.setattr(rb._Cells, "evaluate", lambda self, m: interpolated.append(len(m[0])) or evaluate(self, m))
    new = rb.labels_on_input_grid(probabilities, box, model_image, reference)
    # The case has organs, boundaries between them, and voxels that needed interpolating.
    assert (old > 0).sum() > 300 and len(np.unique(old)) >= 4 and sum(interpolated) > 50
    assert np.array_equal(new, old), f"{(new != old).sum()} of {(old > 0).sum()} organ voxels differ"
    A, b = rb._index_map(model_image, reference)
    assert (rb._separable_axes(A, tuple(slice(0, n) for n in new.shape)) is not None) == (make is reoriented_case)


@pytest.mark.parametrize("seed", range(2))
def test_general_path_equals_the_separable_one(seed, monkeypatch):
    rng = np.random.default_rng(200 + seed)
    model_image, reference = reoriented_case(rng, finer=True)
    probabilities, box = probabilities_for(model_image.GetSize()[::-1], rng)
    separable = rb.labels_on_input_grid(probabilities, box, model_image, reference)
    monkeypatch.setattr(rb, "_separable_axes", lambda A, region: None)
    monkeypatch.setattr(rb, "CHUNK_VOXELS", 5000)  # many slabs
    assert np.array_equal(rb.labels_on_input_grid(probabilities, box, model_image, reference), separable)


@pytest.mark.parametrize("seed", range(2))
def test_nearly_reoriented_grids_take_the_separable_path_exactly(seed, monkeypatch):
    """Direction matrices off by rounding (here a 2e-6 rad turn, as float32 NIfTI headers have): the
    axis-by-axis lookup, with voxels that the other axes could move across a cell face left unsettled."""
    rng = np.random.default_rng(300 + seed)
    model_image, reference = reoriented_case(rng, finer=True)
    turn = rotation("z", np.degrees(2e-6)) @ rotation("x", np.degrees(1e-6))
    model_image.SetDirection((turn @ np.array(model_image.GetDirection()).reshape(3, 3)).ravel().tolist())
    probabilities, box = probabilities_for(model_image.GetSize()[::-1], rng)
    A, b = rb._index_map(model_image, reference)
    assert rb._separable_axes(A, tuple(slice(0, n) for n in reference.GetSize()[::-1])) is not None
    assert np.count_nonzero(A) > 3
    new = rb.labels_on_input_grid(probabilities, box, model_image, reference)
    assert np.array_equal(new, boxes_reference(probabilities, box, model_image, reference))
    monkeypatch.setattr(rb, "_separable_axes", lambda A, region: None)
    assert np.array_equal(rb.labels_on_input_grid(probabilities, box, model_image, reference), new)


def test_hard_labels_tie_everywhere_and_still_agree():
    """One-hot probabilities: between two organs the interpolated values tie exactly (0.5 / 0.5) and the
    lower channel must win, as in the reference; the model grid aligned with the input at 2x (half-voxel
    positions hit the boxes' buffer edges exactly)."""
    rng = np.random.default_rng(7)
    reference = grid((64, 60, 40), (1.0, 1.0, 1.5), np.diag([1.0, -1.0, 1.0]), (0, 0, 0))
    model_image = pp.resample_to_spacing(pp.reorient(reference, "LAS"), [2.0, 2.0, 3.0])
    probabilities, box = probabilities_for(model_image.GetSize()[::-1], rng, onehot=True)
    old = boxes_reference(probabilities, box, model_image, reference)
    new = rb.labels_on_input_grid(probabilities, box, model_image, reference)
    assert (old > 0).sum() > 1000
    assert np.array_equal(new, old), f"{(new != old).sum()} of {(old > 0).sum()} organ voxels differ"


@pytest.mark.parametrize("mirrored", [False, True])
def test_a_box_edge_bounds_its_channel_only_inside_its_buffer(mirrored):
    """Organ 1 wins at x = 3 only, so its box ends at x = 5, where it still has 0.40 (organ 2 has 0.41).
    Past x = 5.5 the reference gives organ 1 a 0 (outside its box), and organ 3 (0.36 at x = 6, never
    above 0.40 in that cell) wins: organ 1's 0.40 must not count as a floor there. Mirrored: the same at
    the box's lower edge (organ 1 at x = 8, box from x = 6, organ 3 wins below x = 5.5)."""
    x = {
        0: [0.9, 0.1, 0.0, 0.0, 0.0],
        3: [0.1, 0.6, 0.1, 0.1, 0.1],
        4: [0.09, 0.40, 0.41, 0.05, 0.05],
        6: [0.30, 0.0, 0.0, 0.36, 0.34],
    }
    x[5] = x[4]
    columns = [x.get(i, x[0]) for i in range(12)][:: -1 if mirrored else 1]
    probabilities = np.repeat(np.repeat(np.array(columns, dtype=np.float32).T[:, None, None, :], 3, 1), 3, 2)
    model_image = grid((12, 3, 3), (1.0, 1.0, 1.0), np.eye(3), (5.5, 1.0, 1.0))
    reference = grid((120, 3, 3), (0.1, 1.0, 1.0), np.eye(3), (5.5, 1.0, 1.0))
    box = tuple(slice(0, n) for n in probabilities.shape[1:])
    old = boxes_reference(probabilities, box, model_image, reference)
    assert (old[1, 1, 56:59] == 3).all() if mirrored else (old[1, 1, 61:64] == 3).all()  # x = 5.15-5.35, 5.65-5.85
    assert np.array_equal(rb.labels_on_input_grid(probabilities, box, model_image, reference), old)


def test_index_map_is_simpleitk_geometry():
    rng = np.random.default_rng(3)
    model_image, reference = unrelated_case(rng, finer=True)
    A, b = rb._index_map(model_image, reference)
    for _ in range(20):
        v = rng.integers(0, reference.GetSize())  # x, y, z
        point = reference.TransformIndexToPhysicalPoint([int(i) for i in v])
        expected = np.array(model_image.TransformPhysicalPointToContinuousIndex(point))[::-1]
        assert np.allclose(A @ v[::-1] + b, expected, rtol=0, atol=1e-9)


def test_no_organ_and_lut():
    rng = np.random.default_rng(5)
    model_image, reference = reoriented_case(rng, finer=True)
    probabilities, box = probabilities_for(model_image.GetSize()[::-1], rng)
    lut = np.zeros(256, dtype=np.uint8)
    lut[1:6] = [7, 3, 9, 1, 2]
    old = boxes_reference(probabilities, box, model_image, reference)
    assert np.array_equal(rb.labels_on_input_grid(probabilities, box, model_image, reference, lut=lut), lut[old])
    background = np.zeros_like(probabilities)
    background[0] = 1.0
    assert not rb.labels_on_input_grid(background, box, model_image, reference).any()


# -- real data through the Segmenter ---------------------------------------------------------------------
def boxes_and_cells(segmenter, image, options):
    """The Segmenter's result with each back-resampling (same probabilities), and the two stage times."""
    captured, infer = {}, segmenter._infer

    def capture(*args):
        captured["p"] = infer(*args)
        return captured["p"]

    results, seconds = {}, {}
    try:
        segmenter._infer = capture
        for method in ("cells", "boxes"):
            segmenter.resample_back = method
            results[method] = sitk.GetArrayFromImage(segmenter.segment(image, options))
            seconds[method] = segmenter.timings.stages["resample_back"]
            segmenter._infer = lambda *args: captured["p"]
    finally:
        segmenter.__dict__.pop("_infer", None)
        segmenter.__dict__.pop("resample_back", None)
    return results["boxes"], results["cells"], seconds


def assert_within_tolerance(old, new):
    organ_voxels = int(((old > 0) | (new > 0)).sum())
    differing = int((old != new).sum())
    assert organ_voxels > 0
    assert differing <= MAX_DIFFERING_FRACTION * organ_voxels, (differing, organ_voxels)
    for organ in np.union1d(np.unique(old), np.unique(new)):
        if organ:
            a, b = old == organ, new == organ
            dice = 2 * (a & b).sum() / (a.sum() + b.sum())
            assert dice >= MIN_DICE, (int(organ), dice)
    return differing, organ_voxels


def test_real_hu_example_ct(default_card):
    from AbdomenSegLib.io.images import read_image

    image = read_image(shared("totalseg_example", "example_ct.nii.gz"))
    segmenter = get_segmenter(default_card, "cpu", log=lambda m: None)
    old, new, seconds = boxes_and_cells(segmenter, image, Options(largest_component="none"))
    differing, organs = assert_within_tolerance(old, new)
    print(f"example_ct: {differing} of {organs} organ voxels differ; seconds {seconds}")


def test_btcv_validation_case_at_fine_in_plane_spacing(default_card):
    """A BTCV validation case resampled to ~0.7 mm in-plane: the input grid much finer than the model's."""
    from AbdomenSegLib.preprocessing.datasets import read_case

    case = default_card["training"]["validation_cases"][0]
    image, _ = read_case(
        shared("btcv_ct", "images", f"{case}.nii.gz"),
        shared("btcv_ct", "labels", f"{case}.nii.gz"),
        default_card["training"]["config"]["data"]["direction"],
    )
    spacing = [0.7, 0.7, image.GetSpacing()[2]]
    size = [int(round(n * s / t)) for n, s, t in zip(image.GetSize(), image.GetSpacing(), spacing)]
    fine = sitk.Resample(
        image,
        size,
        sitk.Transform(),
        sitk.sitkLinear,
        image.GetOrigin(),
        spacing,
        image.GetDirection(),
        0,
        image.GetPixelID(),
    )
    segmenter = get_segmenter(default_card, "cpu", log=lambda m: None)
    options = Options(input_intensity="btcv_uint8", largest_component="none")
    old, new, seconds = boxes_and_cells(segmenter, fine, options)
    differing, organs = assert_within_tolerance(old, new)
    print(f"{case} at {size}: {differing} of {organs} organ voxels differ; seconds {seconds}")
