"""Where the model runs: this computer's worker process or the shared inference service.

The panel and the CLI ask this module for the service's address checks, its client and what *Test connection*
shows, so both say the same things. Qt-free; the panel keeps the URL and token in Slicer's settings
(`SETTINGS_KEYS`), never in the scene.
"""

from __future__ import annotations

import ipaddress
import urllib.parse

from .errors import BadInputError, MedSAM2Error

LOCAL, SERVER = "local", "server"
SETTINGS_KEYS = {"compute": "MedSAM2HITL/Compute", "url": "MedSAM2HITL/ServerUrl", "token": "MedSAM2HITL/ServerToken"}


def check_server_url(url: str) -> str:
    """The service's base URL, normalised; BadInputError says what is wrong with a bad one."""
    text = (url or "").strip().rstrip("/")
    if not text:
        raise BadInputError("no server URL: enter the service's address, e.g. http://gpu-box:8000")
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https"):
        raise BadInputError(f"'{text}' is not an http:// or https:// address: enter e.g. http://gpu-box:8000")
    if not parts.hostname:
        raise BadInputError(f"'{text}' names no host: enter e.g. http://gpu-box:8000")
    if parts.username or parts.password:
        raise BadInputError("put the token in the token field, not in the URL")
    if parts.query or parts.fragment:
        raise BadInputError(f"'{text}' has a query or fragment: give only the service's base address")
    try:
        parts.port
    except ValueError:
        raise BadInputError(f"'{text}' has an invalid port") from None
    return text


def clear_text_warning(url: str) -> str | None:
    """A warning when the token would cross the network unencrypted (http to a host that is not this computer)."""
    parts = urllib.parse.urlsplit(check_server_url(url))
    if parts.scheme == "https" or is_loopback(parts.hostname):
        return None
    return (f"{parts.hostname} is reached over plain http: the token and the images cross the network "
            "unencrypted; use https unless the network is trusted")


def is_loopback(host: str) -> bool:
    """Whether `host` names this computer (the service binds there by default; the panel warns otherwise)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def service_client(url: str, token: str | None):
    """A WorkerClient whose requests go to the service at `url` (same requests, slices and cancel as locally)."""
    from .service_transport import service_transport_factory
    from .worker_client import WorkerClient

    return WorkerClient(service_transport_factory(check_server_url(url), token or None))


def describe_service(url: str, token: str | None) -> list[str]:
    """What the service says of itself: version, models, workers and their queues (one line each).

    Raises MedSAM2Error with a one-line reason: unreachable, wrong token, or another refusal.
    """
    from .service_transport import ServiceApi, Unreachable

    base = check_server_url(url)
    try:
        server = ServiceApi(base, token or None).call("GET", "/api/v1/models")
    except Unreachable as error:
        raise MedSAM2Error(str(error)) from None
    lines = [f"service {base}: version {server['version']}"]
    lines += [f"model {m['name']} on {m['device']} (image size {m['image_size']}), {m['workers']} worker(s)"
              for m in server["models"]]
    lines += [f"worker {w['name']}: {'busy' if w['busy'] else 'idle'}, {w['jobs']} job(s), "
              f"{w['queued_tasks']} task(s) queued" for w in server["workers"]]
    if not server["workers"]:
        lines.append("no model worker is running: requests will wait until one starts")
    return lines
