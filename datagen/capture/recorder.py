"""The recorder: which (layer, step) pairs to capture, and what to keep from each.

A model family's capture processor hands the recorder the queries and keys of the
conditional branch exactly as the attention uses them (after q/k normalisation and RoPE),
split into video and text tokens. The recorder copies what it keeps (never a view into the
whole CFG batch): fp16 q/k of the feature (layer, step) pairs, and the small online
correspondence arrays of the correspondence pairs, computed at once so q/k need not be kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from datagen.capture.batched import batched_correspondence


@dataclass(frozen=True)
class CaptureSpec:
    feature_layers: tuple[int, ...]
    feature_steps: tuple[int, ...]
    corr_layers: tuple[int, ...]
    corr_steps: tuple[int, ...]
    step_unit: str = "index"
    """'index' (0-based denoising step) or 'timestep' (scheduler timestep; nearest step)."""
    hidden_layers: tuple[int, ...] = ()
    """Blocks whose output hidden states (video tokens) are kept, at ``feature_steps``."""

    @property
    def layers(self) -> tuple[int, ...]:
        """The layers whose attention gets a capture processor (q/k)."""
        return tuple(sorted(set(self.feature_layers) | set(self.corr_layers)))

    @property
    def all_layers(self) -> tuple[int, ...]:
        """Every layer captured from: attention processors and block-output hooks."""
        return tuple(sorted(set(self.layers) | set(self.hidden_layers)))

    @property
    def has_features(self) -> bool:
        """Whether anything goes to the features shards (q/k or hidden states)."""
        return bool(self.feature_steps and (self.feature_layers or self.hidden_layers))

    @property
    def enabled(self) -> bool:
        return self.has_features or bool(self.corr_layers and self.corr_steps)


def feature_name(kind: str, layer: int, step: int) -> str:
    """Tensor name in the features safetensors: e.g. ``q.layer017.step049``; kinds ``q``,
    ``k`` (attention) and ``h`` (block output hidden states)."""
    return f"{kind}.layer{layer:03d}.step{step:03d}"


@dataclass
class Recorder:
    """Collects captures for one generation call of ``batch`` videos."""

    spec: CaptureSpec
    batch: int
    query_tokens: torch.Tensor | None = None
    """(N,) long: frame-0 token of each query point, for the online correspondence."""
    token_grid: tuple[int, int, int] = (1, 1, 1)
    """(token frames, rows, columns) of one video."""
    step: int = -1
    timestep: int = -1
    cond: slice | None = None
    """Rows of the current forward's batch that are the conditional branch (None: skip)."""
    step_timesteps: dict[int, int] = field(default_factory=dict)
    _wanted_feature_steps: set[int] | None = None
    _wanted_corr_steps: set[int] | None = None
    features: list[dict[str, torch.Tensor]] = field(default_factory=list)
    correspondence: list[dict[tuple[int, int], dict[str, np.ndarray]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.features = [{} for _ in range(self.batch)]
        self.correspondence = [{} for _ in range(self.batch)]

    def resolve_steps(self, schedule: list[int]) -> None:
        """Turn the spec's steps into step indices once the scheduler's timesteps are known."""
        if self.spec.step_unit == "timestep":
            sched = np.asarray(schedule)

            def nearest(ts: tuple[int, ...]) -> set[int]:
                return {int(np.argmin(np.abs(sched - t))) for t in ts}

            self._wanted_feature_steps = nearest(self.spec.feature_steps)
            self._wanted_corr_steps = nearest(self.spec.corr_steps)
        else:
            n = len(schedule)
            self._wanted_feature_steps = {s for s in self.spec.feature_steps if s < n}
            self._wanted_corr_steps = {s for s in self.spec.corr_steps if s < n}

    def begin_forward(self, step: int, timestep: int, cond: slice | None) -> None:
        self.step, self.timestep, self.cond = step, int(timestep), cond
        self.step_timesteps[step] = int(timestep)

    def wants(self, layer: int) -> bool:
        if self.cond is None:
            return False
        return self._wants_features(layer) or self._wants_corr(layer)

    def _wants_features(self, layer: int) -> bool:
        steps = self._wanted_feature_steps or set()
        return layer in self.spec.feature_layers and self.step in steps

    def wants_hidden(self, layer: int) -> bool:
        """Whether this forward keeps ``layer``'s block output (conditional branch only)."""
        steps = self._wanted_feature_steps or set()
        return self.cond is not None and layer in self.spec.hidden_layers and self.step in steps

    def record_hidden(self, layer: int, video: torch.Tensor) -> None:
        """Receive one block's output video tokens, (batch of the whole forward, F*h*w, dim)
        frame-major; keeps the conditional rows as fp16 (token frames, h*w, dim) copies."""
        f, h, w = self.token_grid
        rows = video[self.cond]
        if rows.shape[1] != f * h * w:
            raise RuntimeError(
                f"layer {layer}: the block output has {rows.shape[1]} video tokens, but the "
                f"token grid {self.token_grid} has {f * h * w}"
            )
        for b in range(rows.shape[0]):
            self.features[b][feature_name("h", layer, self.step)] = (
                rows[b].detach().reshape(f, h * w, -1).to("cpu", torch.float16, copy=True)
            ).contiguous()

    def _wants_corr(self, layer: int) -> bool:
        steps = self._wanted_corr_steps or set()
        return layer in self.spec.corr_layers and self.step in steps

    def record(
        self,
        layer: int,
        q_video: torch.Tensor,
        k_video: torch.Tensor,
        k_text: torch.Tensor | None,
        **extra: torch.Tensor | None,
    ) -> None:
        """Receive one layer's conditional-branch q/k, exactly as the attention uses them.

        q_video, k_video: (B, heads, F, h*w, d), the rows of ``self.cond`` only; k_text:
        (B, heads, L, d) for the text keys that share the softmax (None when text enters by
        cross-attention). ``extra`` carries what processors also hand over (q_text, v_video,
        v_text for checks; text_mask (B, L) bool, True = a key the model attends to, which the
        correspondence applies). Nothing passed here is kept
        as a view.
        """
        for b in range(q_video.shape[0]):
            if self._wants_features(layer):
                for kind, t in (("q", q_video[b]), ("k", k_video[b])):
                    self.features[b][feature_name(kind, layer, self.step)] = (
                        t.detach().to("cpu", torch.float16, copy=True).contiguous()
                    )
        if self._wants_corr(layer) and self.query_tokens is not None:
            results = batched_correspondence(
                q_video,
                k_video,
                self.query_tokens,
                k_text=k_text,
                text_mask=extra.get("text_mask"),
                grid_hw=self.token_grid[1:],
            )
            for b, arrays in enumerate(results):
                self.correspondence[b][(layer, self.step)] = arrays

    def stacked_correspondence(self, b: int) -> tuple[dict[str, np.ndarray], list, list]:
        """Video ``b``'s correspondence arrays stacked to (layers, steps, ...), with the lists."""
        got = self.correspondence[b]
        layers = sorted({k[0] for k in got})
        steps = sorted({k[1] for k in got})
        if not got:
            return {}, layers, steps
        names = next(iter(got.values())).keys()
        out: dict[str, Any] = {}
        for name in names:
            out[name] = np.stack(
                [np.stack([got[(layer, s)][name] for s in steps]) for layer in layers]
            )
        return out, layers, steps
