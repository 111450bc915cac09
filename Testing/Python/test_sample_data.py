"""The Sample Data entry: the shipped phantom exists, matches its checksum, downloads as SampleData does, loads."""

import hashlib
import urllib.request

import numpy as np
import pytest

from MedSAM2HITLLib.sample_data import NODE_NAME, SAMPLE_FILE, SAMPLE_SHA256, sample_source

pytestmark = pytest.mark.unit


def test_the_registered_uri_downloads_to_the_checksummed_file(tmp_path):
    source = sample_source()
    algorithm, digest = source["checksums"].split(":")
    assert algorithm == "SHA256" and digest == SAMPLE_SHA256
    fetched = tmp_path / source["fileNames"]
    urllib.request.urlretrieve(source["uris"], fetched)  # what SampleDataLogic.downloadFile does
    assert hashlib.sha256(fetched.read_bytes()).hexdigest() == SAMPLE_SHA256
    assert source["nodeNames"] == NODE_NAME and source["category"] == "MedSAM2HITL"


def test_the_sample_loads_as_a_small_ct_volume():
    import slicer.util

    from MedSAM2HITLLib.mrml_scene import create_scene, load_volume

    volume = load_volume(create_scene(), SAMPLE_FILE)
    array = slicer.util.arrayFromVolume(volume)
    assert array.shape == (48, 96, 96) and array.dtype == np.int16
    np.testing.assert_allclose(volume.GetSpacing(), (0.8, 0.8, 2.5))
    assert array.min() < -500 and array.max() > 0  # air around a body in HU
    assert SAMPLE_FILE.stat().st_size < 1_000_000
