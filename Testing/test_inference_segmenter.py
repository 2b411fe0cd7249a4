"""The runner: exact input geometry for any orientation, progress, cancel, device fallback, options."""

import numpy as np
import pytest
import SimpleITK as sitk

from AbdomenSegLib.core.errors import AbdomenSegError, Cancelled
from AbdomenSegLib.inference.inferer import inferer_for, window_count
from AbdomenSegLib.inference.segmenter import Options, Segmenter
from AbdomenSegLib.io.phantom import make_phantom, rotation
from helpers import shared


def phantom_ct(size, spacing=None, **kw):
    """Phantom CT whose field of view (~400 mm) includes air around the body, as a real scan does."""
    spacing = spacing or (400.0 / size[0], 360.0 / size[1], 8.0)
    return make_phantom(size=size, spacing=spacing, **kw)[0]


def _same_grid(a, b):
    return (
        a.GetSize() == b.GetSize()
        and a.GetSpacing() == b.GetSpacing()
        and a.GetOrigin() == b.GetOrigin()
        and a.GetDirection() == b.GetDirection()
    )


@pytest.fixture(scope="module")
def segmenter(tiny_package):
    return Segmenter(tiny_package, "cpu", log=lambda m: None)


@pytest.mark.parametrize(
    "direction",
    [
        np.eye(3),
        np.diag([-1.0, -1.0, 1.0]),  # RAS-stored
        rotation("z", 25) @ rotation("x", 15),  # oblique
    ],
)
def test_output_is_in_the_input_grid(segmenter, direction):
    ct = phantom_ct((50, 44, 21), direction=direction)
    out = segmenter.segment(ct)
    assert _same_grid(out, ct) and out.GetPixelID() == sitk.sitkUInt8
    assert set(np.unique(sitk.GetArrayViewFromImage(out))) <= {0, 1, 2, 3, 4, 5}


@pytest.mark.slow
def test_real_ct_flipped_and_permuted_gives_the_same_organs(segmenter):
    """Reorienting the input must only reorient the output (real BTCV data, exact comparison)."""
    image = sitk.ReadImage(str(shared("btcv_ct", "images", "btcv_img0002.nii.gz")))
    options = Options(input_intensity="btcv_uint8")
    base = segmenter.segment(image, options)
    flipped_in = sitk.Flip(sitk.PermuteAxes(image, [1, 0, 2]), [True, False, True])
    flipped_out = segmenter.segment(flipped_in, options)
    assert _same_grid(flipped_out, flipped_in)
    # Undo the flip/permutation on the output and compare voxel by voxel.
    undone = sitk.PermuteAxes(sitk.Flip(flipped_out, [True, False, True]), [1, 0, 2])
    a, b = sitk.GetArrayViewFromImage(base), sitk.GetArrayViewFromImage(undone)
    assert a.shape == b.shape
    assert (a == b).mean() > 0.999


def test_anisotropic_real_mr_grid(tiny_package):
    image = sitk.ReadImage(str(shared("chaos_mr_t2", "images", "chaosT2_01.nii.gz")))
    card = tiny_package
    card_mr = type(card)(card.path, dict(card.data, modality="MR", intensity={"mode": "mr_percentile"}))
    out = Segmenter(card_mr, "cpu").segment(image)
    assert _same_grid(out, image)


def test_progress_and_cancel(segmenter):
    ct = phantom_ct((60, 50, 30))
    seen = []
    segmenter.segment(ct, progress=lambda f, m: seen.append(f))
    assert seen[-1] == 1.0 and seen == sorted(seen) and len(seen) > 3
    calls = []
    with pytest.raises(Cancelled):
        segmenter.segment(ct, progress=lambda f, m: calls.append(m), cancel=lambda: len(calls) > 2)


def test_cuda_out_of_memory_finishes_on_cpu(tiny_package):
    """The call that ran out of memory finishes on the CPU; the segmenter keeps its device (test_inference_inferer.py
    checks the next call is on the GPU again)."""
    import torch

    seg = Segmenter(tiny_package, "cpu", log=lambda m: messages.append(m))
    messages = []
    real_forward = seg.network.forward
    state = {"raised": False}

    def forward_once_oom(x):  # simulate the GPU running out of memory on the first window
        if not state["raised"]:
            state["raised"] = True
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real_forward(x)

    seg.network.forward = forward_once_oom
    ct = phantom_ct((40, 36, 20))
    out = seg.segment(ct)
    assert _same_grid(out, ct) and seg.timings.device == "cpu"
    assert any("ran out of memory" in m for m in messages)


def test_cuda_requested_without_gpu_runs_on_cpu():
    import torch

    from AbdomenSegLib.inference.segmenter import resolve_device

    messages = []
    device = resolve_device("cuda", messages.append)
    if torch.cuda.is_available():
        assert device == "cuda"
    else:
        assert device == "cpu" and "not available" in messages[0]
    with pytest.raises(AbdomenSegError):
        resolve_device("tpu")


def test_back_resampling_reconstructs_fine_organs(segmenter):
    """Known coarse probabilities -> fine input grid: smooth (linear, per organ box) beats nearest."""
    from AbdomenSegLib.preprocessing.pipeline import to_model_space
    from AbdomenSegLib.preprocessing.preprocess import resample_to_reference

    ct, labels = make_phantom(size=(120, 100, 40), spacing=(3.2, 3.2, 8.0), direction=rotation("z", 10))
    truth = sitk.GetArrayFromImage(labels)
    truth[truth > 5] = 0  # the tiny model knows organs 1-5
    space = to_model_space(ct, [8.0, 8.0, 10.0], {"mode": "ct_window", "window": [-125, 275]})
    coarse = sitk.GetArrayFromImage(resample_to_reference(labels, space.image, is_label=True))
    coarse[coarse > 5] = 0
    onehot = np.stack([(coarse == c).astype(np.float32) for c in range(6)])
    probabilities = (onehot / onehot.sum(0, keepdims=True))[(slice(None),) + space.box]
    scores = {}
    for smooth in (True, False):
        out = segmenter._to_input_grid(probabilities, space, ct, smooth)
        assert out.shape == truth.shape
        scores[smooth] = [
            2 * ((out == c) & (truth == c)).sum() / ((out == c).sum() + (truth == c).sum()) for c in range(1, 6)
        ]
    # Organs 1-4 are >= 6 coarse voxels across; the 24 mm pancreas is 3 and already lost at 8 mm.
    assert min(scores[True][:4]) > 0.85 and scores[True][0] > 0.95  # liver
    assert np.mean(scores[True]) >= np.mean(scores[False]) - 0.005


def test_organ_subset_and_postprocessing(segmenter):
    ct = phantom_ct((50, 44, 24))
    out = sitk.GetArrayFromImage(
        segmenter.segment(ct, Options(organs=["liver", "spleen"], largest_component=True, fill_holes=True))
    )
    assert set(np.unique(out)) <= {0, 1, 2}
    from scipy import ndimage

    for organ in (1, 2):
        if (out == organ).any():
            assert ndimage.label(out == organ)[1] == 1
    with pytest.raises(AbdomenSegError, match="unknown organ"):
        segmenter.segment(ct, Options(organs=["appendix"]))


def test_largest_component_follows_the_card_unless_told_otherwise(tiny_package):
    """The card names the organs that are one piece by anatomy; 'all' and 'none' override it."""
    from dataclasses import replace

    from scipy import ndimage

    card = replace(tiny_package, data={**tiny_package.data, "postprocess": {"largest_component": ["liver"]}})
    segmenter = Segmenter(card, "cpu", log=lambda m: None)
    labels = np.zeros((24, 24, 24), np.uint8)
    labels[12:20, 12:20, 12:20], labels[2:4, 2:4, 2:4] = 1, 1  # a liver and a far island of "liver"
    labels[2:10, 14:22, 2:10], labels[20:22, 2:4, 20:22] = 2, 2  # the same for the spleen
    pieces = lambda out, organ: ndimage.label(out == organ)[1]
    for choice, liver, spleen in [("model", 1, 2), ("all", 1, 1), (True, 1, 1), ("none", 2, 2), (False, 2, 2)]:
        out = segmenter._finish_labels(labels.copy(), Options(largest_component=choice))
        assert (pieces(out, 1), pieces(out, 2)) == (liver, spleen), choice
        assert (out[12:20, 12:20, 12:20] == 1).all() and (out[2:10, 14:22, 2:10] == 2).all()  # main pieces kept
    with pytest.raises(AbdomenSegError, match="largest-component"):
        segmenter._finish_labels(labels.copy(), Options(largest_component="some"))


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: sitk.Image([32, 32, 32], sitk.sitkInt16) + 40, "constant"),
        (lambda: sitk.GetImageFromArray(np.full((20, 20, 20), np.nan, np.float32)), "NaN"),
        (lambda: make_phantom(size=(30, 30, 20))[1], "label map"),
        (lambda: sitk.Cast(make_phantom(size=(30, 30, 20))[0] + 1100, sitk.sitkInt16), "Hounsfield"),
    ],
)
def test_bad_volumes_are_refused(segmenter, make, message):
    with pytest.raises(AbdomenSegError, match=message):
        segmenter.segment(make())


def test_window_count_matches_monai():
    from monai.data.utils import dense_patch_slices, get_valid_patch_size
    from monai.inferers.utils import _get_scan_interval

    for shape, roi in (((64, 96, 96), (64, 96, 96)), ((150, 150, 148), (64, 96, 96)), ((40, 200, 33), (32, 32, 32))):
        roi = get_valid_patch_size(shape, roi)
        interval = _get_scan_interval(shape, roi, 3, (0.25,) * 3)
        assert window_count(shape, roi, 0.25) == len(dense_patch_slices(shape, roi, interval))


def test_2d_package_segments_slice_by_slice_into_the_input_grid(tmp_path):
    """A 2.5D smp U-Net package: slice-wise batches, same exact output grid as the 3D runner."""
    import torch

    from AbdomenSegLib.models.networks import build_network
    from AbdomenSegLib.models.packages import export_package

    torch.manual_seed(0)
    arch = {"class": "Unet", "args": {"encoder_name": "resnet18", "encoder_depth": 3, "decoder_channels": [32, 16, 8]}}
    card = {
        "name": "tiny-2d",
        "dimensions": 2,
        "architecture": arch,
        "in_channels": 3,
        "modality": "CT",
        "labels": {"1": "liver", "2": "spleen"},
        "spacing": [8.0, 8.0, 10.0],
        "intensity": {"mode": "ct_window", "window": [-125, 275]},
        "inference": {"batch_size": 4},
    }
    package = export_package(build_network(arch, 3, 3), card, tmp_path / "tiny-2d")
    segmenter = Segmenter(package, "cpu", log=lambda m: None)
    ct = phantom_ct((50, 44, 21), direction=rotation("z", 20))
    seen = []
    out = segmenter.segment(ct, progress=lambda f, m: seen.append(m))
    assert _same_grid(out, ct) and set(np.unique(sitk.GetArrayViewFromImage(out))) <= {0, 1, 2}
    assert any("slices" in m for m in seen)
    # Slice-wise really is per slice: the network sees each model-space slice with its neighbours.
    from AbdomenSegLib.preprocessing.pipeline import to_model_space

    space = to_model_space(ct, card["spacing"], card["intensity"])
    probabilities = inferer_for(package)(segmenter.network, space.array[:5], "cpu")
    assert probabilities.shape == (3,) + space.array[:5].shape
    assert np.allclose(probabilities.sum(0), 1, atol=1e-5)


def test_sliding_window_sees_the_volume_as_training_did(segmenter):
    """Inference windows the volume exactly as training's validation does: no padding slab inside the
    last windows (padding 36 slices to 48 once cost the MR model half its liver Dice)."""
    import torch
    from monai.inferers import sliding_window_inference

    roi = segmenter.card["inference"]["roi_size"]
    shape = [r + 5 for r in roi]  # one axis past the roi, not a multiple of the stride
    array = np.random.default_rng(0).random(shape, dtype=np.float32)
    ours = segmenter._infer(array, Options(), lambda f, m: None, None)
    with torch.no_grad():
        logits = sliding_window_inference(
            torch.as_tensor(array[None, None]), roi, 2, segmenter.network, overlap=0.25, mode="gaussian"
        )
    assert ours.shape[1:] == tuple(shape)
    np.testing.assert_allclose(ours, torch.softmax(logits, 1)[0].numpy(), atol=1e-5)
    small = segmenter._infer(array[: roi[0] // 2], Options(), lambda f, m: None, None)  # under the roi: MONAI pads
    assert small.shape[1:] == (roi[0] // 2, *shape[1:])


def test_a_volume_shorter_than_the_window_is_padded_as_the_options_and_card_say(segmenter):
    """Default: the edge slices repeated (inferer.PADDING), as MONAI's padding_mode="replicate"; Options.padding
    "constant" gives MONAI's zeros; an unknown padding is refused by the check, before any work."""
    import torch
    from monai.inferers import sliding_window_inference

    roi = segmenter.card["inference"]["roi_size"]
    array = np.random.default_rng(1).random([roi[0] // 2, *roi[1:]], dtype=np.float32)
    for padding, options in (("replicate", Options()), ("constant", Options(padding="constant"))):
        ours = segmenter._infer(array, options, lambda f, m: None, None)
        with torch.no_grad():
            logits = sliding_window_inference(
                torch.as_tensor(array[None, None]), roi, 2, segmenter.network, mode="gaussian", padding_mode=padding
            )
        np.testing.assert_allclose(ours, torch.softmax(logits, 1)[0].numpy(), atol=1e-5)
    edge = segmenter._infer(array, Options(), lambda f, m: None, None)
    zeros = segmenter._infer(array, Options(padding="constant"), lambda f, m: None, None)
    assert np.abs(edge - zeros).max() > 1e-3
    image, _ = make_phantom(size=(40, 40, 12))
    with pytest.raises(AbdomenSegError, match="window padding 'reflect' is unknown"):
        segmenter.check(image, Options(padding="reflect"))
