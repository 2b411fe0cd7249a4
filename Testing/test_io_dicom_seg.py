"""DICOM SEG out (`segment DICOM_FOLDER out.dcm`, `--format .dcm`) and in (a SEG as `evaluate` reference).

Real data: dcmqi's 3-slice CT series (and its own SEG of the liver), and DICOM series built here with pydicom from
the TotalSegmentator example CT (real HU), once axial and once oblique, with that example's organ map as labels.
"""

import shutil

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from AbdomenSegLib import cli
from AbdomenSegLib.cli import main
from AbdomenSegLib.cohort.batch import is_dicom_folder
from AbdomenSegLib.core.errors import AbdomenSegError
from AbdomenSegLib.core.organs import BY_LABEL, BY_NAME, convert_labels
from AbdomenSegLib.io.dicom_seg import AI_FAMILY, SEG_SOP_CLASS, read_dicom_seg
from AbdomenSegLib.io.images import check_output_type, read_image, write_labels
from helpers import shared

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _array(image):
    return sitk.GetArrayFromImage(image)


def _same_grid(a, b):
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-5)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)
    )


def _sources(folder):
    """SOP Instance UID -> (file, dataset) of every slice in a series folder."""
    out = {}
    for path in sorted(folder.iterdir()):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        out[ds.SOPInstanceUID] = (path, ds)
    return out


def _check_seg_file(seg_path, series, label_image, card):
    """Every frame references the source slice at its position and holds exactly that slice's organ mask; codes,
    names, colours and the algorithm identification are there."""
    import highdicom as hd

    seg = hd.seg.segread(seg_path)
    assert seg.SOPClassUID == SEG_SOP_CLASS and seg.SegmentationType == "BINARY"
    sources = _sources(series)
    labels = _array(label_image)
    present = [int(v) for v in np.unique(labels) if v]
    organ_of = {}
    for item in seg.SegmentSequence:
        organ = BY_LABEL[present[item.SegmentNumber - 1]]
        organ_of[item.SegmentNumber] = organ
        assert item.SegmentLabel == organ.display_name
        category = item.SegmentedPropertyCategoryCodeSequence[0]
        assert (category.CodingSchemeDesignator, category.CodeValue) == ("SCT", "123037004")
        kind = item.SegmentedPropertyTypeCodeSequence[0]
        assert (kind.CodingSchemeDesignator, kind.CodeValue, kind.CodeMeaning) == organ.snomed_type
        if organ.snomed_modifier[1]:
            modifier = kind.SegmentedPropertyTypeModifierCodeSequence[0]
            assert (modifier.CodingSchemeDesignator, modifier.CodeValue) == organ.snomed_modifier[:2]
        rgb = hd.color.CIELabColor.from_dicom_value(item.RecommendedDisplayCIELabValue).to_rgb()
        assert np.abs(np.subtract(rgb, organ.color)).max() <= 1
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        family = algorithm.AlgorithmFamilyCodeSequence[0]
        assert (family.CodeValue, family.CodingSchemeDesignator, family.CodeMeaning) == AI_FAMILY
        assert algorithm.AlgorithmName == card.name
        assert algorithm.AlgorithmVersion == card["sha256"][:12]
        assert f"sha256={card['sha256']}" in algorithm.AlgorithmParameters
    assert len(organ_of) == len(present)
    seen = set()
    for index, frame in enumerate(seg.PerFrameFunctionalGroupsSequence, start=1):
        uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        path, source = sources[uid]
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose(position, [float(v) for v in source.ImagePositionPatient], atol=1e-4), path.name
        k = int(round(label_image.TransformPhysicalPointToContinuousIndex(position)[2]))
        number = frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        mask = seg.get_frame(index).astype(bool)
        assert np.array_equal(mask, labels[k] == organ_of[number].label), (path.name, number)
        seen.add((k, number))
    # every non-empty (slice, organ) pair has its frame; empty ones are left out
    expected = {(k, n) for n, o in organ_of.items() for k in range(labels.shape[0]) if (labels[k] == o.label).any()}
    assert seen == expected


# -- the 3-slice dcmqi series -----------------------------------------------------------------------------------


def _ct3_labels(series):
    """dcmqi's liver map plus a right kidney and a spleen block, in the series' grid."""
    image = read_image(series)
    liver = _array(sitk.ReadImage(str(shared("dcmqi_ct3slice", "liver_seg.nrrd"))))
    labels = liver.astype(np.uint8)
    labels[0:2, 300:360, 380:440][labels[0:2, 300:360, 380:440] == 0] = BY_NAME["kidney_right"].label
    labels[2, 100:140, 360:420] = BY_NAME["spleen"].label
    out = sitk.GetImageFromArray(labels)
    out.CopyInformation(image)
    return out


def test_ct3slice_seg_frames_codes_and_round_trip(tmp_path, tiny_package):
    series = shared("dcmqi_ct3slice", "ct-3slice")
    labels = _ct3_labels(series)
    seg_path = write_labels(labels, tmp_path / "organs.dcm", protect=[series], source=series, model=tiny_package)
    nrrd_path = write_labels(labels, tmp_path / "organs.nrrd")
    _check_seg_file(seg_path, series, labels, tiny_package)
    nrrd = read_image(nrrd_path)
    in_grid = read_dicom_seg(seg_path, reference=read_image(series))
    assert _same_grid(in_grid, nrrd) and np.array_equal(_array(in_grid), _array(nrrd))
    alone = read_image(seg_path)  # the SEG's own grid: here all three slices hold organs
    assert _same_grid(alone, nrrd) and np.array_equal(_array(alone), _array(nrrd))


def test_dcmqi_seg_reads_as_its_liver_map():
    """A SEG from another tool (dcmqi, SNOMED RT codes): matched by name, exact in its source grid."""
    seg = read_image(shared("dcmqi_ct3slice", "liver.dcm"))
    reference = sitk.ReadImage(str(shared("dcmqi_ct3slice", "liver_seg.nrrd")))
    assert np.array_equal(_array(seg), _array(reference)) and _same_grid(seg, reference)


def _for_thin_slabs(package, folder):
    """A copy of `package` whose card states it segments 2-slice slabs: the 3-slice series (3 mm) is under every
    default minimum extent (models/extent.py), and these tests are about the SEG, not the model."""
    import json

    from AbdomenSegLib.models.packages import read_card

    shutil.copytree(package.path, folder)
    card = json.loads((folder / "card.json").read_text())
    card["input_minimum"] = {"slices": 2, "mm": [0, 0, 0]}
    (folder / "card.json").write_text(json.dumps(card))
    return read_card(folder)


def test_segment_cli_writes_seg_like_the_nrrd(tmp_path, tiny_package):
    """End to end with the tiny model: the SEG's organs equal the NRRD of the same run, voxel for voxel."""
    series = shared("dcmqi_ct3slice", "ct-3slice")
    tiny_package = _for_thin_slabs(tiny_package, tmp_path / "model")
    assert cli.main(["segment", str(series), str(tmp_path / "out.nrrd"), "--model", str(tiny_package.path)]) in (0, 3)
    assert cli.main(["segment", str(series), str(tmp_path / "out.dcm"), "--model", str(tiny_package.path)]) in (0, 3)
    nrrd = read_image(tmp_path / "out.nrrd")
    assert _array(nrrd).any()  # the untrained model labels something here, so a SEG is written
    seg = read_dicom_seg(tmp_path / "out.dcm", reference=read_image(series))
    assert _same_grid(seg, nrrd) and np.array_equal(_array(seg), _array(nrrd))
    _check_seg_file(tmp_path / "out.dcm", series, nrrd, tiny_package)


def test_segment_cli_empty_result_refused(tmp_path, background_only_package, capsys):
    """No organ found: NRRD keeps the empty map (exit 3, flagged); a SEG cannot hold zero segments, so it is refused
    with the reason and nothing is written."""
    series = shared("dcmqi_ct3slice", "ct-3slice")
    (tmp_path / "out").mkdir()
    model = str(_for_thin_slabs(background_only_package, tmp_path / "model").path)
    assert cli.main(["segment", str(series), str(tmp_path / "out" / "out.dcm"), "--model", model]) == 2
    err = capsys.readouterr().err
    assert "no organ was found" in err and "must hold at least one segment" in err and ".nrrd" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []


# -- series built from a real CT --------------------------------------------------------------------------------


def _rotation(degrees_x, degrees_z):
    ax, az = np.radians(degrees_x), np.radians(degrees_z)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ rx


def _write_series(folder, hu, spacing, origin, direction):
    """A CT series of single-frame slices (pydicom), one file per z index of `hu` (z, y, x)."""
    folder.mkdir(parents=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    direction = np.asarray(direction, dtype=float).reshape(3, 3)
    for k, plane in enumerate(hu):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"{k:03d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Abdomen", "ABD001", "", "O"
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = (
            "20240101",
            "120000",
            "",
            "",
            "1",
        )
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 3, k + 1
        ds.Manufacturer = "test"
        position = np.asarray(origin) + direction[:, 2] * spacing[2] * k
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*direction[:, 0], *direction[:, 1])]
        ds.PixelSpacing = [f"{spacing[1]:g}", f"{spacing[0]:g}"]  # row spacing (y), column spacing (x)
        ds.SliceThickness = f"{spacing[2]:g}"
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "HU"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PixelData = np.ascontiguousarray(plane.astype(np.int16)).tobytes()
        ds.save_as(folder / f"{k:03d}.dcm", enforce_file_format=True)


@pytest.fixture(scope="module")
def real_ct_crop():
    """(HU, organ labels) arrays (z, y, x): 24 slices through the kidneys of the TotalSegmentator example CT, every
    second voxel in-plane (61 x 51 pixels at 6 mm x 6 mm x 3 mm)."""
    ct = sitk.DICOMOrient(sitk.ReadImage(str(shared("totalseg_example", "example_ct.nii.gz"))), "LPS")
    seg = sitk.DICOMOrient(
        sitk.ReadImage(str(shared("totalseg_example", "example_seg_fast_force_split.nii.gz"))), "LPS"
    )
    labels = convert_labels(_array(seg), "totalseg")
    kidneys = np.flatnonzero((labels == BY_NAME["kidney_right"].label).any(axis=(1, 2)))
    z0 = max(0, int(kidneys.mean()) - 12)
    hu, labels = _array(ct)[z0 : z0 + 24, ::2, ::2], labels[z0 : z0 + 24, ::2, ::2]
    assert len(np.unique(labels)) >= 4  # background + several organs
    return hu, labels


@pytest.mark.parametrize("oblique", [False, True], ids=["axial", "oblique"])
def test_built_series_round_trip(tmp_path, tiny_package, real_ct_crop, oblique):
    hu, organ_labels = real_ct_crop
    spacing = (6.0, 6.0, 3.0)
    direction = _rotation(25, 10) if oblique else np.eye(3)
    origin = (-180.0, -150.5, -310.25)
    series = tmp_path / "ct"
    _write_series(series, hu, spacing, origin, direction)
    image = read_image(series)
    assert image.GetSize() == hu.shape[::-1]
    assert np.allclose(image.GetSpacing(), spacing, atol=1e-4) and np.allclose(image.GetOrigin(), origin, atol=1e-4)
    assert np.allclose(np.reshape(image.GetDirection(), (3, 3)), direction, atol=1e-6)
    assert np.array_equal(_array(image), hu)
    labels = sitk.GetImageFromArray(organ_labels)
    labels.CopyInformation(image)
    seg_path = write_labels(labels, tmp_path / "organs.dcm", source=series, model=tiny_package)
    nrrd = read_image(write_labels(labels, tmp_path / "organs.nrrd"))
    _check_seg_file(seg_path, series, labels, tiny_package)
    in_grid = read_dicom_seg(seg_path, reference=read_image(series))
    assert _same_grid(in_grid, nrrd) and np.array_equal(_array(in_grid), _array(nrrd))
    # on its own the SEG spans the slices holding organs, in the same physical places
    alone = read_image(seg_path)
    assert np.allclose(alone.GetDirection(), nrrd.GetDirection(), atol=1e-6)
    assert np.allclose(alone.GetSpacing(), nrrd.GetSpacing(), atol=1e-4)
    first = int(round(nrrd.TransformPhysicalPointToContinuousIndex(alone.GetOrigin())[2]))
    assert np.array_equal(_array(alone), organ_labels[first : first + alone.GetSize()[2]])
    assert not organ_labels[:first].any() and not organ_labels[first + alone.GetSize()[2] :].any()
    # evaluate with the SEG as reference: Dice 1 for every organ, against the NRRD of the same labels
    csv = tmp_path / "metrics.csv"
    assert cli.main(["evaluate", str(tmp_path / "organs.nrrd"), str(seg_path), "--csv", str(csv)]) == 0
    import csv as csvlib

    rows = [r for r in csvlib.DictReader(csv.open()) if r["status"] == "ok"]
    present = {BY_LABEL[v].name for v in np.unique(organ_labels) if v}
    assert {r["organ"] for r in rows} == present
    assert all(float(r["dice"]) == 1.0 for r in rows)


def test_folder_mode_format_dcm(tmp_path, tiny_package, real_ct_crop):
    """`segment FOLDER OUT --format .dcm` on a folder of DICOM series: one SEG per series."""
    hu, _ = real_ct_crop
    cases = tmp_path / "cases"
    for name in ("a", "b"):
        _write_series(cases / name, hu, (6.0, 6.0, 3.0), (0.0, 0.0, 0.0), np.eye(3))
    out = tmp_path / "out"
    code = cli.main(
        ["segment", str(cases), str(out), "--format", ".dcm", "--model", str(tiny_package.path), "--no-qc-png"]
    )
    assert code in (0, 3)
    for name in ("a", "b"):
        assert _array(read_dicom_seg(out / f"{name}.dcm", reference=read_image(cases / name))).any()


# -- refusals ---------------------------------------------------------------------------------------------------


def test_dcm_output_needs_a_dicom_series_input(tmp_path, capsys):
    image = tmp_path / "ct.nrrd"
    sitk.WriteImage(sitk.Image(8, 8, 4, sitk.sitkInt16), str(image))
    with pytest.raises(AbdomenSegError, match="must reference the DICOM series"):
        check_output_type(tmp_path / "out.dcm", [image])
    with pytest.raises(AbdomenSegError, match="must reference the DICOM series"):
        check_output_type(tmp_path / "out.dcm")
    assert cli.main(["segment", str(image), str(tmp_path / "out.dcm")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: a DICOM SEG output") and "write .nii.gz, .nrrd or .seg.nrrd" in err
    series = shared("dcmqi_ct3slice", "ct-3slice")
    with pytest.raises(AbdomenSegError, match="would then hold two series"):
        check_output_type(series / "out.dcm", [series])
    check_output_type(tmp_path / "out.dcm", [series])


def test_empty_labels_give_no_seg(tmp_path, tiny_package):
    series = shared("dcmqi_ct3slice", "ct-3slice")
    empty = sitk.Image(read_image(series).GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(read_image(series))
    with pytest.raises(AbdomenSegError, match="at least one segment"):
        write_labels(empty, tmp_path / "empty.dcm", source=series, model=tiny_package)
    assert list(tmp_path.iterdir()) == []


def test_no_clobber_and_wrong_grid(tmp_path, tiny_package):
    series = shared("dcmqi_ct3slice", "ct-3slice")
    labels = _ct3_labels(series)
    target = tmp_path / "organs.dcm"
    target.write_bytes(b"keep")
    with pytest.raises(AbdomenSegError, match="appeared while this run was working"):
        write_labels(labels, target, source=series, model=tiny_package, overwrite=False)
    assert target.read_bytes() == b"keep" and sorted(p.name for p in tmp_path.iterdir()) == ["organs.dcm"]
    shifted = sitk.Image(labels)
    shifted.SetOrigin(np.add(labels.GetOrigin(), (0, 0, 0.5)).tolist())
    with pytest.raises(AbdomenSegError, match="does not lie on the label map's grid"):
        write_labels(shifted, tmp_path / "other.dcm", source=series, model=tiny_package)


def test_single_slice_and_seg_as_scan_refused(tmp_path, capsys):
    series = shared("dcmqi_ct3slice", "ct-3slice")
    with pytest.raises(AbdomenSegError, match="single DICOM file, not a DICOM segmentation"):
        read_image(series / "01.dcm")
    seg = shared("dcmqi_ct3slice", "liver.dcm")
    with pytest.raises(AbdomenSegError, match="not a scan"):
        read_image(seg, segmentation_ok=False)
    (tmp_path / "notes.dcm").write_text("not DICOM")
    with pytest.raises(AbdomenSegError, match="is not a DICOM file"):
        read_image(tmp_path / "notes.dcm")
    copy = tmp_path / "seg_without_suffix"
    shutil.copy(seg, copy)
    assert _array(read_image(copy)).any()  # recognised by its content, not its name


def test_a_cohort_folder_with_segs_written_into_it_can_be_run_again(tmp_path, tiny_package):
    """`segment cases/ cases/ --format .dcm` puts SEG files beside the series folders; GDCM sees them as a
    series, and the folder must still be a set of cases, not one DICOM case, on the next run."""
    import shutil

    from AbdomenSegLib.cohort.batch import expand_inputs, find_reference

    source = shared("dcmqi_ct3slice")
    series = [p for p in source.rglob("*") if p.is_dir() and is_dicom_folder(p)]
    if not series:
        pytest.skip("no DICOM series folder in dcmqi_ct3slice")
    cases = tmp_path / "cases"
    shutil.copytree(series[0], cases / "ct3")
    model = str(_for_thin_slabs(tiny_package, tmp_path / "model").path)
    args = ["segment", str(cases), str(cases), "--format", ".dcm", "--model", model, "--device", "cpu"]
    assert main(args) in (0, 3)
    assert (cases / "ct3.dcm").is_file()
    found, batch = expand_inputs(str(cases))
    assert batch and [name for name, _ in found] == ["ct3"]
    assert main(args) in (0, 3)  # the re-run skips the written case instead of failing
    assert find_reference(cases, "ct3") == cases / "ct3.dcm"
