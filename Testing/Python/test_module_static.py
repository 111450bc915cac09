"""Static checks of the Slicer module that need no Slicer: the module file, its .ui, CMake lists and imports.

The module itself only runs inside 3D Slicer (its self-test runs there, under ctest). These tests catch what
would otherwise only show up there: a widget name the code uses but the .ui lacks, a parameter the wrapper
cannot bind, a file the extension would not install, a heavy import at module load.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "MedSAM2HITL"
MODULE_FILE = MODULE_DIR / "MedSAM2HITL.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "MedSAM2HITL.ui"
CMAKE_FILE = MODULE_DIR / "CMakeLists.txt"
LIB_DIR = MODULE_DIR / "MedSAM2HITLLib"
HEAVY = ("torch", "torchvision", "sam2")


def _ui_widgets() -> dict[str, ET.Element]:
    return {w.get("name"): w for w in ET.parse(UI_FILE).getroot().iter("widget")}


def _parameter_fields() -> dict[str, ast.expr]:
    """Annotated fields of the class decorated with @parameterNodeWrapper, by name."""
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(
            isinstance(d, ast.Name) and d.id == "parameterNodeWrapper" for d in node.decorator_list
        ):
            return {
                stmt.target.id: stmt.annotation
                for stmt in node.body
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
            }
    raise AssertionError("no @parameterNodeWrapper class in MedSAM2HITL.py")


def _enum_names() -> set[str]:
    """Module classes derived, directly or through other module classes, from enum.Enum."""
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    enums: set[str] = set()
    for node in tree.body:  # bases are defined before their subclasses
        if isinstance(node, ast.ClassDef) and any(
            (isinstance(b, ast.Attribute) and b.attr == "Enum") or (isinstance(b, ast.Name) and b.id in enums)
            for b in node.bases
        ):
            enums.add(node.name)
    return enums


def _base_type(annotation: ast.expr) -> str:
    """'int' for Annotated[int, Minimum(0)], the class name otherwise."""
    if isinstance(annotation, ast.Subscript) and getattr(annotation.value, "id", "") == "Annotated":
        return _base_type(annotation.slice.elts[0])
    return ast.unparse(annotation)


def _cmake_list(variable: str) -> list[str]:
    text = CMAKE_FILE.read_text(encoding="utf-8")
    name = re.search(r"set\(MODULE_NAME\s+(\w+)\)", text).group(1)
    block = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert block, f"{variable} not found in {CMAKE_FILE}"
    entries = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    return [e.replace("${MODULE_NAME}", name) for e in entries if e]


def _module_python_files() -> set[str]:
    return {
        p.relative_to(MODULE_DIR).as_posix()
        for p in MODULE_DIR.rglob("*.py")
        if "Testing" not in p.relative_to(MODULE_DIR).parts and "__pycache__" not in p.parts
    }


def _module_resources() -> set[str]:
    """Non-Python files the module needs at run time: Resources/ and the Lib's data files (configs)."""
    files = set()
    for root in (MODULE_DIR / "Resources", LIB_DIR):
        for p in root.rglob("*"):
            if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts:
                files.add(p.relative_to(MODULE_DIR).as_posix())
    return files


def test_every_ui_name_used_by_the_module_exists_in_the_ui_file():
    used = set(re.findall(r"\.ui\.(\w+)", MODULE_FILE.read_text(encoding="utf-8")))
    assert used, "the module uses no self.ui widgets: the regex or the module is broken"
    missing = sorted(used - set(_ui_widgets()))
    assert not missing, f"widgets used in MedSAM2HITL.py but absent from {UI_FILE.name}: {missing}"


def test_every_slicer_parameter_name_is_a_field_with_a_widget_that_can_bind_it():
    fields = _parameter_fields()
    enums = _enum_names()
    bound = {}
    for name, widget in _ui_widgets().items():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.find("string").text] = (name, widget.get("class"))
    assert bound, "no widget carries SlicerParameterName"
    for parameter, (widget_name, widget_class) in bound.items():
        assert parameter in fields, f"{widget_name} binds '{parameter}', which the parameter node does not have"
        kind = _base_type(fields[parameter])
        # The connectors slicer.parameterNodeWrapper offers for these widget classes.
        if widget_class == "qMRMLNodeComboBox":
            assert kind.startswith("vtkMRML"), f"{widget_name}: node combobox bound to {kind}"
        elif widget_class == "QComboBox":
            assert kind in enums, f"{widget_name}: combobox bound to {kind}, which is not an Enum of the module"
        elif widget_class in ("QSpinBox", "QSlider"):
            assert kind == "int", f"{widget_name}: {widget_class} bound to {kind}"
        elif widget_class == "QCheckBox":
            assert kind == "bool", f"{widget_name}: checkbox bound to {kind}"
        else:
            pytest.fail(f"{widget_name}: no parameter-node connector known for {widget_class}")


def test_the_server_token_lives_in_slicer_settings_not_in_the_scene():
    """The parameter node is saved with the scene: a token there would travel with every shared .mrb."""
    assert not [name for name in _parameter_fields() if "token" in name.lower() or "server" in name.lower()]
    token_field = _ui_widgets()["serverTokenLineEdit"]
    properties = {prop.get("name"): prop for prop in token_field.findall("property")}
    assert "SlicerParameterName" not in properties
    assert properties["echoMode"].find("enum").text == "QLineEdit::Password"
    source = MODULE_FILE.read_text(encoding="utf-8")
    assert 'SETTINGS_KEYS["token"]' in source and "qt.QSettings()" in source
    assert not re.search(r"(logging\.\w+|_setStatus)\([^)]*[Tt]oken", source), "the token must not be logged"


def test_every_mrml_widget_receives_the_scene():
    root = ET.parse(UI_FILE).getroot()
    receivers = {
        c.findtext("receiver")
        for c in root.iter("connection")
        if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)" and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"
    }
    top = root.find("widget").get("name")
    mrml = {name for name, w in _ui_widgets().items() if w.get("class").startswith("qMRML") and name != top}
    assert mrml, "no MRML widgets found in the .ui"
    assert mrml <= receivers, f"MRML widgets without the mrmlSceneChanged connection: {sorted(mrml - receivers)}"


def test_cmake_lists_every_python_file_and_nothing_else():
    listed = _cmake_list("MODULE_PYTHON_SCRIPTS")
    assert len(listed) == len(set(listed)), "a script is listed twice"
    on_disk = _module_python_files()
    assert "MedSAM2HITL.py" in listed and "MedSAM2HITLLib/__init__.py" in listed
    assert not sorted(on_disk - set(listed)), f"not in MODULE_PYTHON_SCRIPTS (not installed): {sorted(on_disk - set(listed))}"
    assert not sorted(set(listed) - on_disk), f"listed but missing (CMake configure fails): {sorted(set(listed) - on_disk)}"


def test_cmake_lists_every_resource_and_nothing_else():
    listed = _cmake_list("MODULE_PYTHON_RESOURCES")
    on_disk = _module_resources()
    assert {"Resources/UI/MedSAM2HITL.ui", "Resources/Icons/MedSAM2HITL.png"} <= on_disk
    assert not sorted(on_disk - set(listed)), f"not in MODULE_PYTHON_RESOURCES: {sorted(on_disk - set(listed))}"
    assert not sorted(set(listed) - on_disk), f"listed but missing: {sorted(set(listed) - on_disk)}"


def _module_scope_imports(path: Path) -> list[tuple[int, str]]:
    """Imports that run when the file is imported: everywhere except inside function bodies."""
    found = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(child, ast.Import):
                found.extend((child.lineno, alias.name) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.append((child.lineno, child.module))
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


@pytest.mark.parametrize("path", [MODULE_FILE, *sorted(LIB_DIR.rglob("*.py"))], ids=lambda p: p.name)
def test_no_heavy_import_at_module_scope(path):
    heavy = [(line, name) for line, name in _module_scope_imports(path) if name.split(".")[0] in HEAVY]
    assert not heavy, f"{path.name} imports {heavy} at module scope: import them inside the functions that need them"


def test_the_module_file_never_loads_the_model_into_slicers_process():
    """Not even inside functions (its self-test included): torch and the model run in the worker process."""
    loaded = [(node.lineno, name) for node in ast.walk(ast.parse(MODULE_FILE.read_text(encoding="utf-8")))
              for name in ([a.name for a in node.names] if isinstance(node, ast.Import) else
                           [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
              if name.split(".")[0] in HEAVY or name in ("MedSAM2HITLLib.engine", "MedSAM2HITLLib.model")]
    assert not loaded, f"MedSAM2HITL.py imports {loaded}: ask a worker instead"


def test_the_ast_check_sees_module_scope_imports(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import os\ntry:\n    import torch\nexcept ImportError:\n    pass\n"
                      "def f():\n    import sam2\nclass C:\n    from sam2 import x\n")
    assert [name for _, name in _module_scope_imports(sample)] == ["os", "torch", "sam2"]


# Every Lib module, the Slicer transport included: it imports qt only when a transport is made.
LIB_MODULES = sorted(p.stem for p in LIB_DIR.glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("module", ["MedSAM2HITLLib", *(f"MedSAM2HITLLib.{m}" for m in LIB_MODULES)])
def test_lib_module_imports_without_qt_slicer_or_torch(module):
    forbidden = ("qt", "ctk", "slicer", "vtk", *HEAVY)
    code = (
        "import sys, importlib\n"
        f"sys.path.insert(0, {str(MODULE_DIR)!r})\n"
        f"importlib.import_module({module!r})\n"
        f"print(sorted(m for m in {forbidden!r} if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"import {module} failed:\n{result.stderr[-2000:]}"
    assert result.stdout.strip().splitlines()[-1] == "[]", f"import {module} loaded {result.stdout.strip()}"


def test_dependencies_pin_the_same_sam2_as_the_development_setup():
    sys.path.insert(0, str(MODULE_DIR))
    from MedSAM2HITLLib import dependencies

    pinned = (REPO / "requirements" / "sam2.txt").read_text(encoding="utf-8")
    assert dependencies.SAM2_PINNED in pinned


def test_ctest_passes_the_source_tree_under_the_name_the_self_test_reads():
    """Otherwise ctest would silently fall back to a random model and skip the accuracy checks."""
    wiring = (MODULE_DIR / "Testing" / "Python" / "CMakeLists.txt").read_text(encoding="utf-8")
    passed = set(re.findall(r'PROPERTY ENVIRONMENT\s+"(\w+)=', wiring))
    read = set(re.findall(r'os\.environ\.get\("(\w+)"\)', MODULE_FILE.read_text(encoding="utf-8")))
    assert passed and passed <= read, f"ctest sets {passed}, the module reads {read}"


def _method_calls(class_name: str, method: str) -> list[str]:
    """Names of the attributes called in a method of a module class, in source order."""
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)
    function = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == method)
    calls = [n for n in ast.walk(function) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)]
    return [c.func.attr for c in sorted(calls, key=lambda c: (c.lineno, c.col_offset))]


def test_cleanup_stops_the_request_then_releases_the_embedded_segment_editor():
    """Reload runs cleanup() on the old widget (slicer.util.reloadScriptedModule): without this the old editor
    keeps its z/y/1-0/Space/Esc shortcuts (doubled, so ambiguous) and its view observations."""
    calls = _method_calls("MedSAM2HITLWidget", "cleanup")
    released = ["uninstallKeyboardShortcuts", "removeViewObservations", "setActiveEffect",
                "setMRMLSegmentEditorNode", "setMRMLScene"]
    assert set(released) <= set(calls), f"cleanup() does not call {sorted(set(released) - set(calls))}"
    assert calls.index("close") < min(calls.index(name) for name in released), "the request must stop first"


def test_setup_installs_the_shortcuts_when_reloaded_while_the_module_is_shown():
    """qSlicerScriptedLoadableModuleWidget::reload() calls setup() but not enter()."""
    source = ast.unparse(next(n for n in ast.walk(ast.parse(MODULE_FILE.read_text(encoding="utf-8")))
                              if isinstance(n, ast.FunctionDef) and n.name == "setup"))
    assert re.search(r"if self\.parent\.isEntered:\s+self\.enter\(\)", source)


def test_shortcuts_and_buttons_go_through_the_controllers_one_rule():
    """Shift+S/P/F and the buttons call onAction, which asks the controller before anything starts."""
    shortcuts = _method_calls("MedSAM2HITLWidget", "_installShortcuts")
    assert "onAction" in shortcuts and "start" not in shortcuts
    assert _method_calls("MedSAM2HITLWidget", "onAction")[:1] == ["allowed"]


def test_the_panels_ct_options_are_the_librarys_presets_with_its_width_and_level():
    """The Intensity combo box has one CT option per preset of the library's table, each labelled by _ct_preset
    (run here as it runs in Slicer) with that table's width and level, and no W/L of its own."""
    from MedSAM2HITLLib.preprocessing import CT_PRESETS

    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    intensity = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Intensity")
    made = [stmt.value for stmt in intensity.body if isinstance(stmt, ast.Assign)]
    ct = [call.args[0].value for call in made if isinstance(call, ast.Call) and call.func.id == "_ct_preset"]
    assert ct == list(CT_PRESETS)
    assert not re.search(r"W-?\d", ast.unparse(intensity)), "an Intensity label spells out a width or level"
    function = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_ct_preset")
    namespace: dict = {}
    exec(compile(ast.Module([function], []), str(MODULE_FILE), "exec"), namespace)
    assert namespace["_ct_preset"]("lung", "CT lung") == ("lung", "CT lung (W1500 L-600)")
