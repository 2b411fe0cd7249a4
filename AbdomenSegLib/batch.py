"""Single files, folders and globs for `segment` and `evaluate`; existing outputs are skipped.

A folder that holds a DICOM series (and no image files) is one case; any other folder is a set of
cases. Output names are the input's case name plus the chosen suffix.
"""
from __future__ import annotations

import glob
from pathlib import Path

from .errors import AbdomenSegError
from .io import IMAGE_SUFFIXES, case_name, image_suffix


def is_dicom_folder(path: Path) -> bool:
    import SimpleITK as sitk
    if not path.is_dir() or any(p.name.lower().endswith(IMAGE_SUFFIXES) for p in path.iterdir()):
        return False
    return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path)))


def expand_inputs(spec: str) -> tuple:
    """(cases, is_batch): [(case name, path)] for a file, a DICOM folder, a folder of images or a glob."""
    path = Path(spec)
    if any(ch in spec for ch in "*?[") and not path.exists():
        matches = sorted(Path(p) for p in glob.glob(spec))
        cases = [(case_name(p), p) for p in matches if p.is_dir() or image_suffix(p)]
        if not cases:
            raise AbdomenSegError(f"no images match '{spec}'", "check the pattern (quote it so the shell does not expand it)")
        return cases, True
    if path.is_dir() and not is_dicom_folder(path):
        cases = [(case_name(p), p) for p in sorted(path.iterdir())
                 if (p.is_file() and image_suffix(p) and image_suffix(p) != ".seg.nrrd") or is_dicom_folder(p)]
        if not cases:
            raise AbdomenSegError(f"folder '{path}' holds no images or DICOM series",
                                  "give an image file, a DICOM series folder or a folder of images")
        return cases, True
    return [(case_name(path), path)], False


def find_reference(ref_dir: Path, name: str):
    """The file in ref_dir with case name `name` (any image suffix), or None."""
    for p in sorted(ref_dir.iterdir()):
        if p.is_file() and image_suffix(p) and case_name(p) == name:
            return p
    return None
