"""First-use installation of torch, sam2 and nibabel into Slicer's Python, each only after the user agrees.

Checks look for installed distributions without importing them, so opening the module stays fast and
imports nothing heavy. `slicer` is imported inside the functions that install: this file also imports in a
plain Python (the static tests do).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import os
import re
import tempfile
from pathlib import Path

from .errors import MedSAM2Error

# sam2 1.1.0 declares these floors; torch and torchvision come from the PyTorch extension, which picks the
# CUDA or CPU build that fits the computer.
TORCH_MINIMUM = "2.5.1"
TORCHVISION_MINIMUM = "0.20.1"
# The PyPI upload of sam2 1.1.0 is a third party's (code byte-identical to Meta's commit 2b90b9f); the hash
# keeps it that way. pip accepts --hash only inside a requirements file, and once one requirement has a
# hash every package of that command needs one: sam2 gets its own command, without dependencies.
SAM2_PINNED = "sam2==1.1.0 --hash=sha256:7e0ea252d43c10d853e3acfce0b5770ac683c30481bd6de311300e9d44f45b74"
# sam2's own light dependencies (numpy ships with Slicer).
SAM2_DEPENDENCIES = {"hydra-core": "hydra-core>=1.3.2", "iopath": "iopath>=0.1.10", "tqdm": "tqdm>=4.66.1",
                     "pillow": "pillow>=9.4.0"}
NIBABEL = "nibabel>=5.0"


class DependencyError(MedSAM2Error):
    """A required package is missing and could not be installed, or the user declined to install it."""

    kind = "dependencies"


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _release(version: str) -> tuple[int, ...]:
    """Leading numeric release of a version string: '2.14.1+cu128' -> (2, 14, 1)."""
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0].split("rc")[0])[:3])


def _older(version: str | None, minimum: str) -> bool:
    return version is None or _release(version) < _release(minimum)


def torch_needed() -> bool:
    """torch or torchvision is absent (or older than sam2 accepts)."""
    return _older(_version("torch"), TORCH_MINIMUM) or _older(_version("torchvision"), TORCHVISION_MINIMUM)


def _testing() -> bool:
    """Slicer runs its self-tests (ctest): nothing may be installed into its Python then."""
    import slicer

    app = getattr(slicer, "app", None)
    return bool(app is not None and app.testingEnabled())


def pip_requirements_needed() -> list[str]:
    """The pip-installable requirements still missing, sam2 last (it installs without dependencies)."""
    needed = [spec for name, spec in SAM2_DEPENDENCIES.items() if _version(name) is None]
    if _version("nibabel") is None:
        needed.append(NIBABEL)
    if _version("sam2") is None or importlib.util.find_spec("sam2") is None:
        needed.append(SAM2_PINNED)
    return needed


def missing() -> list[str]:
    """Short names of everything ensure() would install; empty when the module is ready to run."""
    names = ["torch"] if torch_needed() else []
    return names + [re.split(r"[<>=\s]", spec, maxsplit=1)[0] for spec in pip_requirements_needed()]


MODEL_PACKAGES = ("torch", "sam2")


def self_test_skip_reason() -> str | None:
    """Why Slicer's self-test of the panel cannot run here (an extension build machine has no torch or sam2),
    naming what is missing; None when it can run. The self-test installs nothing (testing mode)."""
    absent = [name for name in missing() if name in MODEL_PACKAGES]
    if not absent:
        return None
    return ("MedSAM2HITL's self-test needs " + " and ".join(absent) + ", which are not installed in this Slicer; "
            "open the module once and run Segment slice to install them")


def _confirm(message: str) -> bool:
    """Ask the user; in Slicer's testing mode (ctest) this answers OK without a dialog."""
    import slicer

    return bool(slicer.util.confirmOkCancelDisplay(message, windowTitle="MedSAM2HITL"))


def _install_torch() -> None:
    installed = _version("torch")
    if installed is not None:  # upgrading in place breaks a torch that Slicer or another module has loaded
        raise DependencyError(
            f"PyTorch {installed} is older than MedSAM2HITL needs (torch >= {TORCH_MINIMUM}, torchvision >= "
            f"{TORCHVISION_MINIMUM}): open the PyTorch Utils module, uninstall it, restart Slicer, and install "
            "the latest version there")
    try:
        import PyTorchUtils
    except ModuleNotFoundError:
        raise DependencyError(
            "MedSAM2HITL needs the PyTorch extension: install 'PyTorch' from the Extensions Manager, restart "
            "Slicer and try again"
        ) from None
    logging.info("MedSAM2HITL: installing PyTorch through the PyTorch extension")
    torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
        askConfirmation=True,
        torchVersionRequirement=f">={TORCH_MINIMUM}",
        torchvisionVersionRequirement=f">={TORCHVISION_MINIMUM}",
    )
    if torch is None:
        raise DependencyError(
            "PyTorch was not installed; MedSAM2HITL cannot run without it. Install it from the PyTorch Utils "
            f"module (torch >= {TORCH_MINIMUM}) or answer OK when asked"
        )


def _packaging():
    """Slicer's `slicer.packaging` (5.11 and later), or None. `import slicer` does not import it (its
    __init__.py never names it), so an attribute lookup alone finds it only if something else imported it."""
    try:
        return importlib.import_module("slicer.packaging")
    except ImportError:
        return None


def _install_pip(requirements: list[str]) -> None:
    import slicer

    plain = [spec for spec in requirements if spec != SAM2_PINNED]
    packaging = _packaging()
    if plain and hasattr(packaging, "pip_ensure"):  # Slicer 5.11 and later
        packaging.pip_ensure(plain, prompt_install=False, requester="MedSAM2HITL")  # asked already
    elif plain:
        slicer.util.pip_install(plain)
    if SAM2_PINNED in requirements:
        with tempfile.TemporaryDirectory() as folder:
            pinned = Path(folder) / "sam2-requirements.txt"
            pinned.write_text(SAM2_PINNED + "\n", encoding="utf-8")
            # A source distribution: build it against the installed torch, without the CUDA extension
            # (sam2 skips it on CPU and needs no compiler then).
            previous = os.environ.get("SAM2_BUILD_CUDA")
            os.environ["SAM2_BUILD_CUDA"] = "0"
            try:
                slicer.util.pip_install(["--no-deps", "--no-build-isolation", "-r", str(pinned)])
            finally:
                if previous is None:
                    os.environ.pop("SAM2_BUILD_CUDA", None)
                else:
                    os.environ["SAM2_BUILD_CUDA"] = previous


def ensure() -> None:
    """Install whatever is missing, asking first; raises DependencyError if something stays missing.

    Never installs while Slicer runs its self-tests. sam2 goes through pip with its file hash, which
    `slicer.packaging.pip_ensure` cannot pass; the other packages go through pip_ensure where Slicer has it.
    """
    if missing() and _testing():
        raise DependencyError("testing mode: MedSAM2HITL installs nothing while Slicer runs tests; missing: "
                              + ", ".join(missing()))
    if torch_needed():
        _install_torch()
    requirements = pip_requirements_needed()
    if requirements:
        listing = "\n".join(f"  {spec.split(' --hash')[0]}" for spec in requirements)
        if not _confirm(
            "MedSAM2HITL needs these Python packages, which will now be downloaded and installed into Slicer's "
            f"Python (this can take a minute):\n{listing}"
        ):
            raise DependencyError("installation declined; MedSAM2HITL cannot run without: " + ", ".join(missing()))
        try:
            _install_pip(requirements)
        except Exception as exc:  # pip's own failure (network, build) as reported by Slicer
            raise DependencyError(f"installing Python packages failed ({exc}); see the Python console log") from exc
    still = missing()
    if still:
        raise DependencyError(
            "these packages are still missing after installation: " + ", ".join(still)
            + "; restart Slicer and try again, or install them with slicer.util.pip_install"
        )
