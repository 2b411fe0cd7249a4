"""Single files, folders and globs for `segment` and `evaluate`; existing outputs are skipped.

A folder that holds a DICOM series (and no image files) is one case; any other folder is a set of
cases. Output names are the input's case name plus the chosen suffix.
"""

from __future__ import annotations

import glob
from pathlib import Path

from AbdomenSegLib.core.errors import AbdomenSegError
from AbdomenSegLib.core.untrusted import require_regular_file
from AbdomenSegLib.io.images import IMAGE_SUFFIXES, case_name, image_suffix


def is_dicom_folder(path: Path) -> bool:
    """A folder holding a DICOM image series. DICOM SEG files (ours, written beside the series folders of a
    cohort) are series to GDCM too, but no scan: a folder holding only those is not a case."""
    import SimpleITK as sitk

    if not path.is_dir() or any(p.name.lower().endswith(IMAGE_SUFFIXES) for p in path.iterdir()):
        return False
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
    return any(not _is_segmentation(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), uid)) for uid in series)


def _is_segmentation(files) -> bool:
    if len(files) != 1:  # a SEG is one (multi-frame) file
        return False
    try:
        from AbdomenSegLib.io.dicom_seg import is_dicom_seg

        return is_dicom_seg(files[0])
    except ImportError:  # pydicom missing: no SEG can have been written here either
        return False


def expand_inputs(spec: str) -> tuple:
    """(cases, is_batch): [(case name, path)] for a file, a DICOM folder, a folder of images or a glob."""
    path = Path(spec)
    if any(ch in spec for ch in "*?[") and not path.exists():
        matches = sorted(Path(p) for p in glob.glob(spec))
        cases = [(case_name(p), p) for p in matches if not _hidden(p) and (p.is_dir() or image_suffix(p))]
        if not cases:
            raise AbdomenSegError(
                f"no images match '{spec}'", "check the pattern (quote it so the shell does not expand it)"
            )
        return cases, True
    if path.is_dir() and not is_dicom_folder(path):
        cases = [
            (case_name(p), p)
            for p in sorted(path.iterdir())
            if not _hidden(p)
            and ((p.is_file() and image_suffix(p) and image_suffix(p) != ".seg.nrrd") or is_dicom_folder(p))
        ]
        if not cases:
            raise AbdomenSegError(
                f"folder '{path}' holds no images or DICOM series",
                "give an image file, a DICOM series folder or a folder of images",
            )
        return cases, True
    if path.exists() and not path.is_dir():  # refused before any work (io.images.read_image refuses it too)
        require_regular_file(path, "input", "give an image file or a DICOM series folder")
    return [(case_name(path), path)], False


def _hidden(path: Path) -> bool:
    """Hidden files are never cases: they include our own temporary `.part-*` files and locks, which a
    killed run can leave behind."""
    return path.name.startswith(".")


def plan_outputs(cases: list, out_dir: Path, suffix: str) -> list:
    """[(name, input, output)] for a set of cases written into `out_dir` as `<name><suffix>`.

    When the output folder is the input folder, files that are some other case's output (from an
    earlier run) are not inputs; two cases that would write the same file are refused before any work.
    """
    targets = {Path(src).resolve(): out_dir / f"{name}{suffix}" for name, src in cases}
    producers: dict = {}
    for src, dst in targets.items():
        producers.setdefault(dst.resolve(), []).append(src)
    plan = []
    seen: dict[Path, Path] = {}
    for name, src in cases:
        src = Path(src)
        dst = targets[src.resolve()]
        if dst.resolve() == src.resolve():
            if any(other != src.resolve() for other in producers[dst.resolve()]):
                continue  # this file is another case's output from an earlier run, not an input
            raise AbdomenSegError(
                f"output '{dst}' would overwrite the input", "choose another output folder or --format"
            )
        if dst.resolve() in seen:
            raise AbdomenSegError(
                f"inputs '{seen[dst.resolve()]}' and '{src}' would both be written to '{dst}'",
                "give the cases distinct names or segment them into different folders",
            )
        seen[dst.resolve()] = src
        plan.append((name, src, dst))
    return plan


def find_reference(ref_dir: Path, name: str):
    """The file in ref_dir with case name `name` (any image suffix, or `.dcm`: a DICOM SEG), or None."""
    for p in sorted(ref_dir.iterdir()):
        if not p.is_file() or _hidden(p):
            continue
        if (image_suffix(p) and case_name(p) == name) or (p.name.lower().endswith(".dcm") and p.name[:-4] == name):
            return p
    return None
