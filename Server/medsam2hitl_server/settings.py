"""Settings from environment variables (the README's table lists each one)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from MedSAM2HITLLib.compute_backend import is_loopback

PREFIX = "MEDSAM2HITL_"
DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[2] / "Testing" / "Data" / "phantom_sam2.pt"


def _env(name: str, default: str) -> str:
    return os.environ.get(PREFIX + name, default)


def _int(name: str, default: int) -> int:
    value = _env(name, str(default))
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"{PREFIX}{name}={value!r} must be an integer") from None


def _list(name: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in _env(name, "").split(",") if item.strip())


@dataclass(frozen=True)
class Settings:
    redis_url: str = field(default_factory=lambda: _env("REDIS_URL", "redis://127.0.0.1:6379/0"))
    data_dir: Path = field(default_factory=lambda: Path(_env("DATA_DIR", "data")).resolve())
    host: str = field(default_factory=lambda: _env("HOST", "127.0.0.1"))
    port: int = field(default_factory=lambda: _int("PORT", 8000))
    tokens: tuple[str, ...] = field(default_factory=lambda: _list("TOKENS"))
    cors_origins: tuple[str, ...] = field(default_factory=lambda: _list("CORS_ORIGINS"))
    max_upload_bytes: int = field(default_factory=lambda: _int("MAX_UPLOAD_BYTES", 2 << 30))
    max_volume_bytes: int = field(default_factory=lambda: _int("SERVICE_MAX_VOLUME_BYTES", 2 << 30))
    upload_idle_timeout_seconds: int = field(default_factory=lambda: _int("UPLOAD_IDLE_TIMEOUT_SECONDS", 60))
    job_ttl_seconds: int = field(default_factory=lambda: _int("JOB_TTL_SECONDS", 24 * 3600))
    segment_timeout_seconds: int = field(default_factory=lambda: _int("SEGMENT_TIMEOUT_SECONDS", 120))
    worker_heartbeat_seconds: int = field(default_factory=lambda: _int("WORKER_HEARTBEAT_SECONDS", 2))
    worker_dead_after_seconds: int = field(default_factory=lambda: _int("WORKER_DEAD_AFTER_SECONDS", 8))
    checkpoint: str = field(default_factory=lambda: _env("CHECKPOINT", str(DEFAULT_CHECKPOINT)))
    device: str = field(default_factory=lambda: _env("DEVICE", "auto"))
    threads: int = field(default_factory=lambda: _int("THREADS", 0))
    precision: str = field(default_factory=lambda: _env("PRECISION", "auto"))
    worker_name: str = field(default_factory=lambda: _env("WORKER_NAME", ""))
    replaces_pid: int = field(default_factory=lambda: _int("REPLACES_PID", 0))  # set by scripts/supervise.sh
    api_url: str = field(default_factory=lambda: _env("API_URL", ""))
    worker_token: str = field(default_factory=lambda: _env("WORKER_TOKEN", ""))
    dicomweb_url: str = field(default_factory=lambda: _env("DICOMWEB_URL", ""))
    dicomweb_user: str = field(default_factory=lambda: _env("DICOMWEB_USER", ""))
    dicomweb_password: str = field(default_factory=lambda: _env("DICOMWEB_PASSWORD", ""), repr=False)
    dicomweb_token: str = field(default_factory=lambda: _env("DICOMWEB_TOKEN", ""), repr=False)
    dicomweb_store: bool = field(default_factory=lambda: _env("DICOMWEB_STORE", "0") == "1")

    def check_bind(self) -> None:
        """Refuse to listen beyond loopback without a token: a hospital network is not a trusted one."""
        if not self.tokens and not is_loopback(self.host):
            raise SystemExit(
                f"refusing to listen on {self.host} without a token: set {PREFIX}TOKENS (comma-separated) "
                f"or bind to 127.0.0.1"
            )
        if "*" in self.cors_origins:
            raise SystemExit(f"{PREFIX}CORS_ORIGINS must list origins; '*' is not allowed with tokens")


def load() -> Settings:
    return Settings()
