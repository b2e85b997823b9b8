"""Model families, one module each; ``get_family(name)`` picks the plugin."""

from __future__ import annotations

from datagen.errors import UserError
from datagen.models.base import ModelFamily


def get_family(name: str) -> ModelFamily:
    if name == "cogvideox":
        from datagen.models.cogvideox import CogVideoXFamily

        return CogVideoXFamily()
    raise UserError(f"unknown model.family '{name}'; choose one of: cogvideox")


__all__ = ["ModelFamily", "get_family"]
