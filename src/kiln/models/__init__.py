"""Architectures: pure nn.Modules built from a model spec via the registry."""

from kiln.models.registry import available, build, register

__all__ = ["available", "build", "register"]
