"""The picture per case (qc_sheet.render_case_sheet) and the folder index (write_contact_sheet), on the
synthetic phantom: written atomically, right size, not blank, organ colours drawn, radiological orientation
for any direction matrix, empty results still drawn with their warning, and an index that lists warned
cases first with escaped names and working relative links."""

import re
import urllib.parse

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from AbdomenSegLib.core.organs import BY_LABEL, BY_NAME
from AbdomenSegLib.io.phantom import make_phantom, rotation
from AbdomenSegLib.qc import sheet as qc_sheet

SIZE, SPACING = (96, 80, 40), (4.0, 4.0, 6.0)
WARNING_RGB = (255, 92, 77)  # qc_sheet.WARNING
GOOD_RGB = (98, 210, 111)  # qc_sheet.GOOD
VIEWS_RIGHT = qc_sheet.WIDTH_PX - qc_sheet.MARGIN - qc_sheet.TABLE_WIDTH  # views left of this, table right


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(size=SIZE, spacing=SPACING)


def _report(labels, case="case01", warnings=(), notes=()):
    array = sitk.GetArrayViewFromImage(labels)
    voxel_ml = float(np.prod(labels.GetSpacing())) / 1000.0
    organs = {
        BY_LABEL[int(v)].name: {
            "volume_ml": float((array == v).sum()) * voxel_ml,
            "pieces": 1,
            "outside_largest_ml": 0.0,
            "at_border": [],
            "confidence": 0.9,
            "normal_range_ml": [800, 3000] if v == 1 else None,
        }
        for v in np.unique(array)
        if v
    }
    return {
        "case": case,
        "model": "btcv-ct-3d-unet",
        "modality": "CT",
        "warnings": list(warnings),
        "notes": list(notes),
        "organs": organs,
    }


def _has_colour(pixels: np.ndarray, rgb, tolerance: int = 0) -> bool:
    return bool((np.abs(pixels[..., :3].astype(int) - np.array(rgb)) <= tolerance).all(-1).any())


def _pixels(path) -> np.ndarray:
    with Image.open(path) as picture:
        return np.asarray(picture.convert("RGB"))


def test_sheet_is_written_atomically_with_size_content_and_organ_colours(phantom, tmp_path):
    ct, labels = phantom
    report = _report(
        labels,
        notes=[{"code": "volume_low", "problem": "liver 700 mL is below the adult range", "fix": "", "organ": "liver"}],
    )
    out = qc_sheet.render_case_sheet(ct, labels, report, tmp_path / "qc" / "case01.png")
    assert out == tmp_path / "qc" / "case01.png" and out.is_file()
    assert [p.name for p in out.parent.iterdir()] == ["case01.png"]  # no .part-* left behind
    assert out.stat().st_size < 400_000
    with Image.open(out) as picture:
        assert picture.format == "PNG" and picture.size == (1400, 800)
    pixels = _pixels(out)
    views, table = pixels[:, :VIEWS_RIGHT], pixels[:, VIEWS_RIGHT:]
    assert views.std() > 20  # an image, not a blank canvas
    liver = BY_NAME["liver"].color
    assert _has_colour(views, liver), "liver outline missing from the views"
    assert _has_colour(table, liver), "liver swatch missing from the table"
    for name in ("spleen", "kidney_left", "aorta"):
        assert _has_colour(views, BY_NAME[name].color), name
    assert not _has_colour(pixels[:100], WARNING_RGB, 2)  # a note only: no red warning line


def test_flags_are_drawn_in_their_colours(phantom, tmp_path):
    ct, labels = phantom
    clean = qc_sheet.render_case_sheet(ct, labels, _report(labels), tmp_path / "clean.png")
    assert _has_colour(_pixels(clean)[:100], GOOD_RGB, 2)  # "no flags" in green
    warned = qc_sheet.render_case_sheet(
        ct,
        labels,
        _report(
            labels,
            warnings=[
                {
                    "code": "flipped_left-right",
                    "problem": "organs lie mirrored " * 30,
                    "fix": "fix the header",
                    "organ": None,
                }
            ],
        ),
        tmp_path / "warned.png",
    )
    top = _pixels(warned)[:200]
    assert _has_colour(top, WARNING_RGB, 2) and not _has_colour(top, GOOD_RGB, 2)


def test_flag_lines_wrap_and_stay_within_budget():
    warnings = [{"problem": f"problem {i} " + "word " * 60, "fix": "a fix " * 20} for i in range(6)]
    lines = qc_sheet._flag_lines(warnings, [{"problem": "a note"}], 80, False)
    assert len(lines) <= qc_sheet.MAX_FLAG_LINES and all(len(text) <= 80 for text, _, _ in lines)
    assert "more flag" in lines[-1][0]
    assert qc_sheet._flag_lines([], [], 80, False)[0][0].endswith("no flags")
    # strings and objects with .problem are accepted as flags too
    assert "plain text" in qc_sheet._flag_lines(["plain text"], [], 80, False)[0][0]


def test_empty_labels_still_render_with_the_no_organ_warning(phantom, tmp_path):
    ct, labels = phantom
    empty = sitk.Image(labels.GetSize(), labels.GetPixelID())
    empty.CopyInformation(labels)
    out = qc_sheet.render_case_sheet(
        ct, empty, {"case": "empty", "modality": "CT", "organs": {}}, tmp_path / "empty.png"
    )
    pixels = _pixels(out)
    assert pixels[:, :VIEWS_RIGHT].std() > 20  # the image is still shown
    assert _has_colour(pixels[:100], WARNING_RGB, 2)  # the warning line
    assert not any(_has_colour(pixels[:, :VIEWS_RIGHT], BY_LABEL[v].color) for v in (1, 2, 3, 4))
    lines = qc_sheet._flag_lines([{"problem": "no organ found in this image"}], [], 100, True)
    assert "no organ found" in lines[0][0]


@pytest.mark.parametrize(
    "direction, size",
    [
        (np.diag([-1.0, -1.0, 1.0]), SIZE),  # RAS-stored, as NIfTI files often are
        (np.diag([1.0, 1.0, -1.0]), SIZE),  # slices stored head to foot
        (np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]]), (SIZE[1], SIZE[0], SIZE[2])),  # axes swapped
    ],
)
def test_display_arrays_are_in_lps_order_for_any_direction(direction, size):
    """The same physical voxels stored in another order must give the same display arrays."""
    ct_ref, lab_ref = make_phantom(size=SIZE, spacing=(4.0, 4.0, 4.0), noise=0.0)
    ct, lab = make_phantom(size=size, spacing=(4.0, 4.0, 4.0), direction=direction, noise=0.0)
    ref = qc_sheet._lps_views(ct_ref, lab_ref)
    got = qc_sheet._lps_views(ct, lab)
    assert np.array_equal(got[1], ref[1]) and np.array_equal(got[0], ref[0])
    assert got[2] == ref[2] and not got[3]


def test_radiological_convention_and_anatomy_in_the_views(phantom):
    ct, labels = phantom
    image, lab, spacing, oblique, _keep = qc_sheet._lps_views(ct, labels)
    centre, found = qc_sheet._centre_slices(lab)
    assert found and not oblique and all(0 <= c < n for c, n in zip(centre, lab.shape))

    def index_centre(organ):
        return tuple(int(round(c)) for c in np.argwhere(np.asarray(lab) == BY_NAME[organ].label).mean(0))

    def centroid(view, through, organ):
        views = {v[0]: v for v in qc_sheet._views(image, lab, spacing, index_centre(through))}
        rows, cols = np.nonzero(np.asarray(views[view][2]) == BY_NAME[organ].label)
        assert rows.size, (view, organ)
        return rows.mean(), cols.mean()

    # axial through the liver: the patient's right (liver) on the image's left, anterior at the top
    assert centroid("axial", "liver", "liver")[1] < centroid("axial", "liver", "spleen")[1]
    assert centroid("axial", "liver", "liver")[0] < centroid("axial", "liver", "aorta")[0]
    # coronal through the right kidney: liver on the image's left of the spleen, above the kidney
    assert centroid("coronal", "kidney_right", "liver")[1] < centroid("coronal", "kidney_right", "spleen")[1]
    assert centroid("coronal", "kidney_right", "liver")[0] < centroid("coronal", "kidney_right", "kidney_right")[0]
    # sagittal through the right kidney: superior at the top, anterior (gallbladder) on the left
    assert centroid("sagittal", "kidney_right", "liver")[0] < centroid("sagittal", "kidney_right", "kidney_right")[0]
    assert (
        centroid("sagittal", "kidney_right", "gallbladder")[1] < centroid("sagittal", "kidney_right", "kidney_right")[1]
    )
    letters = [v[4] for v in qc_sheet._views(image, lab, spacing, centre)]
    assert letters == [("R", "L", "A", "P"), ("R", "L", "S", "I"), ("A", "P", "S", "I")]


def test_thin_anisotropic_oblique_and_mr_volumes_render(tmp_path):
    ct, labels = make_phantom(size=(96, 80, 3), spacing=(4.0, 4.0, 6.0))
    out = qc_sheet.render_case_sheet(ct, labels, {"modality": "CT"}, tmp_path / "thin.png")
    assert _has_colour(_pixels(out), BY_NAME["liver"].color)
    direction = rotation("z", 20) @ np.diag([-1.0, 1.0, -1.0])
    ct, labels = make_phantom(size=(96, 80, 40), spacing=(1.5, 4.0, 6.0), direction=direction)
    assert qc_sheet._lps_views(ct, labels)[3]  # oblique: shown along the nearest axes
    mr = sitk.Cast(ct + 1000, sitk.sitkFloat32) * 0.5
    out = qc_sheet.render_case_sheet(
        mr,
        labels,
        {"case": "mr", "modality": "MR", "notes": ["cost $\\frac{a}{b$ ^_^"]},
        tmp_path / "mr.png",
        title="oblique $MR_1$ {x}",
    )  # "$" is text, never mathtext
    with Image.open(out) as picture:
        assert picture.size == (1400, 800)
    assert qc_sheet._display_window(sitk.GetArrayViewFromImage(mr), "MR") != qc_sheet.CT_WINDOW
    assert qc_sheet._display_window(sitk.GetArrayViewFromImage(ct), None) == qc_sheet.CT_WINDOW  # HU values


def test_labels_on_another_grid_are_resampled_onto_the_image(phantom, tmp_path):
    ct, labels = phantom
    coarse = sitk.Resample(
        labels,
        [48, 40, 20],
        sitk.Transform(),
        sitk.sitkNearestNeighbor,
        labels.GetOrigin(),
        [8.0, 8.0, 12.0],
        labels.GetDirection(),
        0,
        labels.GetPixelID(),
    )
    out = qc_sheet.render_case_sheet(ct, coarse, {"modality": "CT"}, tmp_path / "coarse.png")
    assert _has_colour(_pixels(out)[:, :VIEWS_RIGHT], BY_NAME["liver"].color)


def _links(text):
    return re.findall(r'(?:href|src)="([^"]+)"', text)


def test_contact_sheet_lists_warned_cases_first_with_escaped_names_and_relative_links(phantom, tmp_path):
    ct, labels = phantom
    out_dir = tmp_path / "qc"
    warned_name = "b<script>&case"
    clean_png = qc_sheet.render_case_sheet(ct, labels, _report(labels, "alpha"), out_dir / "alpha.png")
    warned_png = qc_sheet.render_case_sheet(ct, labels, _report(labels, warned_name), out_dir / "pics" / "b #1.png")
    entries = [
        {"case": "alpha", "png": clean_png.name, "warnings": [], "notes": [{"problem": "a note"}]},
        {
            "case": warned_name,
            "png": str(warned_png),
            "notes": [],
            "warnings": [{"code": "flipped_left-right", "problem": "organs lie <mirrored> left-right"}],
        },
    ]
    index, sheet = qc_sheet.write_contact_sheet(entries, out_dir)
    assert index == out_dir / "index.html" and sheet == out_dir / "contact_sheet.png"
    assert not list(out_dir.glob(".part-*"))
    text = index.read_text(encoding="utf-8")
    assert "2 cases, 1 with warnings" in text
    assert "<script>" not in text and "b&lt;script&gt;&amp;case" in text
    assert "&lt;mirrored&gt;" in text
    assert text.index("b&lt;script&gt;&amp;case") < text.index(">alpha<")  # warned first
    links = _links(text)
    assert links and all(not link.startswith(("/", "file:")) for link in links)
    for link in links:
        assert (out_dir / urllib.parse.unquote(link)).is_file(), link
    assert "pics/b%20%231.png" in links
    pixels = _pixels(sheet)
    assert _has_colour(pixels, WARNING_RGB, 2)  # the warned case's red frame
    assert pixels.std() > 10


def test_contact_sheet_pages_and_missing_pictures(tmp_path):
    entries = [
        {"case": f"case{i:03d}", "png": None, "warnings": [{"problem": "x"}] if i % 7 == 0 else []}
        for i in range(qc_sheet.PER_SHEET + 1)
    ]
    entries.append({"case": "gone", "png": "missing.png", "warnings": []})
    index, first = qc_sheet.write_contact_sheet(entries, tmp_path)
    assert first.name == "contact_sheet.png" and (tmp_path / "contact_sheet_2.png").is_file()
    text = index.read_text(encoding="utf-8")
    assert f"{len(entries)} cases, 15 with warnings" in text and "contact_sheet_2.png" in text
    assert text.count("no picture") == len(entries)
    qc_sheet.write_contact_sheet(entries[:2], tmp_path)  # a later, smaller run leaves no stale page
    assert not (tmp_path / "contact_sheet_2.png").exists()
    index, first = qc_sheet.write_contact_sheet([], tmp_path / "none")
    assert "0 cases, 0 with warnings" in index.read_text(encoding="utf-8") and first.is_file()
