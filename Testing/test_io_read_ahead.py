"""The read-ahead thread reads the next scan and prepares it for the model while other work runs; the result
must be exactly what segmenting without it gives, and a preparation for another model must not be used."""

import numpy as np
import SimpleITK as sitk

from AbdomenSegLib.inference.segmenter import Options, Segmenter, prepare_input
from AbdomenSegLib.io.phantom import make_phantom
from AbdomenSegLib.io.read_ahead import ReadAhead


def test_prepared_scans_segment_exactly_as_unprepared(tiny_package, tmp_path):
    paths = []
    for seed in (0, 1):
        image, _ = make_phantom(size=(80, 72, 40), seed=seed)
        paths.append(tmp_path / f"ct{seed}.nrrd")
        sitk.WriteImage(image, str(paths[-1]))
    segmenter = Segmenter(tiny_package, "cpu", log=lambda m: None)
    with ReadAhead(paths, prepare=lambda image: prepare_input(tiny_package, image)) as ahead:
        for path in paths:
            image, prepared = ahead.get_prepared(path)
            assert prepared is not None and prepared.space.array.ndim == 3
            _, space = segmenter.model_space_probabilities(image, Options(), lambda f, m: None, None, prepared)
            assert space is prepared.space  # the preparation made ahead is the one used
            ahead_labels = sitk.GetArrayFromImage(segmenter.segment(image, Options(), prepared=prepared))
            plain = sitk.GetArrayFromImage(segmenter.segment(sitk.ReadImage(str(path)), Options()))
            assert np.array_equal(ahead_labels, plain)


def test_a_preparation_for_another_model_or_intensity_is_redone(tiny_package):
    image, _ = make_phantom(size=(80, 72, 40))
    segmenter = Segmenter(tiny_package, "cpu", log=lambda m: None)
    wrong = prepare_input(tiny_package, image)
    wrong.space.array[:] = 0.0  # were it used, the network would see an empty volume
    wrong.model = "another-model:0000"
    expected = sitk.GetArrayFromImage(segmenter.segment(image, Options()))
    assert np.array_equal(sitk.GetArrayFromImage(segmenter.segment(image, Options(), prepared=wrong)), expected)
    wrong.model = prepare_input(tiny_package, image).model
    wrong.input_intensity = "btcv_uint8"
    assert np.array_equal(sitk.GetArrayFromImage(segmenter.segment(image, Options(), prepared=wrong)), expected)
