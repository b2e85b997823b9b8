"""datagen: datasets of generated videos, attention features and point tracks for research on
video diffusion transformers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from datagen.errors import UserError

__version__ = "0.1.0"
__all__ = ["UserError", "__version__", "open_dataset"]


def __getattr__(name: str) -> Any:
    # The reader is imported when first asked for, so that the writer side (build, shards,
    # the sample format) never imports it.
    if name == "open_dataset":
        from datagen.data import open_dataset

        return open_dataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from datagen.data import open_dataset  # noqa: F401
