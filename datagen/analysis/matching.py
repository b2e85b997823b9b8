"""How well attention matches point tracks: matching accuracy per layer x timestep.

The question of the research (CONTEXT.md section 2): does the query of a point on frame 0 find
the same point on frame f among frame f's keys? For each query point we take the token that
contains it on token frame 0, match it on token frame f by the argmax of the head-averaged
softmax of ``q k^T / sqrt(d)`` over frame f's tokens (the ``match_forward`` of
:mod:`datagen.capture.correspondence`), and compare with the token that contains the point's
true (or pseudo ground-truth) position on frame f.

Definitions used throughout (README table, tests, training log):

* a point counts on frame f when it is visible there and it **moved**: its position on frame f
  is at least one token width away from its frame-0 position in x or in y (Chebyshev, pixels);
  static points would reward a model that predicts no motion;
* a match is **correct** when the centre of the matched token is within one token width of the
  point's true position in x and in y (Chebyshev distance in pixels <= token size), so about
  2 x 2 tokens around the true position count;
* accuracy = correct / counted over all frames f >= 1, points and videos.

Baselines under the same definitions: ``no_motion`` (the match is the query's own token),
``pixel`` (argmax cosine similarity of the noised latent patches themselves, no attention).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from datagen.layout import TokenLayout


@dataclass
class MatchCounts:
    correct: int = 0
    counted: int = 0

    @property
    def accuracy(self) -> float:
        return self.correct / self.counted if self.counted else float("nan")

    def add(self, other: MatchCounts) -> None:
        self.correct += other.correct
        self.counted += other.counted


def head_averaged_matches(q: torch.Tensor, k: torch.Tensor, scale: float | None = None):
    """Forward matches of every frame-0 token: (B, T, F) token indices.

    ``q``, ``k``: (B, heads, F, T, d) video tokens. Argmax over frame f's tokens of the mean over
    heads of ``softmax(q[:, :, 0] k[:, :, f]^T * scale)``; scale defaults to d ** -0.5.
    """
    b, h, f, t, d = q.shape
    scale = d**-0.5 if scale is None else scale
    q0 = q[:, :, 0].float()
    out = torch.empty((b, t, f), dtype=torch.long)
    for j in range(f):
        logits = torch.einsum("bhnd,bhmd->bhnm", q0, k[:, :, j].float()) * scale
        out[:, :, j] = logits.softmax(-1).mean(1).argmax(-1)
    return out


def patch_vectors(latents: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, F, C, H, W) latents -> (B, 1, F, T, C*patch*patch) zero-mean unit-norm patch vectors
    in the transformer's token order (row-major), for the pixel-patch baseline."""
    b, f, c, hh, ww = latents.shape
    x = latents.float().reshape(b, f, c, hh // patch, patch, ww // patch, patch)
    x = x.permute(0, 1, 3, 5, 2, 4, 6).reshape(b, f, (hh // patch) * (ww // patch), -1)
    x = x - x.mean(-1, keepdim=True)
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    return x[:, None]


def pixel_matches(latents: torch.Tensor, patch: int) -> torch.Tensor:
    """Pixel-patch baseline matches, (B, T, F): argmax cosine similarity of patches."""
    v = patch_vectors(latents, patch)
    # One "head" and a large scale: the softmax argmax is the cosine argmax.
    return head_averaged_matches(v, v, scale=1.0)


def score_matches(
    matches: np.ndarray,
    query_tokens: np.ndarray,
    tracks: np.ndarray,
    visible: np.ndarray,
    layout: TokenLayout,
) -> MatchCounts:
    """Count correct matches of one video.

    ``matches`` (N, F) token index on each token frame for each query point (row-major within
    a frame); ``query_tokens`` (N,) frame-0 token of each point (used for nothing but the
    no-motion baseline, where ``matches`` repeats it); ``tracks`` (N, T, 2) raster pixels and
    ``visible`` (N, T) bool on video frames. Token frame j is compared at the last video frame
    it encodes.
    """
    del query_tokens
    f_count, h, w = layout.token_grid
    th, tw = layout.token_pixel_size
    out = MatchCounts()
    tracks = np.asarray(tracks, np.float64)
    for j in range(1, f_count):
        frames = layout.video_frames_of_token_frame(j)
        if not frames:
            continue
        vf = frames[-1]
        d = np.abs(tracks[:, vf] - tracks[:, 0])
        moved = (d[:, 0] >= tw) | (d[:, 1] >= th)
        inside = (
            (tracks[:, vf, 0] >= 0)
            & (tracks[:, vf, 0] < layout.width)
            & (tracks[:, vf, 1] >= 0)
            & (tracks[:, vf, 1] < layout.height)
        )
        use = np.asarray(visible[:, vf], bool) & moved & inside
        if not use.any():
            continue
        m = np.asarray(matches)[use, j].astype(np.int64)
        centre = layout.token_centre(np.stack([m // w, m % w], axis=-1))
        err = np.abs(centre - tracks[use, vf])
        out.correct += int(((err[:, 0] <= tw) & (err[:, 1] <= th)).sum())
        out.counted += int(use.sum())
    return out


def query_tokens_of(points_xy: np.ndarray, layout: TokenLayout) -> np.ndarray:
    """Frame-0 token index (row-major) of raster points (N, 2)."""
    return layout.token_index_of_pixel(points_xy)


@dataclass
class MatchingTable:
    """Accuracy per (row label, layer or baseline, timestep)."""

    timesteps: list[int]
    rows: dict[str, dict[int, MatchCounts]] = field(default_factory=dict)

    def add(self, row: str, timestep: int, counts: MatchCounts) -> None:
        self.rows.setdefault(row, {}).setdefault(timestep, MatchCounts()).add(counts)

    def accuracy(self, row: str, timestep: int) -> float:
        return self.rows[row][timestep].accuracy

    def to_json(self) -> dict[str, Any]:
        return {
            "timesteps": self.timesteps,
            "accuracy": {
                row: {str(t): round(c.accuracy, 4) for t, c in sorted(cols.items())}
                for row, cols in self.rows.items()
            },
            "counted": {
                row: {str(t): c.counted for t, c in sorted(cols.items())}
                for row, cols in self.rows.items()
            },
        }

    def markdown(self, counts: bool = False) -> str:
        """The table; ``counts`` adds each cell's correct / counted points (a percentage of
        three points says little), and a cell with no counted point reads 'n/a'."""
        head = "| | " + " | ".join(f"t={t}" for t in self.timesteps) + " |"
        sep = "|---|" + "---|" * len(self.timesteps)
        lines = [head, sep]

        def cell(c: MatchCounts) -> str:
            if not c.counted:
                return "n/a (0 points)" if counts else "n/a"
            text = f"{100 * c.accuracy:.1f}%"
            return f"{text} ({c.correct}/{c.counted})" if counts else text

        for row, cols in self.rows.items():
            cells = [cell(cols[t]) if t in cols else "" for t in self.timesteps]
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


def analyse_dataset(source: Any, kept_only: bool = True) -> MatchingTable:
    """Matching accuracy per captured layer x step of a built dataset, against its labels.

    Uses the stored correspondence (``match_forward``) and the sample's tracks: exact ground
    truth for synthetic videos, the tracker's pseudo-labels otherwise (only the tracks quality
    control kept, unless ``kept_only`` is False). Columns are the steps' timesteps.
    """
    from datagen.data import open_dataset
    from datagen.sample import QC_FLAG_BITS

    fields = ["tracks", "visible", "queries", "correspondence", "meta", "qc_flags"]
    table: MatchingTable | None = None
    for s in open_dataset(source, video=False, fields=fields):
        corr = s.get("correspondence")
        meta = s["meta"]
        if not corr or "layout" not in meta:
            continue
        layout = TokenLayout.from_json(meta["layout"])
        cap = meta["capture"]
        timesteps = [cap["step_timesteps"][str(st)] for st in cap["corr_steps"]]
        if table is None:
            table = MatchingTable(timesteps=timesteps)
        # Correspondence rows are the queries on frame 0, in order.
        first = np.flatnonzero(np.asarray(s["queries"])[:, 0] == 0)
        use = np.ones(first.size, bool)
        if kept_only and s.get("qc_flags") is not None:
            use = (np.asarray(s["qc_flags"])[first] & sum(QC_FLAG_BITS.values())) == 0
        qtok = query_tokens_of(s["queries"][first, 1:], layout)
        tracks, visible = s["tracks"][first], s["visible"][first]
        for li, layer in enumerate(cap["corr_layers"]):
            for si, t in enumerate(timesteps):
                m = np.asarray(corr["match_forward"][li, si])
                counts = score_matches(m[use], qtok[use], tracks[use], visible[use], layout)
                table.add(f"layer {layer}", t, counts)
    if table is None:
        raise ValueError(f"{source}: no sample carries correspondence arrays and a layout")
    return table
