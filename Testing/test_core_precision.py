"""bfloat16 inference is chosen only where the CPU computes it natively and the model's card validated it."""

import numpy as np
import pytest
import SimpleITK as sitk

from AbdomenSegLib.core import precision
from AbdomenSegLib.core.errors import AbdomenSegError
from AbdomenSegLib.io.phantom import make_phantom


class _Card(dict):
    pass


@pytest.fixture()
def cpu(monkeypatch):
    """Pretend to be a CPU with (True) or without (False) bf16 instructions."""

    def set_native(native: bool):
        monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)

    return set_native


@pytest.mark.parametrize(
    "native,validated,requested,expected",
    [
        (True, True, "auto", "bf16"),
        (True, False, "auto", "fp32"),
        (False, True, "auto", "fp32"),
        (True, False, "bf16", "bf16"),
        (True, True, "fp32", "fp32"),
        (False, False, "fp32", "fp32"),
    ],
)
def test_precision_is_chosen_from_the_cpu_and_the_card(cpu, native, validated, requested, expected):
    cpu(native)
    card = _Card(inference={"bf16_validated": validated})
    assert precision.resolve_precision(requested, "cpu", card) == expected


def test_bf16_is_refused_where_the_cpu_would_emulate_it(cpu):
    cpu(False)
    with pytest.raises(AbdomenSegError, match="no bfloat16 instructions"):
        precision.resolve_precision("bf16", "cpu", _Card())


def test_cuda_keeps_its_own_mixed_precision(cpu):
    cpu(True)
    assert precision.resolve_precision("auto", "cuda", _Card(inference={"bf16_validated": True})) == "fp32"


def test_cpu_flags_are_read_not_assumed(monkeypatch, tmp_path):
    """The detection reads the flags line of /proc/cpuinfo (on Linux) and nothing else."""
    import builtins

    real_open = builtins.open
    for flags, expected in (
        ("fpu sse2 avx2 avx512f", False),
        ("fpu avx512f avx512_bf16", True),
        ("amx_bf16 sse", True),
    ):
        info = tmp_path / "cpuinfo"
        info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n", encoding="utf-8")
        monkeypatch.setattr(
            builtins, "open", lambda p, *a, info=info, **k: real_open(info if p == "/proc/cpuinfo" else p, *a, **k)
        )
        monkeypatch.setattr(precision.platform, "system", lambda: "Linux")
        precision.cpu_has_native_bf16.cache_clear()
        assert precision.cpu_has_native_bf16() is expected
    precision.cpu_has_native_bf16.cache_clear()


def test_bf16_run_really_runs_in_bf16_and_agrees(cpu, tiny_package, monkeypatch):
    """On any CPU (emulated where need be) the bf16 path gives nearly the fp32 labels on a phantom."""
    from AbdomenSegLib.inference.segmenter import Options, Segmenter

    cpu(True)
    ct, _ = make_phantom(size=(64, 56, 24), spacing=(6.0, 6.0, 10.0))
    segmenter = Segmenter(tiny_package, "cpu")
    a = sitk.GetArrayFromImage(segmenter.segment(ct, Options(precision="fp32")))
    assert segmenter.precision == "fp32"
    b = sitk.GetArrayFromImage(segmenter.segment(ct, Options(precision="bf16")))
    assert segmenter.precision == "bf16"
    assert np.mean(a == b) > 0.98
