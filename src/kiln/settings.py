"""Settings: the only place kiln reads the environment (prefix ``KILN_``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Process-wide settings, read from ``KILN_*`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="KILN_", extra="ignore")

    threads: int | None = Field(
        default=None,
        ge=1,
        description="CPU threads torch may use (KILN_THREADS); default: torch's choice. "
        "Small models often train faster on 1 thread than on several.",
    )


def get_settings() -> Settings:
    """Read the settings now (cheap; callers pass the values inward)."""
    return Settings()


def apply_threads(settings: Settings) -> None:
    """Pin torch's intra-op thread count if the settings ask for it."""
    if settings.threads is not None:
        import torch

        torch.set_num_threads(settings.threads)
