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


def training_vocabulary(model_id: str) -> frozenset[str] | None:
    """The words a model's text conditioning was trained on, where the project knows them
    (the embedded tiny model: its caption grammar); None for other models."""
    from datagen.config import TRAINED_TINY_ID

    if model_id == TRAINED_TINY_ID:
        from datagen.models.tiny_dit import CAPTION_WORDS

        return CAPTION_WORDS
    return None


__all__ = ["ModelFamily", "get_family", "training_vocabulary"]
