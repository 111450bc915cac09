"""The service address the panel and the CLI accept, and when they warn that the token crosses in clear."""

import pytest

from MedSAM2HITLLib.compute_backend import check_server_url, clear_text_warning
from MedSAM2HITLLib.errors import BadInputError

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("given, expected", [
    ("http://gpu-box:8000", "http://gpu-box:8000"),
    ("  https://gpu-box.hospital.org/medsam2/  ", "https://gpu-box.hospital.org/medsam2"),
    ("http://[::1]:8000", "http://[::1]:8000"),
])
def test_a_service_address_is_normalised(given, expected):
    assert check_server_url(given) == expected


@pytest.mark.parametrize("given, reason", [
    ("", "no server URL"),
    ("gpu-box:8000", "not an http:// or https:// address"),
    ("ftp://gpu-box", "not an http:// or https:// address"),
    ("http://", "names no host"),
    ("http://user:secret@gpu-box:8000", "token field, not in the URL"),
    ("http://gpu-box:8000/?token=abc", "query or fragment"),
    ("http://gpu-box:99999", "invalid port"),
])
def test_a_bad_service_address_is_refused_with_the_reason(given, reason):
    with pytest.raises(BadInputError, match=reason):
        check_server_url(given)


@pytest.mark.parametrize("url, warns", [
    ("http://gpu-box:8000", True),
    ("http://10.1.2.3:8000", True),
    ("https://gpu-box:8000", False),
    ("http://127.0.0.1:8000", False),
    ("http://localhost:8000", False),
    ("http://[::1]:8000", False),
])
def test_plain_http_to_another_host_is_warned_about(url, warns):
    warning = clear_text_warning(url)
    assert bool(warning) == warns
    if warns:
        assert "unencrypted" in warning and "https" in warning
