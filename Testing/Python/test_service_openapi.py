"""The live service's OpenAPI as clients use it: /docs can upload a file (raw or form), every JSON reply and event
has a typed schema, and a client generated from /openapi.json (datamodel-code-generator) reads live replies into
typed models that mypy checks."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
import typing
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from service_fixtures import Service, wait_for
from test_service import SIZE, Upload, iter_events

pytestmark = pytest.mark.service

TOKEN = "openapi-test-token"
EVENT_MODELS = ("StateEvent", "SliceEvent", "DoneEvent", "CancelledEvent", "ErrorEvent")


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    running = Service(tmp_path_factory.mktemp("service_openapi"), tokens=TOKEN).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def openapi(service) -> dict:
    return httpx.get(f"{service.url}/openapi.json").json()


@pytest.fixture(scope="module")
def api_models(openapi, tmp_path_factory):
    """The client models datamodel-code-generator writes from the live /openapi.json, imported as a module."""
    folder = tmp_path_factory.mktemp("generated_client")
    (folder / "openapi.json").write_text(httpx.Response(200, json=openapi).text, encoding="utf-8")
    run = subprocess.run([sys.executable, "-m", "datamodel_code_generator", "--input", str(folder / "openapi.json"),
                          "--input-file-type", "openapi", "--output", str(folder / "api_models.py"),
                          "--output-model-type", "pydantic_v2.BaseModel", "--target-python-version", "3.10",
                          "--use-union-operator"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    spec = importlib.util.spec_from_file_location("api_models", folder / "api_models.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic looks its generic models up there
    spec.loader.exec_module(module)
    return module


def test_the_upload_body_is_a_file_raw_or_in_a_form(openapi):
    """What /docs' *Try it out* needs to offer a file picker for POST /jobs."""
    content = openapi["paths"]["/api/v1/jobs"]["post"]["requestBody"]["content"]
    assert content["application/octet-stream"]["schema"]["format"] == "binary"
    form = content["multipart/form-data"]["schema"]
    assert form["required"] == ["file"] and form["properties"]["file"]["format"] == "binary"


def test_every_json_reply_and_event_has_a_typed_schema(openapi):
    schemas = openapi["components"]["schemas"]
    for path, operations in openapi["paths"].items():
        for method, operation in operations.items():
            for code, response in operation["responses"].items():
                for media, body in response.get("content", {}).items():
                    if media == "application/json":
                        reference = body["schema"]["$ref"].rsplit("/", 1)[1]
                        assert schemas[reference].get("properties"), (method, path, code)
                        assert code < "400" or reference == "ErrorDetail" or path == "/readyz", (method, path, code)
    result = openapi["paths"]["/api/v1/jobs/{job_id}/result"]["get"]["responses"]["200"]["content"]
    assert {"application/gzip", "application/octet-stream"} <= set(result)
    stream = openapi["paths"]["/api/v1/jobs/{job_id}/events"]["get"]["responses"]["200"]["content"]
    payloads = stream["text/event-stream"]["itemSchema"]["properties"]["data"]["contentSchema"]["oneOf"]
    assert [p["$ref"].rsplit("/", 1)[1] for p in payloads] == list(EVENT_MODELS)
    assert all(schemas[name]["properties"] for name in EVENT_MODELS)
    assert schemas["SliceEvent"]["properties"]["mask"]["$ref"].endswith("/RunLengths")


def test_a_generated_client_reads_live_replies_into_typed_models(service, api_models):
    """A form upload, its status, a 2D mask and the job's first events, each read with the generated models."""
    case = Upload(5)
    with service.client() as client:
        created = client.post("/api/v1/jobs", files={"file": ("scan.nii", case.data)})
        assert created.status_code == 201, created.text
        job = api_models.JobCreated.model_validate(created.json())
        assert job.shape_ijk == [SIZE[2], SIZE[1], SIZE[0]]
        wait_for(lambda: client.get(f"/api/v1/jobs/{job.id}/status").json()["loaded"], 60, "the volume loading")
        live_status = client.get(f"/api/v1/jobs/{job.id}/status").json()
        status = api_models.JobStatus.model_validate(live_status)
        found = client.post(f"/api/v1/jobs/{job.id}/segment-2d", json={"box_ras": case.box_ras, "window": "abdomen"})
        sliced = api_models.SegmentedSlice.model_validate(found.json())
        events = [api_models.StateEvent.model_validate(data)
                  for _, data in iter_events(client, job.id, "0-0", until=("state",))]
        missing = client.get("/api/v1/jobs/00000000-0000-4000-8000-000000000000/status")
        error = api_models.ErrorDetail.model_validate(missing.json())

    hints = typing.get_type_hints(api_models.JobStatus)
    assert hints["progress"] is api_models.Progress and hints["loaded"] is bool
    assert isinstance(status.volume, api_models.VolumeGeometry)  # loaded: the geometry, not the upload's header
    assert status.volume.views.axial.slices == SIZE[0] and len(status.volume.ijk_to_ras) == 4
    assert status.state.value == "ready" and status.progress.total == 0
    assert typing.get_type_hints(api_models.SegmentedSlice)["mask"] is api_models.RunLengths
    rows, cols = sliced.mask.shape
    assert sum(sliced.mask.counts) == rows * cols and sliced.slice == case.phantom.key_index
    assert [event.state.value for event in events] == ["queued"]
    assert missing.status_code == 404 and error.detail == "no such job"
    with pytest.raises(ValidationError):  # the types are checked, not only the names
        api_models.JobStatus.model_validate({**live_status, "progress": {"done": "many", "total": 0}})


def test_mypy_accepts_typed_use_of_the_generated_models_and_rejects_a_wrong_one(api_models, tmp_path):
    uses = textwrap.dedent("""\
        from api_models import JobStatus, SegmentedSlice, VolumeGeometry


        def voxels(reply: SegmentedSlice) -> int:
            return sum(reply.mask.counts[1::2])


        def axial_slices(status: JobStatus) -> int:
            volume = status.volume
            return volume.views.axial.slices if isinstance(volume, VolumeGeometry) else volume.shape_ijk[2]


        def fraction_done(status: JobStatus) -> float:
            return status.progress.done / max(status.progress.total, 1)


        def wrong(status: JobStatus) -> str:
            return status.progress.done
        """)
    (tmp_path / "uses.py").write_text(uses)
    run = subprocess.run([sys.executable, "-m", "mypy", "--follow-imports=silent", "--cache-dir",
                          str(tmp_path / "cache"), str(tmp_path / "uses.py")], capture_output=True, text=True,
                         timeout=240, env={**os.environ, "MYPYPATH": str(Path(api_models.__file__).parent)})
    line = uses.splitlines().index("    return status.progress.done") + 1
    assert run.returncode == 1 and "Found 1 error" in run.stdout, run.stdout
    assert f'uses.py:{line}: error: Incompatible return value type (got "int", expected "str")' in run.stdout


def test_the_models_reply_carries_the_librarys_window_presets(service, api_models):
    """The web viewer's CT presets come from here, the library's one table, typed for generated clients."""
    from MedSAM2HITLLib.preprocessing import CT_PRESETS

    with service.client() as client:
        models = api_models.Models.model_validate(client.get("/api/v1/models").json())
    assert {name: tuple(preset) for name, preset in models.window_presets.items()} == CT_PRESETS
    assert "window_presets" in api_models.Models.model_fields and \
        api_models.Models.model_fields["window_presets"].is_required()
