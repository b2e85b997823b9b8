"""datagen: datasets of generated videos, attention features and point tracks for research on
video diffusion transformers."""

from datagen.data import open_dataset
from datagen.errors import UserError

__version__ = "0.1.0"
__all__ = ["UserError", "__version__", "open_dataset"]
