import numpy as np
import SimpleITK as sitk

from AbdomenSegLib.io.phantom import make_phantom, rotation
from AbdomenSegLib.preprocessing import preprocess as pp


def _flipped(image):
    return sitk.Flip(sitk.PermuteAxes(image, [1, 0, 2]), [True, False, True])


def test_reorient_is_exact_and_canonical():
    ct, labels = make_phantom(size=(40, 36, 20))
    flipped = _flipped(labels)
    assert not np.allclose(flipped.GetDirection(), np.eye(3).ravel())
    back = pp.reorient(flipped)
    assert np.allclose(back.GetDirection(), np.eye(3).ravel())
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(labels))
    assert np.allclose(back.GetOrigin(), labels.GetOrigin())


def test_resample_to_spacing_keeps_extent_and_labels():
    _, labels = make_phantom(size=(60, 50, 30), spacing=(2.0, 2.0, 5.0))
    coarse = pp.resample_to_spacing(labels, (4.0, 4.0, 5.0), is_label=True)
    assert coarse.GetSize() == (30, 25, 30)
    assert coarse.GetPixelID() == labels.GetPixelID()
    assert set(np.unique(sitk.GetArrayViewFromImage(coarse))) <= set(np.unique(sitk.GetArrayViewFromImage(labels)))

    # Same physical extent: first/last voxel edges coincide.
    def edges(img):
        size = np.array(img.GetSize()) - 0.5
        return (
            np.array(img.TransformContinuousIndexToPhysicalPoint((-0.5, -0.5, -0.5))),
            np.array(img.TransformContinuousIndexToPhysicalPoint(size.tolist())),
        )

    for a, b in zip(edges(coarse), edges(labels)):
        assert np.allclose(a, b, atol=1e-4)
    # Back onto the original grid: exact geometry, labels mostly preserved.
    back = pp.resample_to_reference(coarse, labels, is_label=True)
    assert back.GetSize() == labels.GetSize() and back.GetOrigin() == labels.GetOrigin()
    agree = (sitk.GetArrayViewFromImage(back) == sitk.GetArrayViewFromImage(labels)).mean()
    assert agree > 0.98


def test_resample_image_is_linear_in_float():
    ct, _ = make_phantom(size=(40, 36, 20), noise=0)
    out = pp.resample_to_spacing(ct, (3.0, 3.0, 2.5))
    assert out.GetPixelID() == sitk.sitkFloat32
    values = sitk.GetArrayViewFromImage(out)
    assert values.min() >= -1000.5 and values.max() <= 450.5
    assert len(np.unique(values)) > len(np.unique(sitk.GetArrayViewFromImage(ct)))  # blended edges


def test_ct_window_and_mr_normalize():
    hu = np.array([-1000, -125, 75, 275, 3000], dtype=np.float32)
    assert np.allclose(pp.ct_window(hu, -125, 275), [0, 0, 0.5, 1, 1])
    rng = np.random.default_rng(0)
    mr = rng.gamma(2.0, 200.0, size=(20, 20, 20)).astype(np.float32)
    norm = pp.mr_normalize(mr)
    assert norm.min() == 0 and norm.max() == 1
    assert np.isclose(np.mean(norm == 1), 0.005, atol=0.003)


def test_histogram_equalisation_and_clahe_spread_contrast():
    rng = np.random.default_rng(1)
    low_contrast = (0.4 + 0.05 * rng.random((16, 32, 32))).astype(np.float32)
    he = pp.histogram_equalize(low_contrast)
    assert he.max() - he.min() > 0.9
    cl = pp.clahe(low_contrast)
    assert cl.shape == low_contrast.shape and cl.std() > low_contrast.std()
    assert np.array_equal(pp.enhance(low_contrast, "none"), low_contrast)


def test_body_crop_and_pad():
    ct, _ = make_phantom(size=(64, 56, 24), spacing=(6.0, 6.0, 10.0))
    array = sitk.GetArrayFromImage(ct)
    box = pp.bounding_box(pp.body_mask(array, -500), margin=1)
    cropped = array[box]
    assert cropped.size < array.size and (cropped > -500).mean() > 0.6
    padded, unpad = pp.pad_to_multiple(cropped, (16, 16, 16), minimum=(32, 32, 32))
    assert all(n % 16 == 0 and n >= 32 for n in padded.shape)
    assert np.array_equal(padded[unpad], cropped)


def test_phantom_oblique_geometry_is_what_was_asked():
    direction = rotation("z", 20) @ rotation("x", -10)
    ct, labels = make_phantom(size=(48, 40, 24), spacing=(3.0, 3.5, 5.0), direction=direction)
    assert np.allclose(np.array(ct.GetDirection()).reshape(3, 3), direction)
    # The liver sits on the patient's right (negative x in LPS) whatever the grid.
    liver = np.argwhere(sitk.GetArrayViewFromImage(labels) == 1)[:, ::-1]
    points = np.array([labels.TransformIndexToPhysicalPoint([int(v) for v in p]) for p in liver[::50]])
    assert points[:, 0].mean() < -30
