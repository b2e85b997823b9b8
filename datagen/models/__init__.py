"""Model families, one module each; ``get_family(name)`` picks the plugin."""

from __future__ import annotations

from datagen.errors import UserError
from datagen.models.base import ModelFamily


def get_family(name: str) -> ModelFamily:
    if name == "cogvideox":
        from datagen.models.cogvideox import CogVideoXFamily

        return CogVideoXFamily()
    if name == "wan":
        from datagen.models.wan import WanFamily

        return WanFamily()
    if name == "hunyuanvideo":
        from datagen.models.hunyuanvideo import HunyuanVideoFamily

        return HunyuanVideoFamily()
    raise UserError(f"unknown model.family '{name}'; choose one of: cogvideox, hunyuanvideo, wan")


__all__ = ["ModelFamily", "get_family"]
