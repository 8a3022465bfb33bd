"""Settings come from KILN_* variables only, and are validated."""

from __future__ import annotations

import pydantic
import pytest
import torch

from kiln.settings import Settings, apply_threads, get_settings


def test_threads_from_environment_pins_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_THREADS", "1")
    settings = get_settings()
    assert settings.threads == 1
    before = torch.get_num_threads()
    try:
        apply_threads(settings)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_threads_default_leaves_torch_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KILN_THREADS", raising=False)
    before = torch.get_num_threads()
    apply_threads(get_settings())
    assert torch.get_num_threads() == before


def test_invalid_threads_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_THREADS", "0")
    with pytest.raises(pydantic.ValidationError):
        Settings()
