"""Settings: the only place kiln reads the environment (prefix ``KILN_``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Process-wide settings, read from ``KILN_*`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="KILN_", extra="ignore")

    home: Path = Field(
        default=Path.home() / ".kiln", description="Where kiln keeps its state (KILN_HOME)."
    )
    threads: int | None = Field(
        default=None, ge=1, description="Torch intra-op threads; default: torch's choice."
    )
    debug: bool = Field(default=False, description="Show tracebacks for unexpected errors.")


def get_settings() -> Settings:
    """Read the settings now (cheap; callers pass the result inward)."""
    return Settings()
