"""Token layout as data: the one place that owns how a video maps to DiT tokens.

Conventions:
- Pixel coordinates are raster: (0, 0) is the top-left corner of the top-left pixel.
- Latent frames: the causal video VAEs used here encode video frame 0 alone in latent frame 0
  and video frames ``c*f - (c-1) .. c*f`` in latent frame ``f >= 1`` (c = temporal compression).
- Token frames: with temporal patching ``p_t`` (CogVideoX 1.5), token frame ``j`` holds latent
  frames ``p_t*j .. p_t*j + p_t - 1`` of the *padded* latent sequence, whose first
  ``pad_front`` frames are padding (dropped after denoising).
- Video tokens are frame-major: index within the video part = ``j*(h*w) + y*w + x``; the full
  sequence index adds ``text_tokens`` when text comes first.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np


@dataclass(frozen=True)
class TokenLayout:
    family: str
    num_frames: int
    """Video frames."""
    height: int
    width: int
    vae_compression: tuple[int, int, int]
    """(time, height, width) compression of the VAE."""
    patch_size: tuple[int, int, int]
    """(time, height, width) patch of the transformer."""
    text_tokens: int
    """Text tokens in the attention sequence (0 when text enters by cross-attention)."""
    text_position: str
    """'first', 'last' (joint attention) or 'cross-attention'."""
    pad_front: int = 0
    """Padding latent frames prepended before temporal patching (CogVideoX 1.5)."""
    rope: bool = False

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        ct, ch, cw = self.vae_compression
        return ((self.num_frames - 1) // ct + 1, self.height // ch, self.width // cw)

    @property
    def token_grid(self) -> tuple[int, int, int]:
        """(token frames, rows, columns)."""
        lf, lh, lw = self.latent_shape
        pt, ph, pw = self.patch_size
        return ((lf + self.pad_front) // pt, lh // ph, lw // pw)

    @property
    def tokens_per_frame(self) -> int:
        _, h, w = self.token_grid
        return h * w

    @property
    def num_video_tokens(self) -> int:
        f, h, w = self.token_grid
        return f * h * w

    @property
    def token_pixel_size(self) -> tuple[int, int]:
        """(height, width) in pixels of the region one token covers."""
        _, ch, cw = self.vae_compression
        _, ph, pw = self.patch_size
        return (ch * ph, cw * pw)

    @property
    def video_offset(self) -> int:
        """Sequence index of the first video token."""
        return self.text_tokens if self.text_position == "first" else 0

    def video_token_index(self, frame: int, row: int, col: int) -> int:
        """Index within the video tokens of token frame ``frame``, row ``row``, column ``col``."""
        _, h, w = self.token_grid
        return frame * h * w + row * w + col

    def sequence_index(self, frame: int, row: int, col: int) -> int:
        """Index in the attention sequence (text included where it shares the sequence)."""
        return self.video_offset + self.video_token_index(frame, row, col)

    def token_of_pixel(self, xy: np.ndarray) -> np.ndarray:
        """(row, col) int64 (..., 2) of the token containing raster points xy (..., 2) = (x, y).

        Points on the right or bottom border are clamped into the last token.
        """
        th, tw = self.token_pixel_size
        _, h, w = self.token_grid
        xy = np.asarray(xy, np.float64)
        col = np.clip(np.floor(xy[..., 0] / tw), 0, w - 1).astype(np.int64)
        row = np.clip(np.floor(xy[..., 1] / th), 0, h - 1).astype(np.int64)
        return np.stack([row, col], axis=-1)

    def token_index_of_pixel(self, xy: np.ndarray) -> np.ndarray:
        """Index ``row * w + col`` (int64, ...) within a token frame of the token containing
        raster points xy (..., 2)."""
        rc = self.token_of_pixel(xy)
        return rc[..., 0] * self.token_grid[2] + rc[..., 1]

    def token_centre(self, rowcol: np.ndarray) -> np.ndarray:
        """Raster (x, y) float (..., 2) of the centre of tokens (row, col) (..., 2)."""
        th, tw = self.token_pixel_size
        rc = np.asarray(rowcol, np.float64)
        return np.stack([(rc[..., 1] + 0.5) * tw, (rc[..., 0] + 0.5) * th], axis=-1)

    def centre_of_token_index(self, index: np.ndarray) -> np.ndarray:
        """Raster (x, y) float (..., 2) of the centre of tokens given by their index ``row * w +
        col`` (...) within a token frame (the inverse of :meth:`token_index_of_pixel` up to the
        token's extent)."""
        w = self.token_grid[2]
        idx = np.asarray(index, np.int64)
        return self.token_centre(np.stack([idx // w, idx % w], axis=-1))

    def pixels_of_token_units(self, xy: np.ndarray) -> np.ndarray:
        """Raster pixels (x, y) float64 (..., 2) of points (x, y) (..., 2) in token units, raster
        convention (token (x=0, y=0) spans [0, 1] x [0, 1]; its centre is (0.5, 0.5)), as the
        correspondence's ``soft_forward`` gives them. A pure scaling: no half-pixel offset."""
        th, tw = self.token_pixel_size
        return np.asarray(xy, np.float64) * np.array([tw, th], np.float64)

    def pixel_region(self, row: int, col: int) -> tuple[int, int, int, int]:
        """Raster box (x0, y0, x1, y1) covered by token (row, col); x1, y1 exclusive."""
        th, tw = self.token_pixel_size
        return (col * tw, row * th, (col + 1) * tw, (row + 1) * th)

    def latent_frames_of_token_frame(self, frame: int) -> list[int]:
        """Latent frames (of the unpadded latent video) in token frame ``frame``; padding is
        left out, so the list may be shorter than the temporal patch."""
        pt = self.patch_size[0]
        lf = self.latent_shape[0]
        frames = [pt * frame + i - self.pad_front for i in range(pt)]
        return [f for f in frames if 0 <= f < lf]

    def video_frames_of_latent_frame(self, latent: int) -> list[int]:
        """Video frames a latent frame encodes (causal VAE rule)."""
        ct = self.vae_compression[0]
        if latent == 0:
            return [0]
        return [f for f in range(ct * latent - (ct - 1), ct * latent + 1) if f < self.num_frames]

    def video_frames_of_token_frame(self, frame: int) -> list[int]:
        out: list[int] = []
        for lat in self.latent_frames_of_token_frame(frame):
            out += self.video_frames_of_latent_frame(lat)
        return out

    def anchor_video_frame(self, frame: int) -> int | None:
        """The video frame a token frame is compared at: the last one it encodes (None for a
        token frame of padding only). One rule for every analysis (matching accuracy,
        zero-shot tracks): token frame 0 -> video frame 0, CogVideoX token frame j >= 1 ->
        video frame 4j."""
        frames = self.video_frames_of_token_frame(frame)
        return frames[-1] if frames else None

    def token_frame_of_video_frame(self, video_frame: int) -> int:
        ct = self.vae_compression[0]
        latent = 0 if video_frame == 0 else (video_frame + ct - 1) // ct
        return (latent + self.pad_front) // self.patch_size[0]

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> TokenLayout:
        """The layout a sample's metadata records (``to_json``; derived fields are ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in obj.items() if k in names}
        )

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["vae_compression"] = list(self.vae_compression)
        d["patch_size"] = list(self.patch_size)
        d["latent_shape"] = list(self.latent_shape)
        d["token_grid"] = list(self.token_grid)
        d["token_pixel_size"] = list(self.token_pixel_size)
        d["video_token_index"] = (
            "text_tokens + " if self.text_position == "first" else ""
        ) + "f*(h*w) + y*w + x"
        ct = self.vae_compression[0]
        d["latent_frame_rule"] = (
            f"latent frame 0 = video frame 0; latent frame f>=1 = video frames "
            f"{ct}f-{ct - 1}..{ct}f"
            + (
                f"; token frame j = padded latent frames {self.patch_size[0]}j.."
                f"{self.patch_size[0]}j+{self.patch_size[0] - 1}, first {self.pad_front} padding"
                if self.patch_size[0] > 1
                else ""
            )
        )
        return d
