"""Model families, one module each; ``get_family(name)`` picks the plugin.

Importing this package imports no torch: the family modules load when a family is asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from datagen.errors import UserError

if TYPE_CHECKING:
    from datagen.models.base import ModelFamily

FAMILIES = ("cogvideox", "hunyuanvideo", "wan")


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
    raise UserError(f"unknown model.family '{name}'; choose one of: {', '.join(FAMILIES)}")


def training_vocabulary(model_id: str) -> frozenset[str] | None:
    """The words a model's text conditioning was trained on, where the project knows them
    (the embedded tiny model: its caption grammar); None for other models."""
    from datagen.config import TRAINED_TINY_ID

    if model_id == TRAINED_TINY_ID:
        from datagen.models.tiny_dit import CAPTION_WORDS

        return CAPTION_WORDS
    return None


__all__ = ["FAMILIES", "get_family", "training_vocabulary"]
