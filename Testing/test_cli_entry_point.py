"""The command's entry point leaves without the interpreter's tear-down (cli.run, os._exit): the exit code must
still be main's, and everything it printed and wrote must be complete, with pipes (block-buffered) too."""

import os
import subprocess
import sys

import SimpleITK as sitk

from AbdomenSegLib.io.phantom import make_phantom


def _run(*args):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # a user's default: buffered pipes
    return subprocess.run(
        [sys.executable, "-m", "AbdomenSegLib", *map(str, args)], capture_output=True, text=True, timeout=300, env=env
    )


def test_an_error_keeps_its_code_and_message(tmp_path):
    done = _run("segment", tmp_path / "missing.nii.gz", tmp_path / "out.nii.gz")
    assert done.returncode == 2
    assert "error: input" in done.stderr and "does not exist" in done.stderr
    assert not (tmp_path / "out.nii.gz").exists()


def test_a_run_keeps_its_code_its_output_and_its_printed_lines(tiny_package, tmp_path):
    image, _ = make_phantom(size=(64, 56, 40))
    sitk.WriteImage(image, str(tmp_path / "ct.nrrd"))
    done = _run(
        "segment", tmp_path / "ct.nrrd", tmp_path / "organs.nrrd", "--model", tiny_package.path, "--progress-json"
    )
    assert done.returncode in (0, 3), done.stderr  # 3: the untrained model's result is flagged, as documented
    out = sitk.ReadImage(str(tmp_path / "organs.nrrd"))
    assert out.GetSize() == image.GetSize() and out.GetOrigin() == image.GetOrigin()
    last = done.stdout.strip().splitlines()[-1]
    assert '"done": true' in last and f'"exit": {done.returncode}' in last  # the final line arrived whole


def test_printed_output_survives_the_quick_exit_through_a_pipe():
    """`models` prints the catalog with plain print(): block-buffered in a pipe, lost unless run() flushes."""
    done = _run("models")
    assert done.returncode == 0 and "btcv-ct-3d-unet" in done.stdout
