"""Versions of the software that shapes the output, recorded in samples and the manifest."""

from __future__ import annotations

from functools import lru_cache
from importlib import metadata

_PACKAGES = (
    "datagen",
    "torch",
    "diffusers",
    "transformers",
    "numpy",
    "av",
    "opencv-python-headless",
    "webdataset",
)


@lru_cache(maxsize=1)
def software_versions() -> dict[str, str]:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out
