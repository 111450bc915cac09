"""The Extensions Index catalog entry: valid against Slicer's schema and consistent with CMakeLists.txt."""

import json
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
SCHEMA = REPO / "Testing" / "Data" / "slicer-extension-catalog-entry-schema-v1.0.2.json"


def _cmake(variable: str) -> str:
    match = re.search(rf'set\({variable}\s+("[^"]*"|[^)]*)\)', (REPO / "CMakeLists.txt").read_text(encoding="utf-8"))
    assert match, f"{variable} is not set in CMakeLists.txt"
    return match.group(1).strip('"')


def _entry() -> dict:
    return json.loads((REPO / f"{_cmake_project()}.json").read_text(encoding="utf-8"))


def _cmake_project() -> str:
    return re.search(r"^project\((\w+)\)", (REPO / "CMakeLists.txt").read_text(encoding="utf-8"), re.M).group(1)


def test_catalog_entry_is_valid_against_the_schema_it_names():
    import jsonschema_rs

    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    entry = _entry()
    assert entry["$schema"] == schema["$id"]
    errors = [error.message for error in jsonschema_rs.validator_for(schema).iter_errors(entry)]
    assert not errors, errors


def test_the_schema_check_catches_a_bad_entry():
    import jsonschema_rs

    validator = jsonschema_rs.validator_for(json.loads(SCHEMA.read_text(encoding="utf-8")))
    assert not validator.is_valid({**_entry(), "tier": 9})
    assert not validator.is_valid({**_entry(), "scm_branch": "main"})


def test_catalog_entry_matches_cmake():
    entry = _entry()
    assert entry["category"] == _cmake("EXTENSION_CATEGORY")
    assert entry["build_dependencies"] == _cmake("EXTENSION_DEPENDS").split()
    assert entry["scm_url"] == _cmake("EXTENSION_HOMEPAGE")


def test_contributors_are_written_name_then_organisation():
    for contributor in _cmake("EXTENSION_CONTRIBUTORS").split(", "):
        assert re.fullmatch(r"[^()]+ \([^()]+\)", contributor), contributor
    module = (REPO / "MedSAM2HITL" / "MedSAM2HITL.py").read_text(encoding="utf-8")
    assert f'self.parent.contributors = ["{_cmake("EXTENSION_CONTRIBUTORS")}"]' in module


def test_the_icon_and_screenshot_cmake_names_exist_in_the_repository():
    for variable in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        for url in _cmake(variable).split():
            assert url.startswith(_cmake("EXTENSION_HOMEPAGE").replace("github.com", "raw.githubusercontent.com"))
            path = REPO / url.split("/main/", 1)[1]
            assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", url
