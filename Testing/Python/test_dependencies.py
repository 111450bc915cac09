"""First-use installation decisions, on slicer-core's `slicer` with Slicer's app-level calls recorded.

No Slicer application runs here, so `slicer.app`, `slicer.packaging.pip_ensure`, `slicer.util.pip_install` and
the PyTorch extension are stood in for (they are the edge to Slicer's GUI and pip); the decisions under test are
the module's own: what to install, through which call, and what to refuse.
"""

import sys
import types

import pytest

from MedSAM2HITLLib import dependencies
from MedSAM2HITLLib.dependencies import DependencyError

pytestmark = pytest.mark.unit

READY = {"torch": "2.6.0", "torchvision": "0.21.0", "hydra-core": "1.3.2", "iopath": "0.1.10", "tqdm": "4.66.1",
         "pillow": "10.0.0", "nibabel": "5.2.0", "sam2": "1.1.0"}


class SlicerApp:
    """What the module calls in Slicer, recorded; installs make the package 'present' as pip would."""

    def __init__(self, monkeypatch, installed: dict, testing: bool = False, has_pip_ensure: bool = True):
        import slicer

        self.installed, self.calls = installed, []
        monkeypatch.setattr(dependencies, "_version", lambda name: self.installed.get(name))
        monkeypatch.setattr(dependencies.importlib.util, "find_spec", lambda name: object())
        monkeypatch.setattr(dependencies, "_confirm", lambda message: self.calls.append(("confirm",)) or True)
        monkeypatch.setattr(slicer, "app", types.SimpleNamespace(testingEnabled=lambda: testing), raising=False)
        # Slicer's slicer/__init__.py does not import .packaging: it is reached by importing it, never as an
        # attribute of a plain `import slicer`. Slicer before 5.11 has no such module.
        packaging = types.ModuleType("slicer.packaging")
        packaging.pip_ensure = self.pip_ensure
        monkeypatch.delattr(slicer, "packaging", raising=False)
        monkeypatch.setitem(sys.modules, "slicer.packaging", packaging if has_pip_ensure else None)
        monkeypatch.setattr(slicer.util, "pip_install", self.pip_install, raising=False)
        torch_utils = types.ModuleType("PyTorchUtils")
        torch_utils.PyTorchUtilsLogic = lambda: types.SimpleNamespace(installTorch=self.install_torch)
        monkeypatch.setitem(sys.modules, "PyTorchUtils", torch_utils)

    def _present(self, specs) -> None:
        for spec in specs:
            name = spec.split(">=")[0].split("==")[0].split()[0]
            self.installed[name] = READY.get(name, "1.0")

    def pip_ensure(self, requirements, **options):
        self.calls.append(("pip_ensure", tuple(requirements), options.get("prompt_install")))
        self._present(requirements)

    def pip_install(self, arguments):
        self.calls.append(("pip_install", tuple(arguments)))
        if "-r" in arguments:
            self._present(["sam2"])
        else:
            self._present(arguments)

    def install_torch(self, **options):
        self.calls.append(("installTorch",))
        self._present(["torch", "torchvision"])
        return object()


def test_nothing_is_installed_while_slicer_runs_its_tests(monkeypatch):
    app = SlicerApp(monkeypatch, {k: v for k, v in READY.items() if k not in ("sam2", "tqdm")}, testing=True)
    with pytest.raises(DependencyError, match="testing mode.*tqdm.*sam2"):
        dependencies.ensure()
    assert app.calls == []


def test_an_older_torch_is_not_upgraded_in_place(monkeypatch):
    app = SlicerApp(monkeypatch, {**READY, "torch": "2.1.0"})
    with pytest.raises(DependencyError, match="PyTorch 2.1.0 is older.*PyTorch Utils module"):
        dependencies.ensure()
    assert ("installTorch",) not in app.calls


def test_missing_packages_go_through_pip_ensure_and_sam2_through_its_hash(monkeypatch):
    missing = {k: v for k, v in READY.items() if k not in ("torch", "torchvision", "hydra-core", "sam2")}
    app = SlicerApp(monkeypatch, missing)
    dependencies.ensure()
    kinds = [call[0] for call in app.calls]
    assert kinds == ["installTorch", "confirm", "pip_ensure", "pip_install"]
    assert app.calls[2] == ("pip_ensure", ("hydra-core>=1.3.2",), False)  # asked once, by our own dialog
    assert "--no-deps" in app.calls[3][1] and "-r" in app.calls[3][1]
    assert dependencies.missing() == []


def test_slicer_before_5_11_installs_with_pip_install(monkeypatch):
    app = SlicerApp(monkeypatch, {k: v for k, v in READY.items() if k != "nibabel"}, has_pip_ensure=False)
    dependencies.ensure()
    assert app.calls == [("confirm",), ("pip_install", ("nibabel>=5.0",))]


def test_nothing_missing_asks_nothing(monkeypatch):
    app = SlicerApp(monkeypatch, dict(READY))
    dependencies.ensure()
    assert app.calls == []


def test_the_self_test_skips_naming_the_missing_model_packages(monkeypatch):
    SlicerApp(monkeypatch, {k: v for k, v in READY.items() if k not in ("torch", "torchvision", "sam2")},
              testing=True)
    reason = dependencies.self_test_skip_reason()
    assert reason and "needs torch and sam2" in reason
    SlicerApp(monkeypatch, {k: v for k, v in READY.items() if k != "tqdm"}, testing=True)
    assert dependencies.self_test_skip_reason() is None  # torch and sam2 are there: the test runs (and fails
    # on what is missing, as ensure() refuses to install in testing mode)
