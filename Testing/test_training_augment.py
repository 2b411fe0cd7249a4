"""Training augmentations: unenhanced CT, organ enlargement, renal cysts — each changes what it should and nothing else."""

import numpy as np
import pytest
from scipy import ndimage
from test_training_trainer import _config

from AbdomenSegLib.core.errors import AbdomenSegError
from AbdomenSegLib.training.augment import UNENHANCED_HU, RandUnenhancedd
from AbdomenSegLib.training.run import Trainer

WINDOW = (-125.0, 275.0)
ORGANS = ["liver", "spleen", "kidney_right", "gallbladder"]


def to_unit(hu):
    return (np.asarray(hu, dtype=np.float32) - WINDOW[0]) / (WINDOW[1] - WINDOW[0])


def to_hu(unit):
    return np.asarray(unit) * (WINDOW[1] - WINDOW[0]) + WINDOW[0]


def enhanced_patch(seed=0):
    """Portal-venous-like patch: fat, muscle, enhanced liver/spleen, a kidney with bright cortex, dark bile."""
    rng = np.random.default_rng(seed)
    label = np.zeros((1, 32, 64, 64), dtype=np.int64)
    hu = np.full(label.shape, -100.0, dtype=np.float32)  # fat
    hu[:, :, 52:, :] = 50.0  # muscle, unlabelled: must stay as it is
    boxes = {
        1: (slice(4, 28), slice(4, 30), slice(4, 30)),
        2: (slice(4, 28), slice(4, 30), slice(36, 60)),
        3: (slice(8, 24), slice(34, 48), slice(8, 24)),
        4: (slice(8, 24), slice(34, 48), slice(40, 56)),
    }
    for channel, box in boxes.items():
        label[(0,) + box] = channel
    hu[label == 1], hu[label == 2], hu[label == 4] = 130.0, 120.0, 5.0
    kidney = label[0] == 3
    hu[0][kidney] = 200.0  # bright cortex around a darker medulla: a wide spread inside the organ
    hu[0][ndimage.binary_erosion(kidney, iterations=3)] = 110.0
    hu += rng.normal(0, 8, hu.shape).astype(np.float32)
    return np.clip(to_unit(hu), 0.0, 1.0), label  # windowed data, as the cache holds it


def transformed(image, label, **kwargs):
    t = RandUnenhancedd(organs=ORGANS, window=WINDOW, **kwargs)
    t.set_random_state(seed=1)
    return t({"image": image.copy(), "label": label.copy()})


def interior(label, channel):
    return ndimage.binary_erosion(label[0] == channel, iterations=3)[None]


def grown(mask, iterations):
    return ndimage.binary_dilation(mask[0], iterations=iterations)[None]


def test_fully_unenhanced_organs_reach_their_unenhanced_attenuation():
    image, label = enhanced_patch()
    out = transformed(image, label, prob=1.0, strength=(1.0, 1.0), spread=(0.4, 0.4), jitter_hu=0.0)
    assert np.array_equal(out["label"], label)  # labels are never touched
    for channel, organ in enumerate(ORGANS[:2], start=1):
        after = np.median(to_hu(out["image"][interior(label, channel)]))
        assert abs(after - UNENHANCED_HU[organ]) < 10, (organ, after)
    kidney_hu = to_hu(out["image"][label == 3])  # 200 HU cortex, 110 HU medulla before
    assert abs(np.median(kidney_hu) - UNENHANCED_HU["kidney_right"]) < 40 and np.percentile(kidney_hu, 75) < 90
    # The kidney's cortex/medulla contrast is compressed, as on an unenhanced scan ...
    kidney = label[0] == 3
    cortex = (ndimage.binary_erosion(kidney, iterations=1) & ~ndimage.binary_erosion(kidney, iterations=2))[None]
    medulla = ndimage.binary_erosion(kidney, iterations=5)[None]
    contrast = lambda a: np.mean(to_hu(a[cortex])) - np.mean(to_hu(a[medulla]))
    assert contrast(out["image"]) < 0.6 * contrast(image)
    # ... but not the voxel-scale noise (that is the scanner's, not the contrast agent's).
    core = interior(label, 1)
    noise = lambda a: np.std(to_hu(ndimage.laplace(a[0]))[core[0]])
    assert 0.8 < noise(out["image"]) / noise(image) < 1.2
    # Bile is not enhanced (5 HU, under its 10 HU target: nothing to wash out): unchanged; so are fat and
    # muscle away from the organs.
    assert np.allclose(out["image"][interior(label, 4)], image[interior(label, 4)], atol=1e-6)
    far = ~grown(label > 0, 6)  # beyond the blur kernel (truncated at 4 sigma)
    assert np.allclose(out["image"][far], image[far], atol=1e-4)  # 0.04 HU: the blur's tails


def test_change_is_blurred_across_label_edges():
    """No step exactly on the label edge: the voxel just outside an organ moves a little too."""
    image, label = enhanced_patch()
    out = transformed(image, label, prob=1.0, strength=(1.0, 1.0), jitter_hu=0.0)
    ring = grown(label == 1, 1) & (label == 0)
    assert np.all(out["image"][ring] <= image[ring] + 1e-6)
    assert np.mean(image[ring] - out["image"][ring]) > 0.01


def test_probability_zero_is_identity_and_partial_strength_is_in_between():
    image, label = enhanced_patch()
    assert np.array_equal(transformed(image, label, prob=0.0)["image"], image)
    half = transformed(image, label, prob=1.0, strength=(0.5, 0.5), jitter_hu=0.0)["image"]
    liver = np.median(to_hu(half[interior(label, 1)]))
    assert UNENHANCED_HU["liver"] + 20 < liver < 130 - 20


def test_trainer_applies_it_and_rejects_it_for_mr(tmp_path):
    import torch

    # The phantom's organs are at unenhanced attenuation except its aorta (180 HU), which must darken.
    organs = ["liver", "spleen", "kidney_right", "kidney_left", "aorta"]
    config = _config(tmp_path / "data", tmp_path / "cache.npz", steps=1, model={"organs": organs})
    config["train"]["augment"]["intensity_prob"] = 0.0
    plain = Trainer(config, tmp_path / "a", log=lambda m: None)
    config["train"]["augment"]["unenhanced_prob"] = 1.0
    varied = Trainer(config, tmp_path / "b", log=lambda m: None)
    for trainer in (plain, varied):
        trainer.transform.set_random_state(seed=3)
    x0, y0 = plain.batch(np.random.default_rng(0))
    x1, y1 = varied.batch(np.random.default_rng(0))
    assert torch.equal(y0, y1)
    aorta = y0 == organs.index("aorta") + 1
    assert aorta.sum() > 100  # the crops hold the aorta (its class is sampled as often as the others)
    # 180 HU -> about 42 HU at half to full strength (0.17-0.35), diluted by the blur on a 2-voxel-wide vessel
    assert float((x0 - x1)[aorta].mean()) > 0.05
    config["model"].update(modality="MR", intensity={"mode": "mr_percentile"})
    with pytest.raises(AbdomenSegError, match="unenhanced_prob"):
        Trainer(config, tmp_path / "c", log=lambda m: None)


def test_organ_enlargement_scales_the_organ_and_leaves_the_far_field():
    from AbdomenSegLib.training.augment import RandOrganEnlarged

    label = np.zeros((1, 32, 64, 64), dtype=np.int64)
    z, y, x = np.indices(label.shape[1:])
    spleen = ((z - 16) * 3.0) ** 2 + ((y - 32) * 2.0) ** 2 + ((x - 40) * 2.0) ** 2 <= 12.0**2  # 12 mm ball
    label[0][spleen] = 2
    label[0, :, :, :6] = 1  # a far-away "liver" slab
    image = np.where(label > 0, 0.6, 0.2).astype(np.float32)
    t = RandOrganEnlarged(channel=2, spacing=(3.0, 2.0, 2.0), prob=1.0, scale=(1.5, 1.5))
    t.set_random_state(seed=0)
    out = t({"image": image.copy(), "label": label.copy()})
    grown_spleen = out["label"][0] == 2
    assert 2.8 < grown_spleen.sum() / spleen.sum() < 4.0  # 1.5 ** 3 = 3.4, within voxel rounding
    assert ndimage.label(grown_spleen)[1] == 1  # no folding or tearing
    assert np.array_equal(out["label"][0, :, :, :6], label[0, :, :, :6])  # beyond the warp's reach: untouched
    inside = ndimage.binary_erosion(grown_spleen, iterations=2)  # the image moves with its labels (edges blend)
    assert inside.sum() > 0.3 * grown_spleen.sum() and np.allclose(out["image"][0][inside], 0.6)
    # An organ absent from the patch: nothing happens.
    none = t({"image": image.copy(), "label": np.where(label == 2, 0, label)})
    assert np.array_equal(none["image"], image)


def test_trainer_refuses_spleen_enlargement_without_a_spleen(tmp_path):
    config = _config(tmp_path / "data", tmp_path / "cache.npz", steps=1, model={"organs": ["liver", "kidney_left"]})
    config["train"]["augment"]["enlarge_spleen_prob"] = 0.5
    with pytest.raises(AbdomenSegError, match="enlarge_spleen_prob"):
        Trainer(config, tmp_path / "run", log=lambda m: None)


def test_renal_cyst_is_fluid_labelled_kidney_and_spares_other_organs():
    from AbdomenSegLib.training.augment import RandRenalCystd

    image, label = enhanced_patch()
    t = RandRenalCystd(
        channels=[3],
        window=WINDOW,
        spacing=(3.0, 2.0, 2.0),
        prob=1.0,
        radius_mm=(10.0, 14.0),
        hu=(5.0, 15.0),
        noise_hu=4.0,
    )
    t.set_random_state(seed=2)
    out = t({"image": image.copy(), "label": label.copy()})
    new_kidney = (out["label"] == 3) & (label != 3)
    # The phantom kidney is 110-200 HU, so its voxels below 40 HU are the cyst's (its partial-volume rim aside).
    fluid = (out["label"] == 3) & (to_hu(out["image"]) < 40)
    # Some voxels changed: the cyst has fluid attenuation (drawn 5-15 HU, noise 4 HU) ...
    assert fluid.sum() > 50
    assert 0.0 < np.median(to_hu(out["image"][fluid])) < 20.0
    # ... background the cyst bulges into became kidney, never another organ's voxels ...
    assert new_kidney.any() and np.all(label[new_kidney] == 0)
    for channel in (1, 2, 4):
        assert np.array_equal(out["label"] == channel, label == channel)
    # ... the image changed only within a few voxels of the cyst (partial-volume rim), not elsewhere.
    cyst = fluid | new_kidney
    far = ~ndimage.binary_dilation(cyst[0], np.ones((3, 3, 3)), iterations=5)[None]  # blur reaches 4 voxels
    assert np.allclose(out["image"][far], image[far], atol=1e-3)
    # No kidney in the patch: nothing happens.
    no_kidney = np.where(label == 3, 0, label)
    same = t({"image": image.copy(), "label": no_kidney})
    assert np.array_equal(same["image"], image) and np.array_equal(same["label"], no_kidney)


def test_trainer_refuses_renal_cysts_without_a_kidney(tmp_path):
    config = _config(tmp_path / "data", tmp_path / "cache.npz", steps=1, model={"organs": ["liver", "spleen"]})
    config["train"]["augment"]["renal_cyst_prob"] = 0.5
    with pytest.raises(AbdomenSegError, match="renal_cyst_prob"):
        Trainer(config, tmp_path / "run", log=lambda m: None)
