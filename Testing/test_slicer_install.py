"""Installing AbdomenSeg's Python packages inside Slicer, with a fake `slicer` (and PyTorchUtils) that records calls.

The fakes copy the real signatures, read in Slicer's source (github.com/Slicer/Slicer) and SlicerPyTorch:
- slicer.util.pip_install(requirements): str -> shlex.split, list -> as is (Base/Python/slicer/util.py:3851-3886
  @ v5.6.2, :3991-4033 @ v5.10.0).
- slicer.packaging (Slicer >= 5.12 only): load_requirements(path) (packaging.py:42 @ v5.12.0, :40 @ HEAD) and
  pip_ensure(...) below (:329 @ v5.12.0, :327 @ HEAD).
- PyTorchUtils.PyTorchUtilsLogic.installTorch (fepegar/SlicerPyTorch PyTorchUtils/PyTorchUtils.py:194).
- slicer.util.launchConsoleProcess(args, useStartupEnvironment=True, ...) returns the Popen
  (util.py:3879-3919 @ v5.10.0); _executePythonModule runs [PythonSlicer, -m, module, *args] through it (:3957-3988).
"""

import shlex
import shutil
import sys
import tempfile
import time
import types

import pytest
from packaging.requirements import Requirement

from AbdomenSegLib.core.errors import AbdomenSegError
from AbdomenSegLib.slicer import install

WINDOWS_REQUIREMENTS = (
    r"C:\Users\me\AppData\Local\slicer.org\Slicer 5.6.2\slicer.org\Extensions-32438"
    r"\AbdomenSeg\lib\Slicer-5.6\qt-scripted-modules\Resources\requirements-slicer.txt"
)
WINDOWS_CONSTRAINTS = r"C:\Users\me\AppData\Local\Temp\tmpab12-constraints.txt"

# Versions that meet the requirements (the lean set: no monai, smp or torchvision for the shipped models).
GOOD = {
    "torch": "2.14.1",
    "numpy": "2.4.0",
    "nibabel": "5.4.2",
    "scikit-image": "0.26.0",
    "safetensors": "0.8.0",
    "tqdm": "4.70.1",
}
PY312 = {"python_version": "3.12", "python_full_version": "3.12.10"}  # Slicer 5.10 (CMakeLists.txt:210 @ v5.10.0)
PY39 = {"python_version": "3.9", "python_full_version": "3.9.10"}  # Slicer 5.6 (CMakeLists.txt:216 @ v5.6.2)
LINUX = {"torch_specifier": ">=2.2", "numpy_specifier": ""}


# -- requirement file ------------------------------------------------------------------------------------------------
def test_requirements_never_list_what_slicer_ships():
    names = {n.lower() for n in install.requirement_names()}
    assert names and not names & {n.lower() for n in install.SLICER_BUNDLED}


def test_requirement_lines_parse_like_slicer_packaging_load_requirements():
    # load_requirements (packaging.py:60-69 @ HEAD) feeds every whole non-comment line to Requirement(): a comment
    # after a requirement would raise InvalidRequirement inside Slicer 5.12.
    from packaging.requirements import Requirement

    for line in install.REQUIREMENTS.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#") and not line.startswith("-"):
            assert "#" not in line
            Requirement(line)


@pytest.mark.parametrize("environment", [PY312, PY39])
def test_requirements_are_lean_lower_bounds_only(environment):
    # `==` in Slicer's shared Python would replace what another extension installed; the shipped models need
    # none of monai, smp, torchvision (pure-torch unet3d/unet2d build them).
    reqs = install.applicable_requirements(environment=environment)
    assert {r.name for r in reqs} == {"nibabel", "scikit-image", "safetensors", "tqdm"}
    assert all(s.operator == ">=" for r in reqs for s in r.specifier)
    assert install.architecture_requirements(install_cards()) == []


def install_cards():
    from AbdomenSegLib.models.packages import catalog

    cards = list(catalog().values())
    assert len(cards) == 5  # every shipped model
    return cards


def test_a_package_the_pure_torch_builders_cannot_build_adds_its_library_with_a_lower_bound():
    segresnet = {"architecture": {"class": "SegResNet", "args": {}}}
    pp = {"architecture": {"class": "UnetPlusPlus", "args": {"encoder_name": "resnet18"}}}
    odd_unet = {"architecture": {"class": "UNet", "args": {"channels": [16, 32], "strides": [2], "act": "RELU"}}}
    assert install.architecture_requirements([segresnet, pp, odd_unet]) == [
        "monai>=1.3",
        "segmentation-models-pytorch>=0.3.3",
    ]
    problems = install.dependency_problems(version_of=GOOD.get, cards=[segresnet], **LINUX)
    assert [str(p) for p in problems] == ["monai (not installed; needs monai>=1.3)"]


@pytest.mark.parametrize(
    "system,machine,torch,numpy",
    [
        ("darwin", "x86_64", ">=2.2,<2.3", "<2"),  # Intel Mac, or Apple silicon running Slicer under Rosetta
        ("darwin", "arm64", ">=2.2", ""),
        ("linux", "x86_64", ">=2.2", ""),
        ("win32", "AMD64", ">=2.2", ""),
    ],
)
def test_torch_and_numpy_follow_the_platform(system, machine, torch, numpy):
    assert install.torch_requirement(system, machine) == torch
    assert install.numpy_requirement(system, machine) == numpy
    # torchvision 0.17.x is the release built for torch 2.2 (PyTorchUtils installs it alongside torch)
    assert install.torchvision_requirement(system, machine) == ("<0.18" if numpy else None)


def test_intel_mac_asks_for_torch_2_2_and_numpy_below_2():
    # Slicer 5.10 ships numpy 2.0.2 (SuperBuild/External_python-numpy.cmake:43 @ v5.10.0); torch 2.2.2 is the newest
    # macOS x86_64 wheel on PyPI.
    versions = dict(GOOD, torch=None, numpy="2.0.2")
    problems = install.dependency_problems(
        version_of=versions.get,
        torch_specifier=install.torch_requirement("darwin", "x86_64"),
        numpy_specifier=install.numpy_requirement("darwin", "x86_64"),
    )
    assert [str(p) for p in problems] == [
        "torch (not installed; needs torch>=2.2,<2.3)",
        "numpy (installed 2.0.2, needs numpy<2)",
    ]
    assert install.check("torch", ">=2.2,<2.3", {"torch": "2.2.2"}.get) is None


# -- what is missing or too old ------------------------------------------------------------------------------------
def test_nothing_missing_here():
    assert install.missing_packages() == []  # this test environment has what the engine needs


def test_missing_packages_reports_torch_first():
    versions = dict(GOOD, torch=None, tqdm=None)
    assert install.missing_packages(version_of=versions.get) == ["torch", "tqdm"]


def test_an_installed_but_old_torch_or_package_counts_and_says_which_versions():
    versions = dict(GOOD, torch="2.1.0", nibabel="4.0.2")
    problems = install.dependency_problems(version_of=versions.get, environment=PY312, **LINUX)
    assert [str(p) for p in problems] == [
        "torch (installed 2.1.0, needs torch>=2.2)",
        "nibabel (installed 4.0.2, needs nibabel>=5.0)",
    ]
    assert str(install.Problem("monai", ">=1.3")) == "monai (not installed; needs monai>=1.3)"


@pytest.mark.parametrize(
    "installed,ok",
    [
        ("2.2.2", True),
        ("2.14.1+cu130", True),
        ("2.9.0a0+git1234", True),
        ("2.1.2+cu118", False),
        ("junk", False),
    ],
)
def test_torch_builds_compare_by_their_version(installed, ok):
    assert (install.check("torch", ">=2.2", {"torch": installed}.get) is None) == ok


def test_confirm_message_says_what_and_how_big():
    only_packages = install.confirm_message([install.Problem("tqdm", ">=4.0")])
    assert "tqdm (not installed; needs tqdm>=4.0)" in only_packages and "about 20 MB" in only_packages
    assert "PyTorch" not in only_packages
    with_torch = install.confirm_message([install.Problem("torch", ">=2.2", "2.1.0")])
    assert "about 4 GB" in with_torch and "CPU" in with_torch and "restart" in with_torch


def test_constraints_pin_installed_bundled_packages():
    import numpy

    path = install.constraints_file()
    try:
        text = open(path).read()
        assert f"numpy=={numpy.__version__}" in text and "torch==" in text and "scipy==" in text
        assert "numpy==" not in open(install.constraints_file(leave_out=["numpy"])).read()
    finally:
        import os

        os.unlink(path)


# -- pip in a child process: nothing blocks (Slicer 5.6-5.10) ----------------------------------------------------------
def test_pip_run_returns_at_once_and_reports_output_and_exit_code():
    import subprocess

    script = "import time; print('Collecting tqdm', flush=True); time.sleep(1.0); print('Successfully installed')"
    process = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True
    )
    logged = []
    started = time.monotonic()
    run = install.PipRun(process, log=logged.append)
    assert run.poll() is None and time.monotonic() - started < 0.5  # the panel's timer tick is never held up
    run.wait(0.05)
    assert logged == ["Collecting tqdm", "Successfully installed"] and run.last_line == "Successfully installed"
    failing = subprocess.Popen(
        [sys.executable, "-c", "raise SystemExit(3)"], stdout=subprocess.PIPE, universal_newlines=True
    )
    with pytest.raises(subprocess.CalledProcessError):
        install.PipRun(failing, log=logged.append).wait(0.05)


# -- installing inside Slicer (fake slicer) --------------------------------------------------------------------------
class FakeVersions(dict):
    def version_of(self, name):
        return self.get(name)


@pytest.fixture
def slicer_install(monkeypatch, tmp_path):
    """REQUIREMENTS in a folder named like Slicer's install folder (space), temp files in a folder with a space."""
    folder = tmp_path / "Slicer 5.6.2" / "qt-scripted-modules" / "Resources"
    folder.mkdir(parents=True)
    requirements = folder / "requirements-slicer.txt"
    shutil.copy(install.REQUIREMENTS, requirements)
    temp = tmp_path / "Local Temp"
    temp.mkdir()
    monkeypatch.setattr(install, "REQUIREMENTS", requirements)
    monkeypatch.setattr(install, "TORCH_REQUIREMENT", ">=2.2")
    monkeypatch.setattr(install, "numpy_requirement", lambda *a: "")
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    versions = FakeVersions(GOOD)
    monkeypatch.setattr(install, "installed_version", versions.version_of, raising=False)
    calls = []
    slicer = types.ModuleType("slicer")  # a plain module: `import slicer.packaging` fails as in Slicer <= 5.10
    outcome = {"exit": 0}

    def launchConsoleProcess(args, useStartupEnvironment=True, updateEnvironment=None, cwd=None):  # util.py:3879
        import subprocess

        install_args = list(args[args.index("install") + 1 :])
        constraints = install_args[install_args.index("-c") + 1]
        calls.append(("pip install", install_args, open(constraints).read().splitlines()))
        if outcome["exit"] == 0:
            versions.update(GOOD)
            named = [a for i, a in enumerate(install_args) if a[0] != "-" and install_args[i - 1] not in ("-r", "-c")]
            versions.update({Requirement(a).name: "99.0" for a in named})
        script = f"print('pip ran'); raise SystemExit({outcome['exit']})"
        return subprocess.Popen(
            [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True
        )

    slicer.util = types.SimpleNamespace(launchConsoleProcess=launchConsoleProcess)
    monkeypatch.setitem(sys.modules, "slicer", slicer)
    monkeypatch.delitem(sys.modules, "slicer.packaging", raising=False)
    return types.SimpleNamespace(
        requirements=requirements, versions=versions, calls=calls, slicer=slicer, temp=temp, outcome=outcome
    )


def test_old_string_form_breaks_windows_paths():
    # What `pip_install(f"-r {REQUIREMENTS} -c {constraints}")` did in Slicer 5.6-5.10 (util.py:3881 @ v5.6.2):
    args = shlex.split(f"-r {WINDOWS_REQUIREMENTS} -c {WINDOWS_CONSTRAINTS}")
    assert args[:3] == [
        "-r",
        "C:UsersmeAppDataLocalslicer.orgSlicer",
        "5.6.2slicer.orgExtensions-32438AbdomenSeglib" "Slicer-5.6qt-scripted-modulesResourcesrequirements-slicer.txt",
    ]
    assert args[-1] == "C:UsersmeAppDataLocalTemptmpab12-constraints.txt"


def test_windows_paths_reach_pip_intact():
    assert install.pip_arguments(WINDOWS_CONSTRAINTS, path=WINDOWS_REQUIREMENTS) == [
        "-r",
        WINDOWS_REQUIREMENTS,
        "-c",
        WINDOWS_CONSTRAINTS,
    ]


def test_ensure_dependencies_passes_a_list_with_paths_intact_and_deletes_its_constraints(slicer_install):
    slicer_install.versions.update(tqdm=None)
    asked = []
    assert install.ensure_dependencies(
        confirm=lambda message: asked.append(message) or True, log=lambda m: None, cards=[]
    )
    assert "tqdm (not installed; needs tqdm>=" in asked[0]
    ((kind, args, pins),) = slicer_install.calls
    assert kind == "pip install" and len(args) == 4
    assert args[:2] == ["-r", str(slicer_install.requirements)] and "Slicer 5.6.2" in args[1]
    assert args[2] == "-c" and args[3].startswith(str(slicer_install.temp)) and " " in args[3]
    assert pins == [f"numpy=={GOOD['numpy']}", f"torch=={GOOD['torch']}"]
    assert list(slicer_install.temp.iterdir()) == []  # the constraints file is gone


def test_a_failing_pip_is_a_clear_error_and_leaves_no_temp_file(slicer_install):
    slicer_install.versions.update(tqdm=None)
    slicer_install.outcome["exit"] = 1
    with pytest.raises(AbdomenSegError, match="pip could not install tqdm"):
        install.ensure_dependencies(confirm=lambda message: True, log=lambda m: None, cards=[])
    assert list(slicer_install.temp.iterdir()) == []


def test_the_panel_steps_never_wait_for_pip(slicer_install):
    slicer_install.versions.update(tqdm=None)
    installation = install.Installation([], log=lambda m: None)
    started = time.monotonic()
    installation.start()
    assert installation.pip is not None and time.monotonic() - started < 1.0
    while not installation.poll():
        time.sleep(0.05)
    assert installation.finish() and list(slicer_install.temp.iterdir()) == []


def test_a_package_needing_monai_installs_it_with_a_lower_bound(slicer_install):
    segresnet = {"architecture": {"class": "SegResNet", "args": {}}}
    assert install.ensure_dependencies(confirm=lambda m: True, log=lambda m: None, cards=[segresnet]) is True
    ((_, args, _),) = slicer_install.calls
    assert args[2:4] == ["monai>=1.3", "-c"]


def test_slicer_packaging_is_used_when_present(slicer_install, monkeypatch):
    packaging = types.ModuleType("slicer.packaging")

    def load_requirements(path):  # packaging.py:40 @ HEAD
        slicer_install.calls.append(("load_requirements", path))
        return []

    def pip_ensure(
        requirements,
        constraints=None,
        skip_packages=None,
        prompt_install=True,
        prompt_restart=True,
        requester=None,
        skip_in_testing=True,
        show_progress=True,
    ):  # packaging.py:327-336 @ HEAD
        slicer_install.calls.append(
            ("pip_ensure", requirements, constraints, prompt_install, prompt_restart, requester, skip_in_testing)
        )
        slicer_install.versions.update(GOOD)

    packaging.load_requirements, packaging.pip_ensure = load_requirements, pip_ensure
    slicer_install.slicer.packaging = packaging
    monkeypatch.setitem(sys.modules, "slicer.packaging", packaging)
    slicer_install.versions.update(nibabel="4.0")
    monkeypatch.delitem(sys.modules, "nibabel", raising=False)  # not loaded yet: no restart needed
    assert install.ensure_dependencies(confirm=lambda message: True, log=lambda m: None, cards=[])
    (load, ensure) = slicer_install.calls
    assert load == ("load_requirements", str(slicer_install.requirements))
    assert ensure[1] == [] and ensure[2].startswith(str(slicer_install.temp))
    assert ensure[3:] == (False, False, "AbdomenSeg", False)  # we asked already; our consent stands in testing
    assert list(slicer_install.temp.iterdir()) == []


class FakePyTorchUtilsLogic:
    calls: list = []

    def installTorch(
        self,
        askConfirmation=False,
        forceComputationBackend=None,
        torchVersionRequirement=None,
        torchvisionVersionRequirement=None,
    ):  # PyTorchUtils.py:194
        self.calls.append((askConfirmation, torchVersionRequirement))
        self.versions.update(torch="2.14.1")
        return types.ModuleType("torch")


@pytest.fixture
def pytorchutils(slicer_install, monkeypatch):
    FakePyTorchUtilsLogic.calls = []
    FakePyTorchUtilsLogic.versions = slicer_install.versions
    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=FakePyTorchUtilsLogic))
    return FakePyTorchUtilsLogic.calls


def test_a_loaded_torch_is_never_replaced_restart_first(slicer_install, pytorchutils):
    import torch  # noqa: F401  (loaded, as in a Slicer session that used it)

    slicer_install.versions.update(torch="2.1.0")
    asked = []
    with pytest.raises(AbdomenSegError, match="restart Slicer") as raised:
        install.ensure_dependencies(confirm=lambda message: asked.append(message) or True, cards=[])
    assert "PyTorch 2.1.0 is loaded" in str(raised.value)
    assert "torch (installed 2.1.0, needs torch>=2.2)" in asked[0]
    assert pytorchutils == [] and slicer_install.calls == []  # nothing touched


def test_a_missing_torch_is_installed_through_pytorchutils(slicer_install, pytorchutils, monkeypatch):
    monkeypatch.delitem(sys.modules, "torch", raising=False)  # Slicer at first use has no torch loaded (put back after)
    slicer_install.versions.update(torch=None)
    assert install.ensure_dependencies(confirm=lambda message: True, log=lambda m: None, cards=[])
    assert pytorchutils == [(False, ">=2.2")]
    assert slicer_install.calls == []  # the other packages were fine: no pip run


def test_refusal_or_batch_lists_what_is_missing(slicer_install):
    slicer_install.versions.update(torch="2.1.0", tqdm=None)
    with pytest.raises(AbdomenSegError, match=r"torch \(installed 2.1.0, needs torch>=.*tqdm \(not installed"):
        install.ensure_dependencies(confirm=None, cards=[])
    with pytest.raises(AbdomenSegError, match="allow the installation"):
        install.ensure_dependencies(confirm=lambda message: False, cards=[])
    assert slicer_install.calls == []


def test_still_missing_after_pip_is_an_error(slicer_install, monkeypatch):
    slicer_install.versions.update(nibabel=None)
    real = slicer_install.slicer.util.launchConsoleProcess

    def pip_succeeds_but_installs_nothing(args, *rest):
        process = real(args, *rest)
        slicer_install.versions.update(nibabel=None)
        return process

    monkeypatch.setattr(slicer_install.slicer.util, "launchConsoleProcess", pip_succeeds_but_installs_nothing)
    with pytest.raises(AbdomenSegError, match="still missing or too old after installation: nibabel"):
        install.ensure_dependencies(confirm=lambda message: True, log=lambda m: None, cards=[])


def test_intel_mac_installs_numpy_below_2_unpinned_then_asks_for_a_restart(slicer_install, monkeypatch):
    # Slicer 5.10 on an x86_64 macOS Python: numpy 2.0.2 shipped and loaded (it always is), torch 2.2.2 installed.
    monkeypatch.setattr(install, "numpy_requirement", lambda *a: "<2")
    monkeypatch.setattr(install, "TORCH_REQUIREMENT", ">=2.2,<2.3")
    slicer_install.versions.update(torch="2.2.2", numpy="2.0.2")
    real = slicer_install.slicer.util.launchConsoleProcess

    def pip(args, *rest):
        process = real(args, *rest)
        slicer_install.versions.update(numpy="1.26.4", torch="2.2.2")  # pip kept the pinned torch
        return process

    monkeypatch.setattr(slicer_install.slicer.util, "launchConsoleProcess", pip)
    with pytest.raises(AbdomenSegError, match="updated numpy, but the old version is still loaded. restart Slicer"):
        install.ensure_dependencies(confirm=lambda message: True, log=lambda m: None, cards=[])
    ((_, args, pins),) = slicer_install.calls
    assert "numpy<2" in args and not any(p.startswith("numpy==") for p in pins) and "torch==2.2.2" in pins
    assert list(slicer_install.temp.iterdir()) == []
