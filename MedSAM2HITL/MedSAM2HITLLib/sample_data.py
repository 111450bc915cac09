"""The module's entry in Slicer's Sample Data: a small synthetic CT phantom shipped with the extension.

Qt-free, so the file, its checksum and what it loads to are tested without Slicer; the module registers
`sample_source()` with `SampleData.SampleDataLogic.registerCustomSampleDataSource` at startup.
"""

from __future__ import annotations

from pathlib import Path

RESOURCES = Path(__file__).resolve().parents[1] / "Resources"
SAMPLE_FILE = RESOURCES / "SampleData" / "MedSAM2HITLPhantomCT.nrrd"
SAMPLE_SHA256 = "71ef7686e14728094a3dda582c9cad8b8c2f6b5c6d2165f487908c607001347e"
NODE_NAME = "MedSAM2HITLPhantomCT"


def sample_source() -> dict:
    """Keyword arguments of registerCustomSampleDataSource (a file:// URI: SampleData fetches it with urllib)."""
    return {
        "category": "MedSAM2HITL",
        "sampleName": NODE_NAME,
        "uris": SAMPLE_FILE.as_uri(),
        "fileNames": SAMPLE_FILE.name,
        "nodeNames": NODE_NAME,
        "checksums": f"SHA256:{SAMPLE_SHA256}",
        "thumbnailFileName": str(RESOURCES / "Icons" / "MedSAM2HITL.png"),
        "loadFileTypes": "VolumeFile",
    }
