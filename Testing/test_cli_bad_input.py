"""Bad or unusual input to `segment` and `evaluate`: refused before any work with one `error: <problem>. <fix>`
line (exit 2), or written but flagged (exit 3); never a traceback, never a temp file left behind, never
an existing file changed. One table row per case; each row's maker writes the input and returns the
command line. Cases that need the real example CT skip without ../shared/data.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from test_io_dicom_series import write_ct_series

from AbdomenSegLib.cli import EXIT_FLAGGED, main
from AbdomenSegLib.io.phantom import make_phantom
from helpers import ROOT, shared

EXAMPLE_CT = ("totalseg_example", "example_ct.nii.gz")
EXAMPLE_LABELS = ("totalseg_example", "example_seg_fast_force_split.nii.gz")


def _phantom(tmp, name="ct.nii.gz", size=(64, 56, 24), spacing=(6.0, 6.0, 10.0)):
    ct, labels = make_phantom(size=size, spacing=spacing)
    sitk.WriteImage(ct, str(tmp / name))
    return tmp / name, labels


def _write(image, path):
    sitk.WriteImage(image, str(path))
    return path


# -- makers: (tmp_path, model_dir) -> argv ------------------------------------------------------------
def truncated_gz(tmp, model):
    src = shared(*EXAMPLE_CT)
    data = src.read_bytes()
    (tmp / "t.nii.gz").write_bytes(data[: len(data) // 2])
    return ["segment", str(tmp / "t.nii.gz"), str(tmp / "out.nii.gz"), "--model", model]


def truncated_nii(tmp, model):
    path, _ = _phantom(tmp, "ct.nii")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 5000])
    return ["segment", str(path), str(tmp / "out.nii.gz"), "--model", model]


def dicom_missing_slice(tmp, model):
    files = write_ct_series(tmp / "series")
    files[len(files) // 2].unlink()
    return ["segment", str(tmp / "series"), str(tmp / "out.nrrd"), "--model", model]


def dicom_duplicated_slice(tmp, model):
    files = write_ct_series(tmp / "series")
    shutil.copy(files[5], tmp / "series" / "copy_of_slice005.dcm")
    return ["segment", str(tmp / "series"), str(tmp / "out.nrrd"), "--model", model]


def thick_slices(tmp, model):
    ct, _ = make_phantom(size=(64, 56, 24), spacing=(6.0, 6.0, 10.0))
    ct.SetSpacing((6.0, 6.0, 50.0))
    return ["segment", str(_write(ct, tmp / "ct.nrrd")), str(tmp / "out.nii.gz"), "--model", model]


def tiny_spacing(tmp, model):
    ct, _ = make_phantom(size=(64, 56, 24), spacing=(6.0, 6.0, 10.0))
    ct.SetSpacing((0.01, 0.01, 0.01))
    return ["segment", str(_write(ct, tmp / "ct.nrrd")), str(tmp / "out.nii.gz"), "--model", model]


def gzip_bomb(tmp, model):
    # A few MB on disk whose header declares 2048 x 2048 x 512 voxels (4 GiB): refused from the header.
    big = sitk.Image([2048, 2048, 512], sitk.sitkInt16)
    path = tmp / "bomb.nrrd"
    sitk.WriteImage(big, str(path), useCompression=True)
    return ["segment", str(path), str(tmp / "out.nii.gz"), "--model", model]


def over_memory_limit(tmp, model):
    path, _ = _phantom(tmp)
    os.environ["ABDOMENSEG_MAX_MEMORY_GB"] = "0.001"
    return ["segment", str(path), str(tmp / "out.nii.gz"), "--model", model]


def output_under_a_file(tmp, model):
    path, _ = _phantom(tmp)
    (tmp / "afile").write_text("x")
    return ["segment", str(path), str(tmp / "afile" / "sub" / "out.nii.gz"), "--model", model]


def unknown_organ_segment(tmp, model):
    path, _ = _phantom(tmp)
    return ["segment", str(path), str(tmp / "out.nii.gz"), "--model", model, "--organs", "livre"]


def organ_the_model_lacks(tmp, model):
    path, _ = _phantom(tmp)
    return ["segment", str(path), str(tmp / "out.nii.gz"), "--model", model, "--organs", "esophagus"]


def sheared_to_nifti(tmp, model):
    ct, _ = make_phantom(size=(64, 56, 24), spacing=(6.0, 6.0, 10.0))
    tilt = np.deg2rad(15)
    ct.SetDirection([1, 0, 0, 0, 1, np.sin(tilt), 0, 0, np.cos(tilt)])  # gantry tilt: z leans towards y
    return ["segment", str(_write(ct, tmp / "tilted.nrrd")), str(tmp / "out.nii.gz"), "--model", model]


def _labels_pair(tmp):
    _, labels = _phantom(tmp)
    return _write(labels, tmp / "pred.nii.gz"), _write(labels, tmp / "ref.nii.gz")


def negative_tolerance(tmp, model):
    pred, ref = _labels_pair(tmp)
    return ["evaluate", str(pred), str(ref), "--tolerance", "-5"]


def nan_tolerance(tmp, model):
    pred, ref = _labels_pair(tmp)
    return ["evaluate", str(pred), str(ref), "--tolerance", "nan"]


def unknown_organ_evaluate(tmp, model):
    pred, ref = _labels_pair(tmp)
    return ["evaluate", str(pred), str(ref), "--organs", "livre"]


def csv_over_prediction(tmp, model):
    pred, ref = _labels_pair(tmp)
    return ["evaluate", str(pred), str(ref), "--csv", str(pred), "--overwrite"]


def ct_as_reference(tmp, model):
    pred, _ = _labels_pair(tmp)
    ct, _ = _phantom(tmp)
    return ["evaluate", str(pred), str(ct)]


def reference_in_another_convention(tmp, model):
    ref = shared(*EXAMPLE_LABELS)
    # named wrongly (unnamed, its convention is now detected: test_evaluate.py)
    return ["evaluate", str(ref), str(ref), "--prediction-labels", "totalseg", "--reference-labels", "abdomenseg"]


def truncated_reference(tmp, model):
    pred, ref = _labels_pair(tmp)
    data = ref.read_bytes()
    ref.write_bytes(data[: len(data) * 2 // 3])
    return ["evaluate", str(pred), str(ref)]


# Found by bench/fuzz_inputs.py: each was answered with exit 0 before.
def _nifti_edit(tmp, edit, name="ct.nii"):
    """The phantom CT as NIfTI with one header edit made through nibabel (the voxel data untouched)."""
    import nibabel as nib

    path, _ = _phantom(tmp, name)
    image = nib.load(str(path), mmap=False)  # the file is rewritten in place: no memory map onto it
    header = image.header.copy()
    edit(header)
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj), None, header), str(path))
    return path


def nii_cut_inside_last_352_bytes(tmp, model):
    path, _ = _phantom(tmp, "ct.nii")
    path.write_bytes(path.read_bytes()[:-100])  # was missed: nibabel's loaded header reports offset 0
    return ["segment", str(path), str(tmp / "out.nii.gz"), "--model", model]


def nii_pixdim_zero(tmp, model):
    path, _ = _phantom(tmp, "ct.nii")
    data = bytearray(path.read_bytes())
    data[84:88] = np.float32(0).tobytes()  # pixdim[2]: ITK read 1 mm where the sform says 6 mm
    path.write_bytes(bytes(data))
    return ["segment", str(path), str(tmp / "out.nii.gz"), "--model", model]


def nii_qform_sform_disagree(tmp, model):
    def edit(header):
        sform = header.get_sform()
        sform[:3, 3] += [40.0, 0.0, 0.0]
        header.set_sform(sform, code=1)
        header.set_qform(header.get_qform(), code=1)

    return ["segment", str(_nifti_edit(tmp, edit)), str(tmp / "out.nii.gz"), "--model", model]


def nii_more_data_than_declared(tmp, model):
    path, _ = _phantom(tmp, "ct.nii")
    data = bytearray(path.read_bytes())
    data[42:44] = (int.from_bytes(data[42:44], "little") - 1).to_bytes(2, "little")  # dim[1] - 1, data unchanged
    path.write_bytes(bytes(data))
    return ["segment", str(path), str(tmp / "out.nii.gz"), "--model", model]


def nrrd_more_data_than_declared(tmp, model):
    path, _ = _phantom(tmp, "ct.nrrd")
    sitk.WriteImage(sitk.ReadImage(str(path)), str(path), useCompression=False)
    text = path.read_bytes()
    head, body = text.split(b"\n\n", 1)
    head = head.replace(b"sizes: 64 56 24", b"sizes: 63 56 24")
    path.write_bytes(head + b"\n\n" + body)
    return ["segment", str(path), str(tmp / "out.nii.gz"), "--model", model]


def hu_scaled_by_100(tmp, model):
    ct, _ = make_phantom(size=(64, 56, 24), spacing=(6.0, 6.0, 10.0))
    return [
        "segment",
        str(_write(sitk.Cast(ct, sitk.sitkFloat32) * 100.0, tmp / "ct.nrrd")),
        str(tmp / "o.nii.gz"),
        "--model",
        model,
    ]


def hu_shifted_by_1000(tmp, model):
    ct, _ = make_phantom(size=(64, 56, 24), spacing=(6.0, 6.0, 10.0))
    return [
        "segment",
        str(_write(sitk.Cast(ct, sitk.sitkFloat32) - 1000.0, tmp / "ct.nrrd")),
        str(tmp / "o.nii.gz"),
        "--model",
        model,
    ]


def zero_filled_tail(tmp, model):
    ct, _ = make_phantom(size=(64, 56, 24), spacing=(6.0, 6.0, 10.0))
    array = sitk.GetArrayFromImage(ct)
    array[-3:] = 0  # what ITK gives for a file whose last slices are missing
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(ct)
    return ["segment", str(_write(out, tmp / "ct.nrrd")), str(tmp / "o.nii.gz"), "--model", model]


def field_of_view_too_small(tmp, model):
    ct, _ = make_phantom(size=(64, 56, 24), spacing=(6.0, 6.0, 10.0))
    ct.SetSpacing((0.6, 0.6, 1.0))  # a spacing shrunk tenfold: the body is 38 mm wide
    return ["segment", str(_write(ct, tmp / "ct.nrrd")), str(tmp / "o.nii.gz"), "--model", model]


def left_right_shrunk_tenfold(tmp, model):
    # Only x shrunk: 38 mm left-right, 336 front-back, 240 head-feet. The two widest directions pass; the body
    # cannot (the fuzz driver's spacing-axis1x0.1 on the example CT gave liver 17 mL and no kidneys, exit 0).
    ct, _ = make_phantom(size=(64, 56, 24), spacing=(6.0, 6.0, 10.0))
    ct.SetSpacing((0.6, 6.0, 10.0))
    return ["segment", str(_write(ct, tmp / "ct.nrrd")), str(tmp / "o.nii.gz"), "--model", model]


def dicom_middle_of_three_deleted(tmp, model):
    source = shared("dcmqi_ct3slice", "ct-3slice")
    shutil.copytree(source, tmp / "series")
    (tmp / "series" / "02.dcm").unlink()  # the two left are evenly spaced: only the numbering shows the hole
    return ["segment", str(tmp / "series"), str(tmp / "out.nrrd"), "--model", model]


def truncated_reference_with_extension(tmp, model):
    """TotalSegmentator writes a NIfTI header extension; the check once gave up on such headers."""
    import nibabel as nib

    pred, ref = _labels_pair(tmp)
    image = nib.load(str(ref), mmap=False)
    image.header.extensions.append(nib.nifti1.Nifti1Extension(6, b"labels written by another tool"))
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj), image.affine, image.header), str(ref))
    data = ref.read_bytes()
    ref.write_bytes(data[: len(data) // 2])
    return ["evaluate", str(pred), str(ref)]


def nifti_pair_cut_short(tmp, model):
    """.hdr + .img: ITK zero-fills a cut .img and says nothing; the pair format is refused outright."""
    _, labels = _phantom(tmp)
    sitk.WriteImage(labels, str(tmp / "ref.hdr"))
    img = tmp / "ref.img"
    img.write_bytes(img.read_bytes()[: img.stat().st_size // 2])
    return ["evaluate", str(_write(labels, tmp / "pred.nii.gz")), str(tmp / "ref.hdr")]


def nrrd_int16_t_more_data_than_declared(tmp, model):
    """NRRD's own type names (int16_t) were not in the size check's table."""
    path, _ = _phantom(tmp, "ct.nrrd")
    sitk.WriteImage(sitk.ReadImage(str(path)), str(path), useCompression=False)
    head, body = path.read_bytes().split(b"\n\n", 1)
    head = head.replace(b"type: short", b"type: int16_t").replace(b"sizes: 64 56 24", b"sizes: 64 56 20")
    path.write_bytes(head + b"\n\n" + body)
    return ["segment", str(path), str(tmp / "out.nii.gz"), "--model", model]


# The cases handled before this table existed stay in it.
def image_2d(tmp, model):
    return [
        "segment",
        str(_write(sitk.Image([32, 32], sitk.sitkInt16), tmp / "s.nii.gz")),
        str(tmp / "o.nii.gz"),
        "--model",
        model,
    ]


def image_4d(tmp, model):
    path = _write(sitk.JoinSeries([sitk.Image([16, 16, 16], sitk.sitkInt16)] * 2), tmp / "d.nii.gz")
    return ["segment", str(path), str(tmp / "o.nii.gz"), "--model", model]


def constant(tmp, model):
    blank = sitk.Image([32, 32, 32], sitk.sitkInt16) - 1000
    blank.SetSpacing((4.0, 4.0, 4.0))
    path = _write(blank, tmp / "blank.nii.gz")
    return ["segment", str(path), str(tmp / "o.nii.gz"), "--model", model]


def nan_voxel(tmp, model):
    array = sitk.GetArrayFromImage(make_phantom(size=(32, 32, 16))[0]).astype(np.float32)
    array[5, 5, 5] = np.nan
    return [
        "segment",
        str(_write(sitk.GetImageFromArray(array), tmp / "nan.nrrd")),
        str(tmp / "o.nii.gz"),
        "--model",
        model,
    ]


def label_map_as_input(tmp, model):
    path = _write(make_phantom(size=(32, 32, 16))[1], tmp / "labels.nii.gz")
    return ["segment", str(path), str(tmp / "o.nii.gz"), "--model", model]


def missing_file(tmp, model):
    return ["segment", str(tmp / "nothing_here.nii.gz"), str(tmp / "o.nii.gz"), "--model", model]


def text_file(tmp, model):
    (tmp / "report.nii.gz").write_text("this is a text file")
    return ["segment", str(tmp / "report.nii.gz"), str(tmp / "o.nii.gz"), "--model", model]


def output_is_input(tmp, model):
    path, _ = _phantom(tmp)
    return ["segment", str(path), str(path), "--model", model, "--overwrite"]


# Hostile files (issue 31): nothing the engine reads may crash it, hang it or leave a lock behind.
DEEP_JSON = "[" * 100_000 + "]" * 100_000  # was a RecursionError


def _phantom_folder(tmp):
    (tmp / "cases").mkdir()
    _phantom(tmp / "cases")
    return tmp / "cases"


def card_nested_deep(tmp, model):
    path, _ = _phantom(tmp)
    (tmp / "deep_model").mkdir()
    (tmp / "deep_model" / "card.json").write_text(DEEP_JSON)
    return ["segment", str(path), str(tmp / "out.nii.gz"), "--model", str(tmp / "deep_model")]


def card_not_json(tmp, model):
    path, _ = _phantom(tmp)
    (tmp / "bad_model").mkdir()
    (tmp / "bad_model" / "card.json").write_text('{"name": ')
    return ["segment", str(path), str(tmp / "out.nii.gz"), "--model", str(tmp / "bad_model")]


def _with_scheduler_file(tmp, model, content):
    pytest.importorskip("distributed")
    (tmp / "scheduler.json").write_text(content)
    cases = str(_phantom_folder(tmp))
    return ["segment", cases, str(tmp / "out"), "--model", model, "--scheduler-file", str(tmp / "scheduler.json")]


def scheduler_file_not_json(tmp, model):
    return _with_scheduler_file(tmp, model, "{not json")  # was an AssertionError inside Dask


def scheduler_file_nested_deep(tmp, model):
    return _with_scheduler_file(tmp, model, DEEP_JSON)


def scheduler_file_without_address(tmp, model):
    return _with_scheduler_file(tmp, model, '{"type": "Scheduler"}')


def scheduler_file_a_fifo(tmp, model):
    argv = _with_scheduler_file(tmp, model, "")
    (tmp / "scheduler.json").unlink()
    os.mkfifo(tmp / "scheduler.json")
    return argv


def training_config_a_fifo(tmp, model):
    os.mkfifo(tmp / "config.json")
    return ["train", str(tmp / "config.json"), "--out", str(tmp / "run")]


def training_config_nested_deep(tmp, model):
    (tmp / "config.json").write_text('{"data": ' + DEEP_JSON + "}")
    return ["train", str(tmp / "config.json"), "--out", str(tmp / "run")]


def input_fifo(tmp, model):
    os.mkfifo(tmp / "ct.nii.gz")  # opening it blocked forever, holding the output's lock
    return ["segment", str(tmp / "ct.nii.gz"), str(tmp / "out.nii.gz"), "--model", model]


def input_socket(tmp, model):
    import socket

    server = socket.socket(socket.AF_UNIX)
    server.bind(str(tmp / "ct.nrrd"))
    server.close()  # the socket file stays
    return ["segment", str(tmp / "ct.nrrd"), str(tmp / "out.nii.gz"), "--model", model]


def input_device(tmp, model):
    return ["segment", "/dev/zero", str(tmp / "out.nii.gz"), "--model", model]


def fifo_among_the_cases_by_glob(tmp, model):
    os.mkfifo(tmp / "a.nii.gz")
    return ["segment", str(tmp / "*.nii.gz"), str(tmp / "out"), "--model", model]


def output_name_over_255_bytes(tmp, model):
    path, _ = _phantom(tmp)
    return ["segment", str(path), str(tmp / ("o" * 250 + ".nii.gz")), "--model", model]


def file_where_the_qc_folder_goes(tmp, model):
    cases = _phantom_folder(tmp)
    (tmp / "out").mkdir()
    (tmp / "out" / "qc").write_text("a file named qc")
    return ["segment", str(cases), str(tmp / "out"), "--model", model]


# -- issue 31 round two: DICOM variants ---------------------------------------------------------------
# Enhanced multi-frame objects are made from a classic series with highdicom (test_io_dicom_multiframe.py).
def _enhanced(tmp, frames=None, edit=None):
    from test_io_dicom_multiframe import convert_to_multiframe, rewrite_frames

    files = write_ct_series(tmp / "series")
    path = convert_to_multiframe(files, tmp / "enhanced" / "ct.dcm")
    shutil.rmtree(tmp / "series")
    return rewrite_frames(path, list(range(len(files))) if frames is None else frames, edit)


def multiframe_one_frame_missing(tmp, model):
    """The audit: GDCM read it with 1.0 mm spacing on every axis, exit 0."""
    path = _enhanced(tmp, [k for k in range(20) if k != 7])
    return ["segment", str(path), str(tmp / "out.nrrd"), "--model", model]


def multiframe_frames_shuffled_and_one_missing(tmp, model):
    order = [int(k) for k in np.random.default_rng(5).permutation(20) if k != 12]
    return ["segment", str(_enhanced(tmp, order).parent), str(tmp / "out.nrrd"), "--model", model]


def multiframe_one_frame_pixel_spacing(tmp, model):
    from test_io_dicom_multiframe import move_to_per_frame

    def widen_frame_5(ds):
        move_to_per_frame(ds, "PixelMeasuresSequence")
        ds.PerFrameFunctionalGroupsSequence[4].PixelMeasuresSequence[0].PixelSpacing = [0.95, 0.95]

    return ["segment", str(_enhanced(tmp, edit=widen_frame_5)), str(tmp / "out.nrrd"), "--model", model]


def two_multiframe_files_in_a_folder(tmp, model):
    path = _enhanced(tmp)
    shutil.copyfile(path, path.parent / "ct_again.dcm")
    return ["segment", str(path.parent), str(tmp / "out.nrrd"), "--model", model]


def series_one_slice_pixel_spacing_3_5(tmp, model):
    from test_io_dicom_series import set_pixel_spacing

    files = write_ct_series(tmp / "series")
    set_pixel_spacing(files[10], (3.5, 0.8))  # the audit: one slice 3.5 where the others are 3.0, accepted
    return ["segment", str(tmp / "series"), str(tmp / "out.nrrd"), "--model", model]


def series_one_slice_fewer_rows(tmp, model):
    from test_io_dicom_series import crop_rows

    files = write_ct_series(tmp / "series")
    crop_rows(files[4], 48)
    return ["segment", str(tmp / "series"), str(tmp / "out.nrrd"), "--model", model]


def _retag_monochrome1(paths):
    from test_io_dicom_multiframe import retag_monochrome1

    for path in paths:
        retag_monochrome1(path)


def monochrome1_series(tmp, model):
    _retag_monochrome1(write_ct_series(tmp / "series"))
    return ["segment", str(tmp / "series"), str(tmp / "out.nrrd"), "--model", model]


def multiframe_to_dicom_seg(tmp, model):
    return ["segment", str(_enhanced(tmp).parent), str(tmp / "seg.dcm"), "--model", model]


def monochrome1_multiframe(tmp, model):
    path = _enhanced(tmp)
    _retag_monochrome1([path])
    return ["segment", str(path), str(tmp / "out.nrrd"), "--model", model]


DICOM_ROUND_TWO = [
    (multiframe_one_frame_missing, "1 frame missing between frame"),
    (multiframe_frames_shuffled_and_one_missing, "1 frame missing between frame"),
    (multiframe_one_frame_pixel_spacing, "frame 5 has PixelSpacing 0.95\\0.95 mm"),
    (two_multiframe_files_in_a_folder, "holds 2 multi-frame DICOM objects"),
    (series_one_slice_pixel_spacing_3_5, "'slice010.dcm' has PixelSpacing 3.5\\0.8 mm"),
    (series_one_slice_fewer_rows, "'slice004.dcm' has image size 64x48"),
    (monochrome1_series, "MONOCHROME1"),
    (monochrome1_multiframe, "MONOCHROME1"),
    (multiframe_to_dicom_seg, "holds a multi-frame (enhanced) DICOM image"),
]


def test_shuffled_multiframe_is_segmented_in_the_series_grid(tmp_path, tiny_package):
    """Frames stored out of order (GDCM: 1.0 mm on every axis) give the series' own grid."""
    from test_io_dicom_multiframe import convert_to_multiframe, rewrite_frames

    folder = shared("dcmqi_ct3slice", "ct-3slice")
    path = rewrite_frames(convert_to_multiframe(sorted(folder.glob("*.dcm")), tmp_path / "ct3.dcm"), [2, 0, 1])
    assert sitk.ReadImage(str(path)).GetSpacing() == pytest.approx((1.0, 1.0, 1.0))  # the audit's reading
    from test_io_dicom_seg import _for_thin_slabs  # 3 slices of 3 mm: under every default minimum extent

    model = _for_thin_slabs(tiny_package, tmp_path / "model")
    assert main(["segment", str(path), str(tmp_path / "seg.nrrd"), "--model", str(model.path)]) in (0, 3)
    out = sitk.ReadImage(str(tmp_path / "seg.nrrd"))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    series = reader.Execute()
    assert out.GetSize() == series.GetSize() == (512, 512, 3)
    assert np.allclose(out.GetSpacing(), series.GetSpacing(), atol=1e-5)
    assert np.allclose(out.GetOrigin(), series.GetOrigin(), atol=1e-3)
    assert np.allclose(out.GetDirection(), series.GetDirection(), atol=1e-6)


# -- issue 31 round two: evaluate ---------------------------------------------------------------------
def _labels_with(tmp, edit, name, dtype):
    """The phantom's labels edited (`edit(array)`) and written as `name` in `dtype`; the intact labels as pred."""
    pred, _ = _labels_pair(tmp)
    labels = sitk.ReadImage(str(pred))
    array = sitk.GetArrayFromImage(labels).astype(dtype)
    edit(array)
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(labels)
    return pred, _write(image, tmp / name)


def _one_nan(array):
    array[5, 6, 7] = np.nan  # z, y, x: voxel index (7, 6, 5)


def _background_minus_one(array):
    array[array == 0] = -1


def reference_with_a_nan_voxel(tmp, model):
    # NRRD keeps the NaN (ITK's NIfTI reader turns a NaN into 0 before we see it: docs/evaluation.md)
    pred, ref = _labels_with(tmp, _one_nan, "ref.nrrd", np.float32)
    return ["evaluate", str(pred), str(ref)]


def reference_with_a_nan_voxel_in_nifti(tmp, model):
    # ITK's NIfTI reader would give the NaN as 0 (background): the file is scanned with nibabel when read
    pred, ref = _labels_with(tmp, _one_nan, "ref_nan.nii.gz", np.float32)
    return ["evaluate", str(pred), str(ref), "--reference-labels", "abdomenseg"]


def scan_with_a_nan_voxel_in_nifti(tmp, model):
    # a CT padded with NaN would otherwise be read with water (0 HU) there
    array = sitk.GetArrayFromImage(make_phantom(size=(64, 56, 24), spacing=(6.0, 6.0, 10.0))[0]).astype(np.float32)
    array[5, 6, 7] = np.nan
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((6.0, 6.0, 10.0))
    return ["segment", str(_write(image, tmp / "nan.nii.gz")), str(tmp / "o.nii.gz"), "--model", model]


def prediction_with_a_nan_voxel(tmp, model):
    pred, bad = _labels_with(tmp, _one_nan, "bad.nrrd", np.float32)
    return ["evaluate", str(bad), str(pred), "--reference-labels", "abdomenseg"]


def reference_with_background_minus_one(tmp, model):
    pred, ref = _labels_with(tmp, _background_minus_one, "ref_m1.nii.gz", np.int16)
    return ["evaluate", str(pred), str(ref)]


def prediction_with_background_minus_one(tmp, model):
    pred, bad = _labels_with(tmp, _background_minus_one, "bad_m1.nii.gz", np.int16)
    return ["evaluate", str(bad), str(pred), "--reference-labels", "abdomenseg"]


def reference_with_a_negative_organ_value(tmp, model):
    pred, ref = _labels_with(tmp, lambda a: a.__setitem__(a == 2, -2), "ref_neg.nii.gz", np.int16)
    return ["evaluate", str(pred), str(ref), "--reference-labels", "abdomenseg"]


def reference_covering_none_of_the_prediction(tmp, model):
    """The reference's grid: the upper quarter of the prediction's, where neither map holds an organ (the
    prediction: the kidneys only, lower down)."""
    pred, _ = _labels_pair(tmp)
    labels = sitk.ReadImage(str(pred))
    array = sitk.GetArrayFromImage(labels)
    kidneys = sitk.GetImageFromArray(np.where(np.isin(array, [3, 4]), array, 0).astype(np.uint8))
    kidneys.CopyInformation(labels)
    blank = sitk.Image(labels.GetSize(), sitk.sitkUInt8)
    blank.CopyInformation(labels)
    top = labels.GetSize()[2] * 3 // 4
    return [
        "evaluate",
        str(_write(kidneys, tmp / "kidneys.nii.gz")),
        str(_write(blank[:, :, top:], tmp / "upper_quarter.nii.gz")),
        "--reference-labels",
        "abdomenseg",
    ]


EVALUATE_ROUND_TWO = [
    (
        reference_with_a_nan_voxel,
        "the reference is a label map with 1 NaN or infinite voxel (the first at voxel index (7, 6, 5)",
    ),
    (prediction_with_a_nan_voxel, "the prediction is a label map with 1 NaN or infinite voxel"),
    (reference_with_a_nan_voxel_in_nifti, "holds 1 NaN or infinite voxel (the first at voxel index (7, 6, 5)"),
    (scan_with_a_nan_voxel_in_nifti, "holds 1 NaN or infinite voxel (the first at voxel index (7, 6, 5)"),
    (reference_with_background_minus_one, "the reference's background is -1"),
    (prediction_with_background_minus_one, "changeMap={-1: 0}"),
    (reference_with_a_negative_organ_value, "the reference holds negative values (-2)"),
    (reference_covering_none_of_the_prediction, "the reference's field of view covers none of the prediction's organs"),
]


def test_evaluate_reference_over_the_upper_quarter_scores_inside_it(tmp_path, capsys):
    """The audit's case (right kidney 0.61 for 0.92, exit 0): the prediction below the reference's grid is no false
    positive; exit 0, the outside share said, the CSV written and nothing else."""
    pred, _ = _labels_pair(tmp_path)
    labels = sitk.ReadImage(str(pred))
    ref = _write(labels[:, :, labels.GetSize()[2] // 2 :], tmp_path / "upper_half.nii.gz")  # splits the kidneys
    before = set(tmp_path.iterdir())
    args = ["evaluate", str(pred), str(ref), "--reference-labels", "abdomenseg", "--csv", str(tmp_path / "m.csv")]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "lie outside the reference's field of view and are not scored" in err
    import csv

    rows = {r["organ"]: r for r in csv.DictReader(open(tmp_path / "m.csv", encoding="utf-8"))}
    assert (
        float(rows["kidney_right"]["dice"]) == 1.0 and 0 < float(rows["kidney_right"]["outside_reference_fraction"]) < 1
    )
    assert set(tmp_path.iterdir()) - before == {tmp_path / "m.csv", tmp_path / "m_summary.csv"}


# -- issue 31 round two: formats, encodings and disk faults -----------------------------------------
# Compression is read from the bytes, not the name; detached data files are named with their header; formats the
# reader cannot take (NIfTI-2, complex voxels) are named; an output name that is a symbolic link is refused.
def _phantom_bytes(tmp, name, compress):
    """The phantom CT written under `name`, with ITK's compression switched by `compress` (ITK picks the
    format from the name)."""
    ct, _ = make_phantom(size=(64, 56, 24), spacing=(6.0, 6.0, 10.0))
    sitk.WriteImage(ct, str(tmp / name), useCompression=compress)
    return tmp / name


def _cut(path, fraction):
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * fraction)])
    return path


def _segment_argv(tmp, model, path, out="out.nii.gz"):
    return ["segment", str(path), str(tmp / out), "--model", model]


def nii_gz_holding_raw_data_cut_to_60_percent(tmp, model):
    """Was read zero-filled with exit 0: the check could not gunzip it, and ITK reads raw data under .gz."""
    raw = _phantom_bytes(tmp, "ct.nii", False)
    raw.rename(tmp / "ct.nii.gz")
    return _segment_argv(tmp, model, _cut(tmp / "ct.nii.gz", 0.6))


def gzipped_nii_named_nii(tmp, model):
    """ITK finds no reader for it; it was "could not be read ... give a NIfTI"."""
    _phantom_bytes(tmp, "ct.nii.gz", True).rename(tmp / "ct.nii")
    return _segment_argv(tmp, model, tmp / "ct.nii")


def nrrd_marked_gzip_holding_raw_data_cut(tmp, model):
    """ITK reads raw data marked gzip as it is: the check now counts it as it is."""
    path = _phantom_bytes(tmp, "ct.nrrd", False)
    head, body = path.read_bytes().split(b"\n\n", 1)
    path.write_bytes(head.replace(b"encoding: raw", b"encoding: gzip") + b"\n\n" + body[: len(body) // 2])
    return _segment_argv(tmp, model, path)


def nrrd_marked_raw_holding_gzip_data(tmp, model):
    import gzip

    path = _phantom_bytes(tmp, "ct.nrrd", False)
    head, body = path.read_bytes().split(b"\n\n", 1)
    path.write_bytes(head + b"\n\n" + gzip.compress(body))
    return _segment_argv(tmp, model, path)


def nhdr_data_file_cut(tmp, model):
    """ITK's detached header ends without a blank line: the size check skipped every .nhdr."""
    _phantom_bytes(tmp, "ct.nhdr", False)
    _cut(tmp / "ct.raw", 0.5)
    return _segment_argv(tmp, model, tmp / "ct.nhdr")


def nhdr_data_file_missing(tmp, model):
    _phantom_bytes(tmp, "ct.nhdr", True)
    (tmp / "ct.raw.gz").unlink()
    return _segment_argv(tmp, model, tmp / "ct.nhdr")


def mhd_raw_cut(tmp, model):
    """Was "No such file or directory" about the .mhd, which exists."""
    _phantom_bytes(tmp, "ct.mhd", False)
    _cut(tmp / "ct.raw", 0.6)
    return _segment_argv(tmp, model, tmp / "ct.mhd")


def mhd_raw_missing(tmp, model):
    _phantom_bytes(tmp, "ct.mhd", False)
    (tmp / "ct.raw").unlink()
    return _segment_argv(tmp, model, tmp / "ct.mhd")


def mhd_zraw_cut(tmp, model):
    _phantom_bytes(tmp, "ct.mhd", True)
    _cut(tmp / "ct.zraw", 0.5)
    return _segment_argv(tmp, model, tmp / "ct.mhd")


def mha_cut(tmp, model):
    return _segment_argv(tmp, model, _cut(_phantom_bytes(tmp, "ct.mha", False), 0.6))


def mha_compressed_cut(tmp, model):
    return _segment_argv(tmp, model, _cut(_phantom_bytes(tmp, "ct.mha", True), 0.6))


def mha_more_data_than_declared(tmp, model):
    path = _phantom_bytes(tmp, "ct.mha", False)
    path.write_bytes(path.read_bytes().replace(b"DimSize = 64 56 24", b"DimSize = 64 56 23"))
    return _segment_argv(tmp, model, path)


def _nibabel_copy(tmp, kind, dtype=None, name="ct.nii.gz"):
    import nibabel as nib

    source = nib.load(str(_phantom_bytes(tmp, "source.nii", False)), mmap=False)
    data = np.asanyarray(source.dataobj)
    nib.save(kind(data.astype(dtype) if dtype else data, source.affine), str(tmp / name))
    (tmp / "source.nii").unlink()
    return tmp / name


def nifti2(tmp, model):
    import nibabel as nib

    return _segment_argv(tmp, model, _nibabel_copy(tmp, nib.Nifti2Image))


def nifti2_uncompressed(tmp, model):
    import nibabel as nib

    return _segment_argv(tmp, model, _nibabel_copy(tmp, nib.Nifti2Image, name="ct.nii"))


def complex64_nifti(tmp, model):
    import nibabel as nib

    return _segment_argv(tmp, model, _nibabel_copy(tmp, nib.Nifti1Image, np.complex64))


def complex128_nifti(tmp, model):
    import nibabel as nib

    return _segment_argv(tmp, model, _nibabel_copy(tmp, nib.Nifti1Image, np.complex128))


def complex_reference(tmp, model):
    import nibabel as nib

    pred, _ = _labels_pair(tmp)
    ref = _nibabel_copy(tmp, nib.Nifti1Image, np.complex64, name="ref.nii.gz")
    return ["evaluate", str(pred), str(ref)]


def output_a_dangling_symlink(tmp, model):
    """Failed after inference as "another process wrote it"."""
    path, _ = _phantom(tmp)
    (tmp / "out.nii.gz").symlink_to(tmp / "gone" / "labels.nii.gz")
    return _segment_argv(tmp, model, path)


def output_a_symlink_to_a_file_with_overwrite(tmp, model):
    """--overwrite would replace the link itself and leave the file it points to as it was."""
    path, _ = _phantom(tmp)
    (tmp / "elsewhere.nii.gz").write_bytes(b"the file the link points to")
    (tmp / "out.nii.gz").symlink_to(tmp / "elsewhere.nii.gz")
    return [*_segment_argv(tmp, model, path), "--overwrite"]


def folder_run_output_a_dangling_symlink(tmp, model):
    cases = _phantom_folder(tmp)
    (tmp / "out").mkdir()
    (tmp / "out" / "ct.nii.gz").symlink_to(tmp / "gone.nii.gz")
    return ["segment", str(cases), str(tmp / "out"), "--model", model]


def qc_png_a_dangling_symlink(tmp, model):
    path, _ = _phantom(tmp)
    (tmp / "sheet.png").symlink_to(tmp / "gone.png")
    return [*_segment_argv(tmp, model, path), "--qc-png", str(tmp / "sheet.png")]


FILES_ROUND_TWO = [
    (nii_gz_holding_raw_data_cut_to_60_percent, "is truncated: its header declares 172,384 bytes"),
    (gzipped_nii_named_nii, "is gzip-compressed but its name ends in .nii"),
    (nrrd_marked_gzip_holding_raw_data_cut, "is truncated: its header declares 172,032 bytes"),
    (nrrd_marked_raw_holding_gzip_data, "declares raw (uncompressed) image data but its data is gzip-compressed"),
    (nhdr_data_file_cut, "(the data file of"),
    (nhdr_data_file_missing, "that the header"),
    (mhd_raw_cut, "ct.raw' (the data file of"),
    (mhd_raw_missing, "ct.raw' that the header"),
    (mhd_zraw_cut, "ct.zraw' (the data file of"),
    (mha_cut, "is truncated: its header declares 172,032 bytes"),
    (mha_compressed_cut, "is truncated: its compressed image data stop after"),
    (mha_more_data_than_declared, "more image data than its header declares"),
    (nifti2, "is a NIfTI-2 file"),
    (nifti2_uncompressed, "convert it to NIfTI-1"),
    (complex64_nifti, "complex-valued voxels (complex of 32-bit float)"),
    (complex128_nifti, "complex-valued voxels (complex of 64-bit float)"),
    (complex_reference, "complex-valued voxels"),
    (output_a_dangling_symlink, "gone/labels.nii.gz', which does not exist"),
    (output_a_symlink_to_a_file_with_overwrite, "is a symbolic link to"),
    (folder_run_output_a_dangling_symlink, "which does not exist"),
    (qc_png_a_dangling_symlink, "is a symbolic link"),
]


def test_a_nii_gz_holding_raw_data_whole_is_read_as_it_is(tmp_path, tiny_package):
    """The size check counts uncompressed bytes as they are: the intact file is segmented in its grid."""
    raw = _phantom_bytes(tmp_path, "ct.nii", False)
    raw.rename(tmp_path / "ct.nii.gz")
    assert main(_segment_argv(tmp_path, str(tiny_package.path), tmp_path / "ct.nii.gz")) in (0, EXIT_FLAGGED)
    written, source = sitk.ReadImage(str(tmp_path / "out.nii.gz")), sitk.ReadImage(str(tmp_path / "ct.nii.gz"))
    assert written.GetSize() == source.GetSize() and np.allclose(written.GetOrigin(), source.GetOrigin())


@pytest.mark.parametrize("name,compress", [("ct.mhd", False), ("ct.mhd", True), ("ct.nhdr", True)])
def test_intact_detached_data_files_pass_the_size_check(tmp_path, name, compress):
    from AbdomenSegLib.io.images import read_image

    path = _phantom_bytes(tmp_path, name, compress)
    assert read_image(path).GetSize() == (64, 56, 24)


def test_the_nifti2_advice_converts_the_file(tmp_path):
    """The fix the NIfTI-2 refusal gives works: the converted file is read, voxels and grid unchanged."""
    import nibabel as nib

    from AbdomenSegLib.io.images import read_image

    path = _nibabel_copy(tmp_path, nib.Nifti2Image)
    nib.save(nib.Nifti1Image.from_image(nib.load(str(path))), str(tmp_path / "scan.nii.gz"))
    converted = read_image(tmp_path / "scan.nii.gz")
    assert converted.GetSize() == (64, 56, 24) and np.allclose(converted.GetSpacing(), (6.0, 6.0, 10.0))


@pytest.mark.parametrize("make", [output_a_dangling_symlink, complex64_nifti, nifti2, gzipped_nii_named_nii])
def test_refused_before_the_model_is_resolved(tmp_path, tiny_package, monkeypatch, capsys, make):
    """The output's name and the input's header are checked before the model is looked up and loaded."""
    import AbdomenSegLib.models.choice as choice

    def no_model(*args, **kwargs):
        raise AssertionError("the model was resolved before the refusal")

    argv = make(tmp_path, str(tiny_package.path))
    monkeypatch.setattr(choice, "resolve", no_model)
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_a_dangling_symlink_output_stays_as_it_was(tmp_path, tiny_package):
    assert main(output_a_dangling_symlink(tmp_path, str(tiny_package.path))) == 2
    assert (tmp_path / "out.nii.gz").is_symlink() and not (tmp_path / "gone").exists()


def test_nrrd_marked_gzip_holding_raw_data_whole_is_read(tmp_path):
    """ITK reads it as it is, so the size check counts it as it is (it was refused as "not a gzipped file")."""
    from AbdomenSegLib.io.images import read_image

    path = _phantom_bytes(tmp_path, "ct.nrrd", False)
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    head, body = path.read_bytes().split(b"\n\n", 1)
    path.write_bytes(head.replace(b"encoding: raw", b"encoding: gzip") + b"\n\n" + body)
    assert np.array_equal(sitk.GetArrayFromImage(read_image(path)), expected)


# -- issue 31 round two: intensities and geometry (result check) ---------------------------------------------
def _phantom_ct(edit, dtype=None):
    ct, _ = make_phantom(size=(64, 56, 24), spacing=(6.0, 6.0, 10.0))
    array = edit(sitk.GetArrayFromImage(ct).astype(np.float32))
    out = sitk.GetImageFromArray(array if dtype is None else array.astype(dtype))
    out.CopyInformation(ct)
    return out


def _segment(tmp, image, model, *extra):
    return ["segment", str(_write(image, tmp / "ct.nrrd")), str(tmp / "o.nii.gz"), "--model", model, *extra]


def negated_hu(tmp, model):
    """A CT whose values were negated (-HU): air at +1000, bone at -1000 and below."""
    return _segment(tmp, _phantom_ct(lambda a: -a), model)


def monochrome1_inverted(tmp, model):
    """A CT inverted within its range (max + min - value), as a MONOCHROME1 series read as stored gives it."""
    return _segment(tmp, _phantom_ct(lambda a: a.max() + a.min() - a), model)


def windowed_uint8_inverted(tmp, model):
    """BTCV-style 0-255 windowed CT (--input-intensity btcv_uint8), stored inverted (255 - value)."""
    window = lambda a: np.clip((a + 125.0) * 255.0 / 400.0, 0, 255)  # noqa: E731 - the stored BTCV window
    return _segment(tmp, _phantom_ct(lambda a: 255 - window(a), np.uint8), model, "--input-intensity", "btcv_uint8")


def ct_to_the_mr_model(tmp, model):
    """A CT in HU given to the any-sequence MR model, which would segment it (wrongly) without a word."""
    return _segment(tmp, _phantom_ct(lambda a: a), "mr-any-3d-unet")


def windowed_ct_to_the_mr_model(tmp, model):
    window = lambda a: np.clip((a + 125.0) * 255.0 / 400.0, 0, 255)  # noqa: E731
    return _segment(tmp, _phantom_ct(window, np.uint8), "mr-any-3d-unet", "--input-intensity", "btcv_uint8")


INTENSITY_ROUND_TWO = [
    (negated_hu, "values look inverted (bone darker than air"),
    (negated_hu, "multiply them by -1"),
    (monochrome1_inverted, "values look inverted (bone darker than air"),
    (monochrome1_inverted, "MONOCHROME1"),
    (windowed_uint8_inverted, "values look inverted"),
    (ct_to_the_mr_model, "looks like a CT in HU (air at -1000"),
    (ct_to_the_mr_model, "use --model btcv-ct-3d-unet"),
    (windowed_ct_to_the_mr_model, "a windowed CT, but the model is an MR model. use --model btcv-ct-3d-unet"),
]


def _oblique(image, axis, degrees, interpolator, fill):
    """`image` resampled onto a grid turned `degrees` about the LPS `axis` through its centre, covering all of it:
    the same anatomy in patient coordinates, stored obliquely."""
    from AbdomenSegLib.io.phantom import rotation

    centre = np.array(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()]))
    direction = rotation("xyz"[axis], degrees) @ np.array(image.GetDirection()).reshape(3, 3)
    spacing, size = np.array(image.GetSpacing()), np.array(image.GetSize())
    old = np.array(image.GetDirection()).reshape(3, 3)
    extent = np.abs(direction.T @ old @ np.diag(spacing * size)).sum(axis=1)
    new_size = np.ceil(extent / spacing).astype(int)
    grid = sitk.Image([int(n) for n in new_size], image.GetPixelID())
    grid.SetSpacing(tuple(spacing))
    grid.SetDirection(direction.ravel().tolist())
    grid.SetOrigin(tuple(centre - direction @ (spacing * (new_size - 1) / 2)))
    return sitk.Resample(image, grid, sitk.Transform(), interpolator, fill)


@pytest.mark.slow
def test_oblique_example_is_segmented_right_and_not_flagged(tmp_path, capsys):
    """Issue case: the example CT on a grid turned 45 degrees about the head-feet axis. The network sees it upright
    (pipeline.to_model_space resamples obliques onto the model's axes), and the result check, in patient
    coordinates, raises nothing: before, right kidney Dice 0.40 and a warning."""
    from AbdomenSegLib.core.organs import BY_NAME, convert_labels

    ct = sitk.ReadImage(str(shared(*EXAMPLE_CT)))
    reference = sitk.ReadImage(str(shared(*EXAMPLE_LABELS)))
    ours = sitk.GetImageFromArray(convert_labels(sitk.GetArrayFromImage(reference), "totalseg").astype(np.uint8))
    ours.CopyInformation(reference)
    src = _write(_oblique(ct, 2, 45.0, sitk.sitkLinear, -1024), tmp_path / "oblique.nii.gz")
    expected = sitk.GetArrayFromImage(_oblique(ours, 2, 45.0, sitk.sitkNearestNeighbor, 0))
    assert main(["segment", str(src), str(tmp_path / "out.nii.gz")]) == 0
    assert "warning" not in capsys.readouterr().err
    got = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out.nii.gz")))
    for organ in ("liver", "spleen", "kidney_right", "kidney_left"):
        a, b = got == BY_NAME[organ].label, expected == BY_NAME[organ].label
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.8, organ


# -- issue 31 round two: model packages and thin volumes ---
def _edited_package(tmp, model, edit):
    """A copy of the package `model` whose card.json `edit` changes (its weights and sha256 untouched)."""
    import json

    package = tmp / "edited_model"
    shutil.copytree(model, package)
    card = json.loads((package / "card.json").read_text())
    edit(card)
    (package / "card.json").write_text(json.dumps(card))
    path, _ = _phantom(tmp)
    return ["segment", str(path), str(tmp / "out.nii.gz"), "--model", str(package)]


def card_window_512_cubed(tmp, model):
    # 134 M voxels a window: passed the schema, then wanted ~100 GB (the memory estimate ignored the window)
    return _edited_package(tmp, model, lambda card: card["inference"].update(roi_size=[512, 512, 512]))


def card_channels_4096_x5(tmp, model):
    # a UNet of 4.5 billion parameters (18 GB), built in full before the strict weight load failed
    def edit(card):
        card["architecture"]["args"].update(channels=[4096] * 5, strides=[2, 2, 2, 2])

    return _edited_package(tmp, model, edit)


def card_channels_over_its_weights(tmp, model):
    # fits the memory limit, but not the weights file: refused from the file's size, before building
    return _edited_package(tmp, model, lambda card: card["architecture"]["args"].update(channels=[256, 512, 1024]))


def _slab(tmp, model, slices, spacing_z):
    ct, _ = make_phantom(size=(64, 56, slices), spacing=(6.0, 6.0, spacing_z))
    return ["segment", str(_write(ct, tmp / "slab.nii.gz")), str(tmp / "out.nii.gz"), "--model", model]


def two_slices(tmp, model):
    return _slab(tmp, model, 2, 3.0)  # the audit's case: right kidney 0.00, liver 0.48, exit 0 with notes only


def five_slices(tmp, model):
    return _slab(tmp, model, 5, 3.0)


def four_thick_slices(tmp, model):
    return _slab(tmp, model, 4, 15.0)  # 60 mm: long enough, but in too few slices


MODEL_ROUND_TWO = [
    (card_window_512_cubed, "inference.roi_size [512, 512, 512] with architecture.args.channels"),
    (card_window_512_cubed, "over the memory limit of 16.0 GB"),
    (
        card_channels_4096_x5,
        "architecture.args.channels [4096, 4096, 4096, 4096, 4096] make a network of 4,531 M parameters",
    ),
    (card_channels_over_its_weights, "make 28,403,466 parameters (at least 56.8 MB), the file holds"),
    (two_slices, "has 2 slices (6 mm) along z (head-foot); model 'tiny-test' needs at least 5 slices and 48 mm"),
    (five_slices, "has 5 slices (15 mm) along z"),
    (four_thick_slices, "has 4 slices (60 mm) along z"),
]


def test_a_scan_just_above_the_minimum_runs_and_is_flagged_with_the_reason(tmp_path, tiny_package, capsys):
    """The tiny model's window is 32 x 5 mm: refused under 48 mm (0.3 of it), flagged under 96 mm (0.6)."""
    argv = _slab(tmp_path, str(tiny_package.path), 10, 5.0)  # 50 mm
    assert main(argv) == EXIT_FLAGGED
    err = capsys.readouterr().err
    assert "warning: slab: the scan covers only 50 mm along z (head-foot)" in err, err
    assert "shorter than 96 mm there" in err
    assert (tmp_path / "out.nii.gz").is_file()
    assert sitk.ReadImage(str(tmp_path / "out.nii.gz")).GetSize() == (64, 56, 10)  # in the input's grid


def test_a_scan_past_the_flag_length_is_not_flagged_as_short(tmp_path, tiny_package, capsys):
    main(_slab(tmp_path, str(tiny_package.path), 10, 10.0))  # 100 mm
    assert "short_input" not in capsys.readouterr().err
    assert (tmp_path / "out.nii.gz").is_file()


def test_a_tiny_valid_card_edited_within_bounds_still_loads(tmp_path, tiny_package, capsys):
    """The memory bounds leave a runnable card alone: a smaller window (one stride multiple) runs."""
    argv = _edited_package(
        tmp_path, str(tiny_package.path), lambda card: card["inference"].update(roi_size=[16, 32, 32])
    )
    assert main(argv) in (0, EXIT_FLAGGED)
    assert (tmp_path / "out.nii.gz").is_file()


HOSTILE = [
    (card_nested_deep, "levels deep"),
    (card_not_json, "not valid JSON"),
    (scheduler_file_not_json, "scheduler file"),
    (scheduler_file_nested_deep, "levels deep"),
    (scheduler_file_without_address, "holds no scheduler address"),
    (training_config_nested_deep, "levels deep"),
    (scheduler_file_a_fifo, "is a named pipe (FIFO), not a regular file. give the path of a file"),
    (training_config_a_fifo, "is a named pipe (FIFO), not a regular file"),
    (input_fifo, "named pipe (FIFO), not a regular file"),
    (input_socket, "a socket, not a regular file"),
    (input_device, "a device, not a regular file"),
    (output_name_over_255_bytes, "more than the 255"),
    (file_where_the_qc_folder_goes, "is a file, not a folder"),
]

REFUSED = [
    (truncated_gz, "truncated"),
    (truncated_nii, "truncated"),
    (dicom_missing_slice, "missing between"),
    (dicom_duplicated_slice, "copy_of_slice005.dcm"),
    (thick_slices, "spacing"),
    (tiny_spacing, "spacing"),
    (gzip_bomb, "voxels"),
    (over_memory_limit, "memory"),
    (output_under_a_file, "is a file"),
    (unknown_organ_segment, "livre"),
    (organ_the_model_lacks, "does not segment esophagus"),
    (sheared_to_nifti, "not perpendicular"),
    (negative_tolerance, "tolerance"),
    (nan_tolerance, "tolerance"),
    (unknown_organ_evaluate, "livre"),
    (csv_over_prediction, ".csv"),
    (ct_as_reference, "not a label map"),
    (reference_in_another_convention, "--reference-labels"),
    (truncated_reference, "truncated"),
    (image_2d, "2D image"),
    (image_4d, "4D image"),
    (constant, "constant"),
    (nan_voxel, "NaN"),
    (label_map_as_input, "label map"),
    (missing_file, "does not exist"),
    (text_file, "could not be read"),
    (output_is_input, "overwrite the input"),
    (nii_cut_inside_last_352_bytes, "truncated"),
    (nii_pixdim_zero, "pixdim"),
    (nii_qform_sform_disagree, "qform and sform disagree"),
    (nii_more_data_than_declared, "more image data"),
    (nrrd_more_data_than_declared, "more image data"),
    (hu_scaled_by_100, "soft-tissue range"),
    (hu_shifted_by_1000, "soft-tissue range"),
    (zero_filled_tail, "exactly 0 HU"),
    (field_of_view_too_small, "too narrow for an abdomen"),
    (left_right_shrunk_tenfold, "covers only 38 mm left-right"),
    (dicom_middle_of_three_deleted, "skips instance numbers"),
    (truncated_reference_with_extension, "truncated"),
    (nifti_pair_cut_short, "not a supported file type"),
    (nrrd_int16_t_more_data_than_declared, "more image data"),
    *HOSTILE,
    *DICOM_ROUND_TWO,
    *EVALUATE_ROUND_TWO,
    *FILES_ROUND_TWO,
    *INTENSITY_ROUND_TWO,
    *MODEL_ROUND_TWO,
]


def _snapshot(folder: Path) -> dict:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(autouse=True)
def _restore_memory_limit():
    saved = os.environ.get("ABDOMENSEG_MAX_MEMORY_GB")
    yield
    if saved is None:
        os.environ.pop("ABDOMENSEG_MAX_MEMORY_GB", None)
    else:
        os.environ["ABDOMENSEG_MAX_MEMORY_GB"] = saved


@pytest.mark.parametrize("make,message", REFUSED, ids=[m.__name__ for m, _ in REFUSED])
def test_refused_with_one_clear_error_and_nothing_written(tmp_path, tiny_package, capsys, make, message):
    argv = make(tmp_path, str(tiny_package.path))
    before = _snapshot(tmp_path)
    start = time.perf_counter()
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert err and err[-1].startswith("error: ") and ". " in err[-1] and message in err[-1], err
    assert "Traceback" not in "\n".join(err)
    # Refused before any long work (the bomb and the memory cases would take minutes or GBs otherwise).
    assert time.perf_counter() - start < 30
    assert _snapshot(tmp_path) == before, "an existing file changed or a new one appeared"
    assert not list(tmp_path.rglob(".part-*")) and not list(tmp_path.rglob("*.lock"))


# -- written, but flagged (exit 3) ------------------------------------------------------------------
def test_mirrored_header_is_flagged_not_silent(tmp_path, capsys):
    """Issue case: a real CT with a left-right mirrored header (liver 1191 -> 367 mL, spleen 271 -> 643 mL)."""
    image = sitk.ReadImage(str(shared(*EXAMPLE_CT)))
    direction = np.array(image.GetDirection()).reshape(3, 3)
    direction[:, 0] *= -1
    image.SetDirection(direction.ravel().tolist())
    src = _write(image, tmp_path / "mirrored.nii.gz")
    assert main(["segment", str(src), str(tmp_path / "out.nii.gz")]) == EXIT_FLAGGED
    err = capsys.readouterr().err
    assert "warning: mirrored:" in err and "mirrored left-right" in err
    assert (tmp_path / "out.nii.gz").is_file()  # the output is still written, for the user to look at


def test_intact_example_is_not_flagged(tmp_path, capsys):
    assert main(["segment", str(shared(*EXAMPLE_CT)), str(tmp_path / "out.nii.gz")]) == 0
    assert "warning" not in capsys.readouterr().err


def test_empty_result_is_said_and_flagged(tmp_path, background_only_package, capsys):
    src, _ = _phantom(tmp_path)
    code = main(["segment", str(src), str(tmp_path / "out.nii.gz"), "--model", str(background_only_package.path)])
    assert code == EXIT_FLAGGED
    assert "no organ was found" in capsys.readouterr().err
    assert not sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out.nii.gz"))).any()


# -- races, leftovers and re-runs ------------------------------------------------------------------
def test_second_writer_of_the_same_output_refuses(tmp_path, tiny_package, capsys):
    src, _ = _phantom(tmp_path)
    out = tmp_path / "out.nii.gz"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; sys.path.insert(0, sys.argv[2]);"
            "from AbdomenSegLib.io.files import claim_output\nwith claim_output(sys.argv[1]):\n"
            " print('held', flush=True); time.sleep(60)",
            str(out),
            str(ROOT),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["segment", str(src), str(out), "--model", str(tiny_package.path)]) == 2
        err = capsys.readouterr().err
        assert "being written by another AbdomenSeg run" in err and f"process {holder.pid}" in err
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    # Its lock is stale now (the holder was killed): the next run takes the output over.
    assert main(["segment", str(src), str(out), "--model", str(tiny_package.path)]) in (0, EXIT_FLAGGED)
    assert out.is_file() and not list(tmp_path.glob(".*.lock"))


def test_output_that_appears_during_the_run_is_not_replaced(tmp_path):
    from AbdomenSegLib.core.errors import AbdomenSegError
    from AbdomenSegLib.io.images import write_image

    image, _ = make_phantom(size=(16, 16, 8))
    out = tmp_path / "o.nii.gz"
    out.write_bytes(b"someone else's file")
    with pytest.raises(AbdomenSegError, match="appeared while this run was working"):
        write_image(image, out, overwrite=False)
    assert out.read_bytes() == b"someone else's file" and not list(tmp_path.glob(".part-*"))


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_killed_writers_leftovers_are_no_case_and_are_removed(tmp_path, tiny_package, capsys):
    from AbdomenSegLib.io import files as io

    (tmp_path / "in").mkdir()
    _phantom(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    # What `kill -9` during a write leaves: a temp file named for this host and a process that is gone.
    leftover = out / f"{io.PARTIAL_PREFIX}{io._HOST_TAG}-{_dead_pid()}-abc123.nii.gz"
    leftover.write_bytes(b"half a file")
    (tmp_path / "in" / leftover.name).write_bytes(b"half a file")  # and one among the inputs
    code = main(["segment", str(tmp_path / "in"), str(out), "--model", str(tiny_package.path)])
    assert code in (0, EXIT_FLAGGED)
    assert sorted(p.name for p in out.iterdir()) == [
        "ct.nii.gz",
        "manifest.csv",
        "qc",
    ]  # leftover removed, not segmented
    assert "left by an interrupted run" in capsys.readouterr().err


def test_rerun_into_the_input_folder_skips_its_own_outputs(tmp_path, tiny_package, capsys):
    _phantom(tmp_path, "a.nii.gz")
    _phantom(tmp_path, "b.nii.gz")
    args = ["segment", str(tmp_path), str(tmp_path), "--format", ".nrrd", "--model", str(tiny_package.path)]
    assert main(args) in (0, EXIT_FLAGGED)
    code = main(args)
    assert code in (0, EXIT_FLAGGED)
    outputs = lambda: {p: h for p, h in _snapshot(tmp_path).items() if "qc" not in p.parts}  # noqa: E731
    first = outputs()
    assert main(args) == code  # was exit 2: a.nrrd taken as an input that would overwrite itself
    assert "2 skipped" in capsys.readouterr().err and outputs() == first


def test_evaluate_folder_carries_on_past_an_unreadable_reference(tmp_path, capsys):
    preds, refs = tmp_path / "preds", tmp_path / "refs"
    preds.mkdir(), refs.mkdir()
    _, labels = make_phantom(size=(48, 40, 16), spacing=(8.0, 8.0, 14.0))
    for name in ("case0", "case1", "case2"):
        _write(labels, preds / f"{name}.nii.gz")
        _write(labels, refs / f"{name}.nii.gz")
    (refs / "case1.nii.gz").write_text("not an image")
    code = main(["evaluate", str(preds), str(refs), "--csv", str(tmp_path / "m.csv")])
    assert code == 1
    rows = (tmp_path / "m.csv").read_text().splitlines()[1:]
    assert {r.split(",")[0] for r in rows} == {"case0", "case2"}
    assert "case1: error:" in capsys.readouterr().err


def test_sheared_input_keeps_its_exact_grid_in_nrrd(tmp_path, tiny_package):
    args = sheared_to_nifti(tmp_path, str(tiny_package.path))
    args[2] = str(tmp_path / "out.nrrd")
    assert main(args) in (0, EXIT_FLAGGED)
    written, source = sitk.ReadImage(args[2]), sitk.ReadImage(args[1])
    assert np.allclose(written.GetDirection(), source.GetDirection(), atol=1e-6)
    assert written.GetSize() == source.GetSize() and np.allclose(written.GetOrigin(), source.GetOrigin())


def test_immutable_output_folder_fails_before_any_work(tmp_path, tiny_package, capsys):
    src, _ = _phantom(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available on this file system")
    try:
        start = time.perf_counter()
        assert main(["segment", str(src), str(locked / "o.nii.gz"), "--model", str(tiny_package.path)]) == 2
        assert "cannot write in the output folder" in capsys.readouterr().err
        assert time.perf_counter() - start < 10
    finally:
        subprocess.run(["chattr", "-i", str(locked)])


# -- hostile files and services (issue 31) ---------------------------------------------------------
def test_a_fifo_among_the_cases_fails_its_case_only(tmp_path, tiny_package, capsys):
    os.mkfifo(tmp_path / "a.nii.gz")
    _phantom(tmp_path, "b.nii.gz")
    out = tmp_path / "out"
    assert main(["segment", str(tmp_path / "*.nii.gz"), str(out), "--model", str(tiny_package.path)]) == 1
    err = capsys.readouterr().err
    assert "a: error: input" in err and "is a named pipe (FIFO), not a regular file" in err
    assert (out / "b.nii.gz").is_file() and not (out / "a.nii.gz").exists()
    assert not list(tmp_path.rglob("*.lock")) and not list(tmp_path.rglob(".part-*"))


def test_a_250_character_output_name_is_written_and_its_lock_fits(tmp_path, tiny_package):
    from AbdomenSegLib.io.files import NAME_MAX_BYTES, claim_output, lock_path

    src, _ = _phantom(tmp_path)
    out = tmp_path / ("o" * 243 + ".nii.gz")  # 250 characters; `.<name>.lock` would be 256
    assert len(out.name) == 250
    long_lock, other = lock_path(out), lock_path(tmp_path / ("o" * 243 + ".nrrd.gz"))
    assert len(long_lock.name.encode()) <= NAME_MAX_BYTES and long_lock != other and long_lock.parent == tmp_path
    assert lock_path(tmp_path / "o.nii.gz").name == ".o.nii.gz.lock"  # short names keep the readable lock
    with claim_output(out):
        assert long_lock.is_file()  # really claimed: a second writer would find it
    assert main(["segment", str(src), str(out), "--model", str(tiny_package.path)]) in (0, EXIT_FLAGGED)
    assert out.is_file() and not list(tmp_path.glob(".*.lock")) and not list(tmp_path.glob(".part-*"))


def test_card_text_and_file_names_reach_the_terminal_without_escape_sequences(
    tmp_path, tiny_package, monkeypatch, capsys
):
    import json

    models = tmp_path / "models"
    shutil.copytree(tiny_package.path, models / "evil")
    card = json.loads((models / "evil" / "card.json").read_text())
    card.update(name="evil", title="\x1b]0;owned\x07\x1b[2J\x1b[31mred title\rX")
    (models / "evil" / "card.json").write_text(json.dumps(card))
    catalog = {"default": "evil", "models": [{"name": "evil", "for": "scans \x1b[5mblinking"}]}
    (models / "catalog.json").write_text(json.dumps(catalog))
    monkeypatch.setattr("AbdomenSegLib.models.packages.MODELS_DIR", models)
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\r" not in out
    assert "\\x1b[31mred title\\rX" in out and "scans \\x1b[5mblinking" in out
    # a file name with an escape sequence, in an error
    bad = tmp_path / "scan\x1b[2J.nii.gz"
    assert main(["segment", str(bad), str(tmp_path / "o.nii.gz"), "--model", str(tiny_package.path)]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "scan\\x1b[2J.nii.gz" in err and err.startswith("error: ")


def test_workers_are_capped_by_the_cores_and_the_memory(monkeypatch):
    from AbdomenSegLib.cohort import cluster

    assert cluster.capped_workers(12, cpus=2, memory=64e9) == (2, "this process may use 2 CPU core(s)")
    count, why = cluster.capped_workers(4, 3e9, cpus=8, memory=7e9)
    assert count == 2 and "3.0 GB" in why and "7.0 GB are available" in why
    assert cluster.capped_workers(2, 1e9, cpus=8, memory=64e9) == (2, "")
    assert cluster.capped_workers(3, 50e9, cpus=8, memory=10e9)[0] == 1  # never none


def test_a_worker_needs_the_largest_case_and_the_model(tmp_path, tiny_package):
    from AbdomenSegLib.cohort import cluster
    from AbdomenSegLib.core import limits
    from AbdomenSegLib.models.footprint import model_bytes
    from AbdomenSegLib.models.packages import read_card

    card = read_card(tiny_package.path)
    small, _ = _phantom(tmp_path, "small.nii.gz", size=(32, 28, 12), spacing=(12.0, 12.0, 20.0))
    large, _ = _phantom(tmp_path, "large.nii.gz", size=(96, 84, 36), spacing=(4.0, 4.0, 6.66))
    (tmp_path / "broken.nii.gz").write_text("not an image")
    weights = sum(p.stat().st_size for p in tiny_package.path.glob("*.safetensors"))
    fixed = model_bytes(card)  # the weights twice, a batch of windows and the activations: more than the file twice
    assert fixed > 2 * weights > 0
    expected = limits.estimate_memory((96, 84, 36), (4.0, 4.0, 6.66), card["spacing"], card.out_channels) + fixed
    need = cluster.worker_memory(card, [small, tmp_path / "broken.nii.gz", large])
    assert need == pytest.approx(expected, rel=1e-3)
    assert cluster.worker_memory(card, [tmp_path / "broken.nii.gz"]) is None


def test_workers_12_on_2_cores_starts_2(tmp_path, tiny_package, monkeypatch, capsys):
    pytest.importorskip("distributed")
    from AbdomenSegLib.cohort import cluster

    monkeypatch.setattr(cluster, "available_cpus", lambda: 2)
    (tmp_path / "cases").mkdir()
    _phantom(tmp_path / "cases", "a.nii.gz")
    out = tmp_path / "out"
    code = main(["segment", str(tmp_path / "cases"), str(out), "--model", str(tiny_package.path), "--workers", "12"])
    err = capsys.readouterr().err
    assert code in (0, EXIT_FLAGGED), err
    assert "--workers 12: starting 2, as this process may use 2 CPU core(s)" in err
    assert "local Dask cluster: 2 worker process(es)" in err and (out / "a.nii.gz").is_file()


def test_a_web_server_at_the_scheduler_address_fails_in_bounded_time(tmp_path, tiny_package, monkeypatch, capsys):
    pytest.importorskip("distributed")
    import http.server
    import threading

    from AbdomenSegLib.cohort import cluster

    monkeypatch.setattr(cluster, "_HANDSHAKE_TIMEOUT_S", 1.0)
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        (tmp_path / "cases").mkdir()
        _phantom(tmp_path / "cases")
        before = _snapshot(tmp_path)
        address = f"tcp://127.0.0.1:{server.server_port}"
        start = time.perf_counter()
        code = main(["segment", str(tmp_path / "cases"), str(tmp_path / "out"), "--model", str(tiny_package.path),
                     "--scheduler", address])  # fmt: skip
        elapsed = time.perf_counter() - start
    finally:
        server.shutdown()
        server.server_close()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and elapsed < 15, (code, elapsed)  # was: waiting past 200 s
    assert err[-1].startswith(f"error: the service at {address} is not a Dask scheduler: it sent no handshake")
    assert _snapshot(tmp_path) == before and not list(tmp_path.rglob("*.lock"))
