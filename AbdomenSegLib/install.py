"""Python dependencies inside 3D Slicer: what is missing, and installing it with the user's consent.

torch must come from Slicer's PyTorch extension (PyTorchUtils picks the right CUDA/CPU build); the
rest from Resources/requirements-slicer.txt, constrained so pip never replaces what Slicer ships
(SimpleITK, numpy, VTK) or the torch PyTorchUtils installed.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import tempfile
from pathlib import Path

from .errors import AbdomenSegError
from .models import RESOURCES

REQUIREMENTS = RESOURCES / "requirements-slicer.txt"
SLICER_BUNDLED = ("SimpleITK", "numpy", "vtk", "torch", "torchvision")
IMPORT_NAMES = {"segmentation-models-pytorch": "segmentation_models_pytorch", "scikit-image": "skimage"}
TORCH_REQUIREMENT = ">=2.1"


def requirement_names(path=REQUIREMENTS) -> list:
    names = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(re.split(r"[<>=!~ \[;]", line, maxsplit=1)[0])
    return names


def missing_packages(path=REQUIREMENTS, find_spec=importlib.util.find_spec) -> list:
    """Distribution names (torch first) whose modules cannot be imported."""
    missing = [] if find_spec("torch") else ["torch"]
    for name in requirement_names(path):
        if not find_spec(IMPORT_NAMES.get(name, name.replace("-", "_"))):
            missing.append(name)
    return missing


def constraints_file() -> str:
    """Pin what is already installed of Slicer's own packages so pip keeps them."""
    pins = []
    for name in SLICER_BUNDLED:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    handle = tempfile.NamedTemporaryFile("w", suffix="-constraints.txt", delete=False)
    handle.write("\n".join(pins) + "\n")
    handle.close()
    return handle.name


def ensure_dependencies(confirm=None, log=print) -> bool:
    """Install what is missing inside Slicer. `confirm(message) -> bool` asks the user; None = batch (refuse).

    Returns True when everything is importable afterwards.
    """
    missing = missing_packages()
    if not missing:
        return True
    message = ("AbdomenSeg needs these Python packages, which are not installed yet: "
               f"{', '.join(missing)}. Install them now? (This downloads several hundred MB once.)")
    if confirm is None or not confirm(message):
        raise AbdomenSegError(f"missing Python packages: {', '.join(missing)}",
                              "allow the installation when asked, or install them from the Python console")
    if "torch" in missing:
        try:
            import PyTorchUtils
        except ImportError:
            raise AbdomenSegError("the PyTorch extension is not installed",
                                  "install 'PyTorch' from the Extensions Manager, restart Slicer, and try again") from None
        if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                         torchVersionRequirement=TORCH_REQUIREMENT) is None:
            raise AbdomenSegError("PyTorch could not be installed", "see the Python console; install it from the PyTorch module")
    import slicer
    constraints = constraints_file()
    try:
        import slicer.pydeps as pydeps  # Slicer >= 5.11
        pydeps.pip_ensure(pydeps.load_requirements(str(REQUIREMENTS)), constraints=constraints, requester="AbdomenSeg")
    except ImportError:
        slicer.util.pip_install(f"-r {REQUIREMENTS} -c {constraints}")
    still = missing_packages()
    if still:
        raise AbdomenSegError(f"still missing after installation: {', '.join(still)}",
                              "restart Slicer; if it persists, see the Python console for pip's message")
    log("AbdomenSeg dependencies installed.")
    return True
