"""A real PACS for tests: Debian's Orthanc with its DICOMweb plugin, on a free loopback port, with temp storage.

Started as `Orthanc <config.json>` (not the system service) and stopped at the end. A missing Orthanc or plugin is
an error, never a skip: .ci/run installs `orthanc` and `orthanc-dicomweb`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import httpx

from service_fixtures import free_port, wait_for

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")  # where Debian's orthanc-dicomweb puts it
USER, PASSWORD = "pacs-user", "pacs-secret-7f3a"


class Orthanc:
    """One Orthanc process; `dicomweb_url` is its DICOMweb root. HTTP basic login with USER/PASSWORD."""

    def __init__(self, folder: Path):
        executable = shutil.which("Orthanc")
        if executable is None or not DICOMWEB_PLUGIN.is_file():
            raise RuntimeError("Orthanc and its DICOMweb plugin are not installed: apt-get install orthanc "
                               "orthanc-dicomweb (Debian/Ubuntu); .ci/run installs them")
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dicomweb_url = f"{self.url}/dicom-web"
        storage = folder / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "MedSAM2HITL-test", "StorageDirectory": str(storage), "IndexDirectory": str(storage),
            "HttpPort": self.port, "DicomPort": free_port(), "DicomServerEnabled": False,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD},
            "Plugins": [str(DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "ExecuteLuaEnabled": False, "RestApiWriteToFileSystemEnabled": False,
        }
        (folder / "orthanc.json").write_text(json.dumps(config))
        self.log = open(folder / "orthanc.log", "wb")
        self.process = subprocess.Popen([executable, str(folder / "orthanc.json")], stdout=self.log,
                                        stderr=subprocess.STDOUT)
        wait_for(lambda: self.get("/system").status_code == 200, 60, "Orthanc answering")

    def get(self, path: str) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", auth=(USER, PASSWORD), timeout=10)

    def upload(self, files) -> None:
        """Store DICOM files through Orthanc's REST API (the test's set-up, not the code under test)."""
        for path in files:
            response = httpx.post(f"{self.url}/instances", content=Path(path).read_bytes(), auth=(USER, PASSWORD),
                                  timeout=30)
            response.raise_for_status()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        self.log.close()
