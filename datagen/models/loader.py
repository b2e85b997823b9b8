"""The config's model pipeline, loaded on first use: shared by generation and the feature
pass of existing videos."""

from __future__ import annotations

from typing import Any

from datagen.config import BuildConfig
from datagen.layout import TokenLayout
from datagen.models import get_family


class LazyPipeline:
    """The config's model-family pipeline and token layout, loaded on first use (once per
    worker); shared by generation and the feature pass for existing videos."""

    def __init__(self, cfg: BuildConfig):
        self.cfg = cfg
        self.family = get_family(cfg.model.family)
        self._pipe = None
        self.layout: TokenLayout | None = None

    @property
    def pipe(self) -> Any:
        if self._pipe is None:
            self._pipe = self.family.load_pipeline(self.cfg.model)
            self.layout = self.family.layout(self._pipe, self.cfg.generation)
        return self._pipe
