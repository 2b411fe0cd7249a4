"""Contrast-agnostic synthesis (synth.py) and the tissue label maps it starts from (tissue_labels.py)."""

import numpy as np
import pytest
import SimpleITK as sitk

from AbdomenSegLib.training import tissue_labels as tl
from AbdomenSegLib.training.synth import SlabTransform, SynthTransform, synthesize, to_target

LIVER, SPLEEN, KIDNEY_R = 1, 2, 3
SPACING = (7.7, 2.5, 2.5)


def toy_map() -> np.ndarray:
    """A 24x64x64 tissue map: outside air, a body of fat and soft tissue, liver, spleen, a kidney, bone."""
    z, y, x = np.indices((24, 64, 64))
    label = np.full((24, 64, 64), tl.AIR_OUTSIDE, dtype=np.uint8)
    body = ((y - 32) / 28.0) ** 2 + ((x - 32) / 30.0) ** 2 <= 1
    label[body] = tl.FAT
    label[body & (((y - 32) / 22.0) ** 2 + ((x - 32) / 24.0) ** 2 <= 1)] = tl.SOFT_TISSUE
    label[body & (y < 30) & (x < 28) & (y > 12)] = LIVER
    label[body & ((y - 22) ** 2 + (x - 46) ** 2 <= 36)] = SPLEEN
    label[body & ((y - 42) ** 2 + (x - 22) ** 2 <= 25)] = KIDNEY_R
    label[body & ((y - 50) ** 2 + (x - 32) ** 2 <= 16)] = tl.BONE
    return label


def test_intensities_vary_between_samples_labels_untouched():
    label = toy_map()
    before = label.copy()
    liver_means, spleen_means, differences = [], [], []
    for seed in range(10):
        image = synthesize(label, SPACING, np.random.default_rng(seed))
        assert image.shape == label.shape and image.dtype == np.float32
        assert 0.0 <= image.min() and image.max() <= 1.0
        liver, spleen = float(image[label == LIVER].mean()), float(image[label == SPLEEN].mean())
        liver_means.append(liver), spleen_means.append(spleen), differences.append(liver - spleen)
    np.testing.assert_array_equal(label, before)  # the label map is read, never written
    assert np.std(liver_means) > 0.1 and np.std(spleen_means) > 0.1
    assert min(differences) < -0.1 and max(differences) > 0.1  # liver brighter than spleen in some, darker in others
    # Every class' mean varies: per class, std of its mean intensity over the 10 samples.
    images = [synthesize(label, SPACING, np.random.default_rng(s)) for s in range(10)]
    for value in (tl.FAT, tl.SOFT_TISSUE, tl.BONE, KIDNEY_R):
        assert np.std([im[label == value].mean() for im in images]) > 0.08, value
    # Air stays dark (no MR signal on any sequence).
    assert max(float(im[label == tl.AIR_OUTSIDE].mean()) for im in images) < 0.3


def test_deterministic_with_a_seed():
    label = toy_map()
    a = synthesize(label, SPACING, np.random.default_rng(7))
    b = synthesize(label, SPACING, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, synthesize(label, SPACING, np.random.default_rng(8)))


def test_transform_replaces_image_and_maps_tissue_to_background():
    label = toy_map()[None].astype(np.int64)
    real = np.full(label.shape, 0.5, dtype=np.float32)
    target = to_target(label)
    assert set(np.unique(target)) == {0, LIVER, SPLEEN, KIDNEY_R}
    np.testing.assert_array_equal(target[label < tl.FIRST_TISSUE], label[label < tl.FIRST_TISSUE])

    always = SynthTransform(spacing=SPACING, prob=1.0)
    always.set_random_state(3)
    out = always({"image": real, "label": label})
    assert out["image"].shape == real.shape and not np.allclose(out["image"], 0.5)
    np.testing.assert_array_equal(out["label"], target)
    again = SynthTransform(spacing=SPACING, prob=1.0)
    again.set_random_state(3)
    np.testing.assert_array_equal(again({"image": real, "label": label})["image"], out["image"])

    never = SynthTransform(spacing=SPACING, prob=0.0)
    out = never({"image": real, "label": label})
    np.testing.assert_array_equal(out["image"], real)  # real image kept (CHAOS mixed in)
    np.testing.assert_array_equal(out["label"], target)  # but the loss never sees tissue classes
    out = never({"image": real, "label": label, "synth_only": True})  # e.g. BTCV: never the CT itself
    assert not np.allclose(out["image"], 0.5)


def _btcv_case(name="btcv_img0001.nii.gz"):
    import SimpleITK as sitk

    from helpers import shared

    image = sitk.ReadImage(str(shared("btcv_ct", "images", name)))
    label = sitk.ReadImage(str(shared("btcv_ct", "labels", name)))
    return sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(label), image.GetSpacing()[::-1]


@pytest.fixture(scope="module")
def btcv_tissue():
    image, label, spacing = _btcv_case()
    return image, label, tl.ct_tissue_labels(image, label, spacing)


def test_btcv_tissue_classes_are_plausible(btcv_tissue):
    from AbdomenSegLib.core.organs import convert_labels

    image, label, tissue = btcv_tissue
    organ = convert_labels(label, "btcv")
    np.testing.assert_array_equal(tissue[organ > 0], organ[organ > 0])  # organs keep their (our) labels
    assert not np.any((tissue[organ == 0] > 0) & (tissue[organ == 0] < tl.FIRST_TISSUE))  # classes disjoint
    assert tissue.min() >= 1 and tissue.max() <= tl.LAST_TISSUE  # every voxel has a class
    f = tl.tissue_fractions(tissue)
    assert 0.2 < f["air_outside"] < 0.7  # the body fills about half the field of view
    assert 0.05 < f["fat"] < 0.45
    assert 0.0 < f["air_inside"] < 0.15  # lung bases, bowel gas
    assert 0.05 < f["soft_tissue"] + f["fluid"] < 0.5
    assert 0.002 < f["bone"] < 0.06
    # Thresholds: fat is -122..-30 HU on the smoothed image, so the raw voxels are mostly in that range.
    fat_hu = tl.uint8_to_hu(image[tissue == tl.FAT])
    assert np.median(fat_hu) < -60 and np.percentile(fat_hu, 90) < 0
    bone = tissue == tl.BONE
    assert np.median(tl.uint8_to_hu(image[bone])) > 150
    # Bone mostly posterior of the aorta (spine). The shared BTCV headers say identity but the A-P axis is
    # reversed (true direction diag(1,-1,1)): in the raw array posterior is the LOW y index.
    aorta_y = np.argwhere(organ == 8)[:, 1].mean()
    assert (np.argwhere(bone)[:, 1] < aorta_y).mean() > 0.6


def test_chaos_tissue_classes():
    import SimpleITK as sitk

    from helpers import shared

    image = sitk.ReadImage(str(shared("chaos_mr_t2", "images", "chaosT2_05.nii.gz")))
    label = sitk.ReadImage(str(shared("chaos_mr_t2", "labels", "chaosT2_05.nii.gz")))
    a, lab = sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(label)
    tissue = tl.mr_tissue_labels(a, lab, image.GetSpacing()[::-1])
    from AbdomenSegLib.core.organs import convert_labels

    organ = convert_labels(lab, "chaos")
    np.testing.assert_array_equal(tissue[organ > 0], organ[organ > 0])
    f = tl.tissue_fractions(tissue)
    assert 0.2 < f["air_outside"] < 0.8
    for name in ("mr_dark", "mr_mid", "mr_bright"):
        assert f[name] > 0.02, name
    means = [a[tissue == c].mean() for c in (tl.MR_DARK, tl.MR_MID, tl.MR_BRIGHT)]
    assert means[0] < means[1] < means[2]
    assert a[tissue == tl.AIR_OUTSIDE].mean() < means[0]


# -- the synth trainer (training/synth_trainer.py, synth_data.py) on phantom datasets ---------------------------------------
def _synth_config(tmp_path, **data):
    from AbdomenSegLib.training.run import load_config
    from helpers import write_phantom_dataset

    for name in ("ct", "mr"):
        root = tmp_path / name
        if not root.exists():
            images, refs = write_phantom_dataset(root, cases=3)
            refs.rename(root / "labels")
            if name == "mr":  # MR-like signal (no air at -1000 HU): an MR model refuses a CT in HU
                for path in images.glob("*.nii.gz"):
                    ct = sitk.ReadImage(str(path), sitk.sitkFloat32)
                    sitk.WriteImage(sitk.Clamp(ct + 1024.0, lowerBound=0.0) * 0.5, str(path))
    return load_config(
        {
            "name": "tiny-synth",
            "data": {
                "sources": [
                    {"name": "ct", "root": str(tmp_path / "ct"), "kind": "ct", "convention": "abdomenseg"},
                    {"name": "mr", "root": str(tmp_path / "mr"), "kind": "mr", "convention": "abdomenseg"},
                ],
                "val_source": "mr",
                "val_count": 1,
                "cache": str(tmp_path / "cache.npz"),
                **data,
            },
            "model": {
                "modality": "MR",
                "architecture": {
                    "class": "UNet",
                    "args": {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1},
                },
                "spacing": [8.0, 8.0, 14.0],
                "intensity": {"mode": "mr_percentile", "percentiles": [0.5, 99.5]},
                "organs": ["liver", "spleen", "kidney_right", "kidney_left"],
            },
            "train": {
                "trainer": "synth",
                "synth": {"prob": 0.5},
                "steps": 6,
                "patch": [16, 32, 32],
                "val_every": 3,
                "threads": 2,
                "augment": {"affine_prob": 0.5},
            },
        }
    )


def test_synth_trainer_batches_are_synthetic_images_with_channel_labels(tmp_path):
    from AbdomenSegLib.training.synth_trainer import SynthTrainer

    trainer = SynthTrainer(_synth_config(tmp_path), tmp_path / "run", log=lambda m: None)
    assert len(trainer.val_names) == 1 and trainer.val_names[0].startswith("mr/")  # real images validate
    assert sorted(trainer.train_names) == sorted(
        ["ct/case0", "ct/case1", "ct/case2"]
        + [n for n in ("mr/case0", "mr/case1", "mr/case2") if n not in trainer.val_names]
    )
    assert any(t.max() >= tl.FIRST_TISSUE for t in trainer.tissue.values())  # tissue classes in the cache
    images = []
    for step in range(6):
        trainer.transform.set_random_state(seed=step)
        x, y = trainer.batch(np.random.default_rng(step))
        assert x.shape[1:] == (1, 16, 32, 32) and y.shape == (2, 1, 16, 32, 32)
        assert 0 <= int(y.min()) and int(y.max()) <= 4  # channels only: no organ number, no tissue class
        images.append(x.numpy())
    assert np.std([im.mean() for im in images]) > 0.01  # every draw a new contrast


@pytest.mark.slow
def test_synth_run_exports_a_package_validated_on_real_images(tmp_path):
    from AbdomenSegLib.training.run import train_and_export

    card = train_and_export(_synth_config(tmp_path), out=tmp_path / "run", device="cpu", log=lambda m: None)
    assert card["modality"] == "MR" and card["training"]["validation_cases"][0].startswith("mr/")
    assert set(card["validation"]["dice"]) <= {"liver", "spleen", "kidney_right", "kidney_left"}
    assert card["validation"]["cases"] == card["training"]["validation_cases"]


@pytest.mark.parametrize(
    "data, message",
    [
        ({"val_source": "ct"}, "not one of the MR sources"),
        ({"sources": []}, "needs data.sources"),
        (
            {
                "sources": [{"name": "x", "root": "/nonexistent", "kind": "mr", "convention": "chaos"}],
                "val_source": "x",
            },
            "is not a folder",
        ),
    ],
)
def test_synth_configs_are_checked_before_any_cache(tmp_path, data, message):
    from AbdomenSegLib.core.errors import AbdomenSegError

    with pytest.raises(AbdomenSegError, match=message):
        _synth_config(tmp_path, **data)
    assert not (tmp_path / "cache.npz").exists()


def test_slab_keeps_a_thin_slab_and_pads_the_rest_as_inference_does():
    """Every cut keeps 4..z-1 whole slices untouched and fills the others as the sliding window pads a short
    volume: by default each takes the nearest slab slice (image and label); with "constant" padding image 0 and
    background. Over many draws thickness and position vary."""
    from AbdomenSegLib.inference.inferer import PADDING

    rng = np.random.default_rng(0)
    image = rng.uniform(0.1, 1.0, (1, 32, 24, 24)).astype(np.float32)
    label = rng.integers(1, 5, (1, 32, 24, 24))
    assert SlabTransform().padding == PADDING == "replicate"
    for padding in ("replicate", "constant"):
        slab = SlabTransform(prob=1.0, min_slices=4, padding=padding)
        slab.set_random_state(seed=1)
        kept = []
        for _ in range(50):
            out = slab({"image": image, "label": label})
            # A slice is the slab's own where it equals the input's slice at that position.
            inside = np.array([np.array_equal(out["image"][:, z], image[:, z]) for z in range(32)])
            first, last = np.flatnonzero(inside)[[0, -1]]
            assert inside[first : last + 1].all() and 4 <= inside.sum() <= 31  # one contiguous slab
            assert np.array_equal(out["label"][:, inside], label[:, inside])
            for z in np.flatnonzero(~inside):
                if padding == "constant":
                    assert not out["image"][:, z].any() and not out["label"][:, z].any()
                else:
                    edge = first if z < first else last
                    assert np.array_equal(out["image"][:, z], image[:, edge])
                    assert np.array_equal(out["label"][:, z], label[:, edge])
            kept.append((first, inside.sum()))
        assert len(set(kept)) > 20
    with pytest.raises(ValueError, match="padding"):
        SlabTransform(padding="reflect")
    assert np.array_equal(SlabTransform(prob=0.0)({"image": image, "label": label})["image"], image)


def test_ink_edges_darken_the_fat_side_of_fat_water_interfaces_only():
    """Opposed-phase edges: the fat voxels touching a water-containing class get darker than the rest of the
    fat; organ voxels and every label stay as they were; with ink_prob 0 the image is the plain synthesis."""
    from dataclasses import replace

    from AbdomenSegLib.training.synth import DEFAULT

    labels = np.full((16, 40, 40), tl.FAT, np.uint8)
    labels[4:12, 10:30, 10:30] = 3  # an organ in fat
    quiet = replace(DEFAULT, thick_prob=0.0, blur_sigma=(0, 0), noise_std=(0, 0), bias_std=(0, 0), gamma_log_std=0.0)
    before = labels.copy()
    plain = synthesize(labels, (5.0, 2.5, 2.5), np.random.default_rng(3), replace(quiet, ink_prob=0.0))
    inked, info = synthesize(
        labels, (5.0, 2.5, 2.5), np.random.default_rng(3), replace(quiet, ink_prob=1.0), return_info=True
    )
    assert np.array_equal(labels, before)
    organ = labels == 3
    edge = np.zeros_like(organ)  # fat voxels sharing a face with the organ (2 x 400 + 4 x 160 = 1440)
    for axis in range(3):
        for shift in (-1, 1):
            edge |= np.roll(organ, shift, axis)
    edge &= labels == tl.FAT
    assert info["ink"] == int(edge.sum())
    far_fat = (labels == tl.FAT) & ~edge
    assert inked[edge].mean() < 0.5 * inked[far_fat].mean()
    # the organ's own voxels are the plain synthesis's (up to the final percentile rescaling)
    assert np.corrcoef(plain[organ], inked[organ])[0, 1] > 0.999
    assert not np.array_equal(plain, inked)


def test_dark_draws_make_some_tissue_classes_as_dark_as_air_and_leave_labels_alone():
    """dark_prob: over many samples each non-air class is sometimes drawn air-dark (and air always is); with 0, no
    class is, and the image equals the plain synthesis."""
    from dataclasses import replace

    from AbdomenSegLib.training.synth import DEFAULT

    labels = np.random.default_rng(0).integers(0, tl.LAST_TISSUE + 1, (8, 24, 24)).astype(np.uint8)
    before = labels.copy()
    darkened = set()
    for seed in range(40):
        _, info = synthesize(
            labels, (5.0, 2.5, 2.5), np.random.default_rng(seed), replace(DEFAULT, dark_prob=0.2), True
        )
        for c in info["darkened"]:
            assert DEFAULT.dark_mean[0] <= info["means"][c] <= DEFAULT.dark_mean[1]
            assert c not in DEFAULT.dark_classes
        darkened |= set(int(c) for c in info["darkened"])
    assert np.array_equal(labels, before)
    assert len(darkened) > 15  # many different classes, organs and tissues alike
    _, off = synthesize(labels, (5.0, 2.5, 2.5), np.random.default_rng(1), DEFAULT, True)
    assert off["darkened"].size == 0
    assert np.array_equal(
        synthesize(labels, (5.0, 2.5, 2.5), np.random.default_rng(1)),
        synthesize(labels, (5.0, 2.5, 2.5), np.random.default_rng(1), replace(DEFAULT, dark_prob=0.0)),
    )


def test_surface_contacts_count_shared_voxel_faces():
    from AbdomenSegLib.training.synth import surface_contacts

    index = np.zeros((2, 3, 4), dtype=np.intp)
    index[:, :, 2:] = 1  # two 2x3x2 blocks side by side along x: 2 * 3 faces between them
    index[1, 0, 0] = 2  # one voxel of class 2 in the class-0 block: 3 faces with 0 (x, y, z), 0 with class 1
    contacts = surface_contacts(index, 3)
    assert np.array_equal(contacts, contacts.T) and np.all(np.diag(contacts) == 0)
    assert contacts[0, 1] == 6 and contacts[0, 2] == 3 and contacts[1, 2] == 0


def test_min_contrast_keeps_every_organ_visible_against_most_of_its_surface():
    """min_contrast: no sample leaves an organ within min_contrast of the classes holding more than max_hidden of
    its surface (plain draws do, often); labels untouched; 0 gives the plain synthesis, draw for draw."""
    from dataclasses import replace

    from AbdomenSegLib.training.synth import DEFAULT, surface_contacts

    label = toy_map()
    before = label.copy()
    contacts = surface_contacts(label.astype(np.intp), tl.MR_BRIGHT + 1)  # the classes a toy map draws
    params = replace(DEFAULT, min_contrast=0.15)

    def hidden(means, organ):
        return contacts[organ][np.abs(means - means[organ]) < 0.15].sum() / contacts[organ].sum()

    plain_hidden = redrawn = 0
    for seed in range(60):
        _, plain = synthesize(label, SPACING, np.random.default_rng(seed), DEFAULT, True)
        _, info = synthesize(label, SPACING, np.random.default_rng(seed), params, True)
        for organ in (LIVER, SPLEEN, KIDNEY_R):
            plain_hidden += hidden(plain["means"], organ) > 0.5
            assert hidden(info["means"], organ) <= 0.5
        redrawn += len(info["redrawn"])
    assert plain_hidden >= 5 and redrawn >= plain_hidden  # the constraint had work to do, and did it
    assert np.array_equal(label, before)
    assert np.array_equal(
        synthesize(label, SPACING, np.random.default_rng(2)),
        synthesize(label, SPACING, np.random.default_rng(2), replace(DEFAULT, min_contrast=0.0)),
    )


def kidney_in_fat() -> np.ndarray:
    """A 12x48x48 map: fat, soft tissue at the edges, a kidney (label 3) 10 px wide with a fat-filled sinus."""
    z, y, x = np.indices((12, 48, 48))
    label = np.full((12, 48, 48), tl.FAT, dtype=np.uint8)
    label[:, :, :4] = tl.SOFT_TISSUE
    label[((y - 24) ** 2 + (x - 24) ** 2 <= 25) & (z >= 3) & (z <= 8)] = KIDNEY_R
    label[((y - 24) ** 2 + (x - 24) ** 2 <= 2) & (z >= 5) & (z <= 6)] = tl.FAT  # renal sinus
    return label


def test_perirenal_classes_wrap_the_kidney_in_its_fat_and_a_one_voxel_fascia():
    from scipy import ndimage

    label = kidney_in_fat()
    before = label.copy()
    spacing = (5.0, 2.5, 2.5)
    out = tl.perirenal_classes(label, spacing)
    assert np.array_equal(label, before)  # a copy
    kidney = label == KIDNEY_R
    assert np.array_equal(out == KIDNEY_R, kidney)  # organs untouched
    distance = ndimage.distance_transform_edt(~kidney, sampling=spacing)
    peri = out == tl.PERIRENAL_FAT
    assert peri.any() and np.all(label[peri] == tl.FAT) and distance[peri].max() <= tl.PERIRENAL_MM
    # the fat around the kidney is perirenal; the sinus, enclosed by the kidney, stays fat
    assert out[5, 24, 24] == tl.FAT
    assert np.all(peri[(label == tl.FAT) & (distance <= tl.PERIRENAL_MM) & (distance > 5.0)])
    # the fascia: exactly the voxels just outside the compartment (all fat here), one voxel thick
    fascia = out == tl.RENAL_FASCIA
    shell = ndimage.binary_dilation(peri) & ~peri & ~kidney
    assert fascia.any() and np.array_equal(fascia, shell)
    assert not np.any(ndimage.binary_erosion(fascia))  # nowhere thicker than a voxel
    assert np.all(distance[fascia] > tl.PERIRENAL_MM - 5.0)  # at the compartment's edge, not inside it
    assert np.array_equal(tl.perirenal_classes(np.full_like(label, tl.FAT), spacing), np.full_like(label, tl.FAT))


def test_perirenal_fat_takes_the_fat_intensity_when_drawn_so_and_old_maps_keep_their_stream():
    from dataclasses import replace

    from AbdomenSegLib.training.synth import DEFAULT

    label = tl.perirenal_classes(kidney_in_fat(), (5.0, 2.5, 2.5))
    same = replace(DEFAULT, perirenal_as_fat=1.0)
    for seed in range(5):
        _, info = synthesize(label, (5.0, 2.5, 2.5), np.random.default_rng(seed), same, True)
        assert info["means"][tl.PERIRENAL_FAT] == info["means"][tl.FAT]
    _, own = synthesize(label, (5.0, 2.5, 2.5), np.random.default_rng(0), DEFAULT, True)
    assert own["means"][tl.PERIRENAL_FAT] != own["means"][tl.FAT]
    # a map without the new classes draws as many means as before they existed: same image, draw for draw
    old = kidney_in_fat()
    _, info = synthesize(old, (5.0, 2.5, 2.5), np.random.default_rng(4), DEFAULT, True)
    assert info["means"].size == tl.MR_BRIGHT + 1
