"""Python dependencies inside 3D Slicer: what is missing or too old, and installing it with the user's consent.

torch must come from Slicer's PyTorch extension (PyTorchUtils picks the right CUDA/CPU build); the rest from
Resources/requirements-slicer.txt, constrained so pip never replaces what Slicer ships (SimpleITK, numpy, scipy, ...)
or the torch PyTorchUtils installed.

Facts this relies on, read in Slicer's source (github.com/Slicer/Slicer) and SlicerPyTorch (fepegar/SlicerPyTorch):
- slicer.util.pip_install(str) splits the string with shlex.split in Slicer 5.6-5.10 (Base/Python/slicer/util.py
  :3881 @ v5.6.2, :4028 @ v5.10.0): POSIX rules, so Windows backslashes vanish and a path with a space becomes two
  arguments. A list is passed to pip untouched (:3882-3883 @ v5.6.2, :4029-4030 @ v5.10.0; it must be a `list`:
  `type(requirements) == list`, a tuple raises ValueError) and reaches the PythonSlicer process as one argv item
  each (_executePythonModule, :3846 @ v5.6.2, :3986 @ v5.10.0).
- slicer.packaging exists from Slicer 5.12 (Base/Python/slicer/packaging.py, absent at v5.10.0):
  load_requirements(path) (:42 @ v5.12.0, :40 @ HEAD) and pip_ensure(requirements, constraints=None,
  skip_packages=None, prompt_install=True, prompt_restart=True, requester=None, skip_in_testing=True,
  show_progress=True) (:329 @ v5.12.0, :327 @ HEAD). It evaluates markers and compares installed versions
  (pip_check, :195-212 @ HEAD) and installs only what fails, as a list (no shlex).
- `packaging` ships with Slicer's Python since 5.6 (SuperBuild/External_python-pythonqt-requirements.cmake:35:
  packaging==23.2 @ v5.6.2, 25.0 @ v5.10.0), so versions are compared with it here, as Slicer's pip_check does.
- PyTorchUtilsLogic().installTorch(askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None,
  torchvisionVersionRequirement=None) (PyTorchUtils/PyTorchUtils.py:194) runs light-the-torch with
  "torch" + torchVersionRequirement and "torchvision" (:235-240), returns the torch module, or None only when its own
  confirmation is declined (:207-214). It has no version check of its own (torchInstalled() at :158 only checks that
  torch is there); SlicerTotalSegmentator compares torch's version itself (TotalSegmentator.py:882-887).
"""

from __future__ import annotations

import importlib.metadata
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from AbdomenSegLib.core.errors import AbdomenSegError
from AbdomenSegLib.core.options import LogCallback
from AbdomenSegLib.models.packages import RESOURCES

REQUIREMENTS = RESOURCES / "requirements-slicer.txt"
# Slicer ships these (SuperBuild/External_python-*.cmake, e.g. numpy==1.26.1 scipy==1.11.3 Pillow==10.1.0
# packaging==23.2 requests==2.31.0 @ v5.6.2; SimpleITK and VTK are built by Slicer) or the PyTorch extension installs
# them: pip must never replace them (a restart at best, a broken Slicer at worst), so they are pinned to what is
# installed (constraints_file) and never listed in REQUIREMENTS.
SLICER_BUNDLED = ("SimpleITK", "numpy", "scipy", "pillow", "packaging", "requests", "vtk", "torch", "torchvision")
TORCH_PACKAGES = ("torch", "torchvision")  # installed through PyTorchUtils, never by pip -r REQUIREMENTS
REQUESTER = "AbdomenSeg"

# What one installation downloads, measured (pip download of the resolved wheels, Linux x86_64, with Slicer's own
# packages and torch excluded): 29 MB for Python 3.12 (Slicer 5.10/5.12: monai 1.6.1, smp 0.6.0, scikit-image 0.26.0,
# nibabel 5.4.2, timm, huggingface-hub, hf-xet, ...; 20 wheels) and 33 MB for Python 3.9 (Slicer 5.6/5.8; 26 wheels).
PACKAGES_DOWNLOAD = "about 30 MB"
# torch through the PyTorch extension, wheel sizes on PyPI: CPU builds 74-241 MB (torch 2.8.0 / 2.14.1 for Windows
# and macOS); a CUDA build on Linux is torch + NVIDIA libraries + triton: 3.9 GB (2.8.0) to 4.1 GB (2.9.1). The
# CUDA wheels light-the-torch takes from download.pytorch.org for Windows could not be measured here.
TORCH_DOWNLOAD = (
    "about 75-250 MB for a CPU-only build, several GB (about 4 GB on Linux) " "for an NVIDIA GPU (CUDA) build"
)


def torch_requirement(python_version=None) -> str:
    """The torch version the pinned packages need on this Python (passed to PyTorchUtils as torchVersionRequirement).

    Python >= 3.10: monai 1.6.1 requires torch>=2.8.0 (its Requires-Dist); the models were validated with 2.14.1.
    Python 3.9 (Slicer 5.6/5.8): monai 1.5.2 requires torch>=2.4.1; 2.8.0 is the last torch built for Python 3.9.
    """
    version = tuple(python_version or sys.version_info[:2])
    return ">=2.8" if version >= (3, 10) else ">=2.4.1"


TORCH_REQUIREMENT = torch_requirement()


@dataclass(frozen=True)
class Problem:
    """A requirement the installed packages do not meet."""

    name: str
    needs: str  # the version specifier, e.g. "==1.6.1" or ">=2.8" ("" = any version)
    installed: str | None = None  # None: not installed

    def __str__(self) -> str:
        needs = f"needs {self.name}{self.needs}" if self.needs else "needed"
        if self.installed is None:
            return f"{self.name} (not installed; {needs})"
        return f"{self.name} (installed {self.installed}, {needs})"


def _requirement(line: str):
    from packaging.requirements import Requirement

    return Requirement(line)


def requirement_lines(path=None) -> list:
    """Every requirement line of the file (comments, blank lines and pip options dropped), as written."""
    lines = []
    for line in Path(REQUIREMENTS if path is None else path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#") and not line.startswith("-"):
            lines.append(line)
    return lines


def requirement_names(path=None) -> list:
    """Distribution names in the file, each once, whatever Python the markers select."""
    names = []
    for line in requirement_lines(path):
        name = _requirement(line).name
        if name not in names:
            names.append(name)
    return names


def applicable_requirements(path=None, environment=None) -> list:
    """The file's requirements whose markers hold here (or in `environment`, a dict of marker variables)."""
    reqs = [_requirement(line) for line in requirement_lines(path)]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(environment)]


def installed_version(name: str):
    """The installed distribution's version, or None. Reads metadata only: importing torch could lock its files."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def check(name: str, specifier: str = "", version_of=None):
    """A Problem when `name` is missing or its installed version is outside `specifier`, else None."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    installed = (version_of or installed_version)(name)
    if installed is None:
        return Problem(name, specifier)
    try:
        # prereleases=True: a torch "2.9.0a0+git..." someone built is as new as its number says
        ok = SpecifierSet(specifier).contains(Version(installed), prereleases=True)
    except InvalidVersion:
        ok = False
    return None if ok else Problem(name, specifier, installed)


def dependency_problems(path=None, version_of=None, environment=None, torch_specifier=None) -> list:
    """What is missing or too old, torch and torchvision first (`version_of(name) -> str | None` for tests)."""
    version_of = version_of or installed_version
    torch_specifier = TORCH_REQUIREMENT if torch_specifier is None else torch_specifier
    found = [check("torch", torch_specifier, version_of), check("torchvision", "", version_of)]
    for req in applicable_requirements(path, environment):
        found.append(check(req.name, str(req.specifier), version_of))
    return [p for p in found if p is not None]


def missing_packages(path=None, version_of=None, environment=None) -> list:
    """Names (torch first) of the packages that are not installed or too old; [] when all is well."""
    return [p.name for p in dependency_problems(path, version_of, environment)]


def confirm_message(problems) -> str:
    """What the user is asked before anything is downloaded: which packages, why, and how much."""
    lines = ["AbdomenSeg needs these Python packages, missing or too old in Slicer's Python:"]
    lines += [f"  - {p}" for p in problems]
    sizes = []
    if any(p.name in TORCH_PACKAGES for p in problems):
        sizes.append(f"PyTorch, installed by the PyTorch extension: {TORCH_DOWNLOAD}")
    if any(p.name not in TORCH_PACKAGES for p in problems):
        sizes.append(f"the other packages and what they depend on: {PACKAGES_DOWNLOAD}")
    lines.append("Download: " + "; ".join(sizes) + ".")
    if any(p.installed for p in problems):
        lines.append("Packages that were already loaded need a restart of Slicer to take effect.")
    lines.append("Install them now?")
    return "\n".join(lines)


def constraints_file() -> str:
    """Pin what is installed of Slicer's own packages (and torch) so pip keeps them."""
    pins = []
    for name in SLICER_BUNDLED:
        version = installed_version(name)
        if version is not None:
            pins.append(f"{name}=={version}")
    handle = tempfile.NamedTemporaryFile("w", suffix="-constraints.txt", delete=False)
    handle.write("\n".join(pins) + "\n")
    handle.close()
    return handle.name


def _slicer_packaging():
    """slicer.packaging (Slicer >= 5.12) or None. Only the import is guarded, never the calls."""
    try:
        import slicer.packaging as packaging
    except ImportError:
        return None
    return packaging


def install_requirements(constraints: str, path=None) -> None:
    """pip-install the requirement file inside Slicer, keeping every path one argument (Windows, spaces)."""
    path = REQUIREMENTS if path is None else path
    packaging = _slicer_packaging()
    if packaging is not None:
        # We asked already (with sizes), so no second dialog; we check for a needed restart ourselves; our consent
        # stands in testing mode too (pip_ensure would otherwise skip silently and leave the packages missing).
        packaging.pip_ensure(
            packaging.load_requirements(str(path)),
            constraints=str(constraints),
            prompt_install=False,
            prompt_restart=False,
            requester=REQUESTER,
            skip_in_testing=False,
        )
    else:
        import slicer

        slicer.util.pip_install(["-r", str(path), "-c", str(constraints)])


def install_torch(requirement: str | None = None) -> None:
    """torch and torchvision through the PyTorch extension (it picks the CUDA or CPU build)."""
    try:
        import PyTorchUtils
    except ImportError:
        raise AbdomenSegError(
            "the PyTorch extension is not installed",
            "install 'PyTorch' from the Extensions Manager, restart Slicer, and try again",
        ) from None
    requirement = TORCH_REQUIREMENT if requirement is None else requirement
    try:
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
            askConfirmation=False, torchVersionRequirement=requirement
        )
    except Exception as exc:  # light-the-torch/pip failed: CalledProcessError, network errors
        raise AbdomenSegError(
            f"PyTorch could not be installed ({exc})",
            "see the Python console; or install it from the PyTorch Utils module "
            f"with version requirement {requirement}",
        ) from None
    if torch is None:
        raise AbdomenSegError("PyTorch was not installed", "install it from the PyTorch Utils module")


def _loaded(problems) -> list:
    """Packages about to be replaced while an older version is already imported in this process."""
    import_names = {"segmentation-models-pytorch": "segmentation_models_pytorch", "scikit-image": "skimage"}
    return [
        p.name for p in problems if p.installed and import_names.get(p.name, p.name.replace("-", "_")) in sys.modules
    ]


def ensure_dependencies(confirm=None, log: LogCallback = print) -> bool:
    """Install what is missing or too old inside Slicer. `confirm(message) -> bool` asks the user; None = refuse.

    Returns True when everything needed is installed at a fitting version afterwards.
    """
    problems = dependency_problems()
    if not problems:
        return True
    listed = "; ".join(str(p) for p in problems)
    if confirm is None or not confirm(confirm_message(problems)):
        raise AbdomenSegError(
            f"Python packages missing or too old: {listed}",
            "allow the installation when asked, or install them from the Python console",
        )
    loaded = _loaded(problems)
    if any(p.name in TORCH_PACKAGES for p in problems):
        install_torch()
    rest = [p for p in dependency_problems() if p.name not in TORCH_PACKAGES]
    if rest:
        constraints = constraints_file()  # after torch, so the torch just installed is kept
        try:
            install_requirements(constraints)
        except Exception as exc:  # CalledProcessError (logProcessOutput, util.py:3814 @ v5.6.2)
            raise AbdomenSegError(
                f"pip could not install {', '.join(p.name for p in rest)} ({exc})",
                "see the Python console for pip's message; check the network connection",
            ) from None
    importlib.invalidate_caches()
    still = dependency_problems()
    if still:
        raise AbdomenSegError(
            f"still missing or too old after installation: {'; '.join(str(p) for p in still)}",
            "restart Slicer; if it persists, see the Python console for pip's message",
        )
    if loaded:
        raise AbdomenSegError(
            f"updated {', '.join(loaded)}, but the old version is still loaded", "restart Slicer to use the new version"
        )
    log("AbdomenSeg dependencies installed.")
    return True
