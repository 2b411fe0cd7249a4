"""The device pipeline (train.pipeline "device", device_batches.py): image and label stay aligned under every
warp, crops centre on the classes in the configured ratios, parameters stay in the recipe's ranges, a seed fixes
the batches, and a tiny run on the CPU learns and exports a package."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from AbdomenSegLib.training.config import load_config
from AbdomenSegLib.training.device_augment import ProjectAugmentations, draw_intensity
from AbdomenSegLib.training.device_batches import DeviceCase, DevicePipeline, crop_starts, draw_centres, draw_spatial

ORGANS = ["liver", "spleen", "kidney_right", "kidney_left"]
LEVEL = 40  # the synthetic image is label * LEVEL (uint8): its intensity encodes its label
QUIET = {"affine_prob": 0.0, "intensity_prob": 0.0}


def _config(tmp_path, augment=None, **train):
    return load_config(
        {
            "data": {"root": str(tmp_path), "convention": "btcv"},
            "model": {"organs": ORGANS, "orientation": "LAS", "spacing": [2.0, 2.0, 3.0]},
            "train": {"pipeline": "device", "batch_size": 4, "patch": [32, 48, 48], **train}
            | {"augment": {**QUIET, **(augment or {})}},
        }
    )


def _volume():
    """A label volume (z, y, x) with blobs of every class, the kidneys either side of x (LAS), and its image."""
    label = np.zeros((48, 80, 96), np.uint8)
    label[8:36, 10:50, 8:50] = 1  # liver
    label[12:30, 44:70, 60:86] = 2  # spleen
    label[20:40, 20:40, 14:30] = 3  # right kidney (low x)
    label[20:40, 20:40, 66:82] = 4  # left kidney
    return (label * LEVEL).astype(np.uint8), label


def _pipeline(config, volume=None):
    return DevicePipeline(config, {"case": volume or _volume()}, ["case"], "cpu")


@pytest.mark.parametrize(
    "augment",
    [
        {"affine_prob": 1.0, "rotate": 0.4, "scale": 0.2},
        {"affine_prob": 1.0, "rotate": 0.2, "scale": 0.1, "shear": 0.2},
        {"elastic_prob": 1.0},
        {"flip_axes": ["x", "y", "z"]},
        {"affine_prob": 1.0, "rotate": 0.3, "scale": 0.15, "elastic_prob": 1.0, "flip_axes": ["x"]},
    ],
    ids=["rotate-scale", "shear", "elastic", "mirror", "all"],
)
def test_image_and_label_stay_aligned_under_every_warp(tmp_path, augment):
    pipeline, plain = _pipeline(_config(tmp_path, augment)), _pipeline(_config(tmp_path))
    for step in range(3):
        x, y = pipeline.batch(step)
        said = torch.round(x * 255 / LEVEL).long()  # the label the intensity encodes
        if pipeline.lateral is not None:  # a mirrored right kidney is labelled left: the intensity still says right
            mirrored = pipeline.drawn["spatial"]["flips"][:, pipeline.lateral].reshape(-1, 1, 1, 1, 1)
            said = torch.where(mirrored & (said >= 3), 7 - said, said)
        # voxels whose 5^3 neighbourhood holds one label (not on the patch's rim, where it is cut short):
        # bilinear reads only that label's intensity there
        uniform = F.max_pool3d(y.float(), 5, 1, 2) == -F.max_pool3d(-y.float(), 5, 1, 2)
        rim = torch.ones_like(uniform)
        rim[..., 2:-2, 2:-2, 2:-2] = False
        uniform &= ~rim
        assert uniform.float().mean() > 0.3 and (y[uniform] > 0).sum() > 5000  # organs compared, not just air
        assert torch.equal(said[uniform], y[uniform])
        assert not torch.equal(x, plain.batch(step)[0])  # the warp did change the crop
    if "x" in augment.get("flip_axes", []):
        assert pipeline.lateral == 2  # LAS: x (array axis 2) runs left-right, its mirror trades the kidneys


def test_crop_centres_follow_the_class_ratios():
    _, label = _volume()
    label[label == 4] = 0  # the left kidney is absent from this case: never a centre, as in MONAI
    case = DeviceCase(label, label, 5, "cpu")
    ratios = torch.tensor([1.0, 4.0, 0.0, 2.0, 3.0])  # background, liver, spleen (off), kidneys
    draws = 6000
    classes, centres = draw_centres(case, ratios, draws, torch.Generator().manual_seed(1))
    at_centre = torch.as_tensor(label)[centres[:, 0], centres[:, 1], centres[:, 2]]
    assert torch.equal(at_centre.long(), classes)  # each centre lies on its drawn class
    expected = {0: 1 / 7, 1: 4 / 7, 2: 0.0, 3: 2 / 7, 4: 0.0}
    for c, p in expected.items():
        share = float((classes == c).float().mean())
        # 5 binomial standard deviations: a false alarm about once in 1.7 million runs
        assert abs(share - p) <= 5 * (p * (1 - p) / draws) ** 0.5 + 1e-9, (c, share, p)
    liver = centres[classes == 1].float().mean(0)  # uniform over the liver's voxels: its centroid
    assert torch.allclose(liver, torch.tensor([21.5, 29.5, 28.5]), atol=1.0)


def test_crops_stay_inside_the_volume_or_are_padded_evenly():
    centres = torch.tensor([[0, 5, 95], [47, 40, 0]])
    starts = crop_starts(centres, (48, 80, 96), (32, 96, 48))
    assert starts.tolist() == [[0, -8, 48], [16, -8, 0]]  # y (80 < 96) padded 8 each side as SpatialPad does


def _share(mask):
    return float(mask.float().mean())


def _prob_ok(mask, p):
    return abs(_share(mask) - p) <= 5 * (p * (1 - p) / mask.numel()) ** 0.5 + 1e-9


def test_parameters_stay_in_the_recipe_ranges(tmp_path):
    augment = {"affine_prob": 0.3, "rotate": 0.2, "scale": 0.15, "shear": 0.05, "elastic_prob": 0.1}
    augment |= {"intensity_prob": 0.5, "blur_prob": 0.2, "contrast_prob": 0.3, "noise_prob": 0.15}
    augment |= {"unenhanced_prob": 0.4, "enlarge_spleen_prob": 0.25, "renal_cyst_prob": 0.3, "flip_axes": ["x", "z"]}
    config = _config(tmp_path, augment)
    a, n, g = config["train"]["augment"], 20000, torch.Generator().manual_seed(2)
    s = draw_spatial(a, [0, 2], n, g, "cpu")
    assert _prob_ok(s["affine"], 0.3) and _prob_ok(s["elastic"], 0.1)
    assert _prob_ok(s["flips"][:, 0], 0.5) and _prob_ok(s["flips"][:, 2], 0.5) and not s["flips"][:, 1].any()
    on = s["affine"]
    for values, bound in ((s["angles"][on, 0], 0.2), (s["angles"][on, 1:], 0.05), (s["scales"][on] - 1, 0.15)):
        assert values.abs().max() <= bound and values.abs().max() > 0.98 * bound  # the whole range, no more
    assert (s["angles"][~on] == 0).all() and (s["scales"][~on] == 1).all() and (s["shear"][~on] == 0).all()
    assert s["shear"][on].abs().max() <= 0.05
    assert 5 <= s["sigma"].min() and s["sigma"].max() <= 8 and 50 <= s["magnitude"].min() <= s["magnitude"].max() <= 150
    i = draw_intensity(a, n, g, "cpu")
    for key, p in (("scale_on", 0.5), ("shift_on", 0.5), ("blur_on", 0.2), ("contrast_on", 0.3), ("noise_on", 0.15)):
        assert _prob_ok(i[key], p), key
    for key, low, high in (("scale", -0.1, 0.1), ("shift", -0.05, 0.05), ("blur_sigma", 0.25, 1.0)):
        assert low <= i[key].min() < low + 0.01 and high - 0.01 < i[key].max() <= high, key
    assert (
        0.7 <= i["gamma"].min()
        and i["gamma"].max() <= 1.5
        and 0 <= i["noise_std"].min() <= i["noise_std"].max() <= 0.03
    )
    project = ProjectAugmentations(config, "cpu")
    p = project.draw(n, g)
    for key, prob in (("unenhanced_on", 0.4), ("enlarge_on", 0.25), ("cyst_on", 0.3)):
        assert _prob_ok(p[key], prob), key
    # augment.py's own defaults: washout 0.6-1, spleen x 1.2-1.9, cyst radii 8-25 mm
    assert 0.6 <= p["alpha"].min() and p["alpha"].max() <= 1.0
    assert 1.2 <= p["enlarge_scale"].min() and p["enlarge_scale"].max() <= 1.9
    assert 8.0 <= p["cyst_radii"].min() and p["cyst_radii"].max() <= 25.0


def test_project_augmentations_change_what_they_should(tmp_path):
    config = _config(tmp_path, {"unenhanced_prob": 1.0, "enlarge_spleen_prob": 1.0, "renal_cyst_prob": 1.0})
    project = ProjectAugmentations(config, "cpu")
    image, label = _volume()
    x = torch.as_tensor(np.where(label > 0, 200, 20), dtype=torch.float32)[None, None] / 255  # enhanced organs
    y = torch.as_tensor(label, dtype=torch.long)[None]
    g = torch.Generator().manual_seed(3)
    p = project.draw(1, g)
    washed, _ = project._unenhance(x, y, p, g)
    assert washed[0, 0][y[0] == 1].median() < x[0, 0][y[0] == 1].median() - 0.2  # liver towards 55 HU
    _, bigger = project._enlarge(x, y, p, g)
    assert (bigger == 2).sum() > 1.3 * (y == 2).sum()  # spleen x >= 1.2 linear: >= 1.7 x volume inside the patch
    painted, cyst = project._cyst(x, y, p, g)
    grew = (cyst != y) & (y == 0)
    assert grew.any() and set(cyst[grew].unique().tolist()) <= {3, 4}  # background became kidney, nothing else
    assert painted[0, 0][(cyst[0] == 3) | (cyst[0] == 4)].min() < 0.4  # fluid (0-20 HU) is darker than enhanced kidney


def test_a_seed_fixes_the_batches(tmp_path):
    augment = {"affine_prob": 0.5, "elastic_prob": 0.5, "intensity_prob": 0.5, "noise_prob": 0.5, "flip_axes": ["x"]}
    first, again = _pipeline(_config(tmp_path, augment, seed=5)), _pipeline(_config(tmp_path, augment, seed=5))
    other = _pipeline(_config(tmp_path, augment, seed=6))
    for step in (0, 7):
        x, y = first.batch(step)
        x2, y2 = again.batch(step)
        assert torch.equal(x, x2) and torch.equal(y, y2)
        assert not torch.equal(x, other.batch(step)[0])
    assert not torch.equal(first.batch(1)[0], first.batch(2)[0])


def test_a_tiny_device_run_learns_and_exports(tmp_path):
    from test_training_trainer import _config as training_config

    from AbdomenSegLib.inference.segmenter import Segmenter
    from AbdomenSegLib.io.images import read_image
    from AbdomenSegLib.models.packages import read_card
    from AbdomenSegLib.training.run import Trainer, train_and_export

    config = training_config(tmp_path / "data", tmp_path / "cache.npz", steps=30, pipeline="device", val_every=30)
    losses = []
    Trainer(config, tmp_path / "run", log=lambda m: None).run(progress=lambda s, n, loss: losses.append(loss))
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    card = train_and_export(config, out=tmp_path / "run", device="cpu", export_only=True, log=lambda m: None)
    assert read_card(card.path)["training"]["config"]["train"]["pipeline"] == "device"
    image = read_image(tmp_path / "data" / "images" / "case0.nii.gz")
    assert Segmenter(card, "cpu").segment(image).GetSize() == image.GetSize()


def test_the_device_pipeline_refuses_what_it_cannot_build(tmp_path):
    from AbdomenSegLib.core.errors import AbdomenSegError

    two_d = {"dimensions": 2, "architecture": {"class": "Unet", "args": {"encoder_name": "resnet18"}}}
    with pytest.raises(AbdomenSegError, match="3D crops"):
        load_config(
            {
                "data": {"root": str(tmp_path), "convention": "btcv"},
                "model": two_d,
                "train": {"pipeline": "device", "patch": [3, 64, 64]},
            }
        )
    with pytest.raises(AbdomenSegError, match="loader_workers to 0"):
        load_config(
            {
                "data": {"root": str(tmp_path), "convention": "btcv"},
                "train": {"pipeline": "device", "loader_workers": 4},
            }
        )
    with pytest.raises(AbdomenSegError, match="train.pipeline"):
        load_config({"data": {"root": str(tmp_path), "convention": "btcv"}, "train": {"pipeline": "gpu"}})
