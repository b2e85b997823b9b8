"""`--source videos DIR`: existing video files, labelled by the tracker and, when capture is on,
given attention features by the zero-shot feature pass (:mod:`datagen.sources.features`).

Each file is one work unit whose id is its file name without the extension (letters, digits,
'-' and '_'; other characters become '_'). A ``NAME.txt`` beside ``NAME.mp4`` holds the prompt
the feature pass conditions on (default: empty); a ``NAME.mask.png`` beside it is its
first frame's object mask (non-zero = object), needed when ``tracker.query_mask=objects``
restricts the queries to objects. Videos are cut to ``generation.num_frames``
frames and resized to ``generation.height`` x ``generation.width`` (area interpolation when
shrinking), the size the model and the layout expect; the original size is recorded.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np

from datagen.config import BuildConfig
from datagen.errors import UserError
from datagen.plan import WorkUnit
from datagen.prompts import ID_PATTERN, Prompt
from datagen.sources.base import Produced
from datagen.track.queries import QuerySampler

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")


def mask_path(video: str | Path) -> Path:
    """Where a video's first-frame object mask lives: ``NAME.mask.png`` beside it."""
    v = Path(video)
    return v.with_name(v.stem + ".mask.png")


def read_mask(path: str | Path, height: int, width: int) -> np.ndarray:
    """A mask image as bool (height, width): non-zero pixels are object (nearest resize)."""
    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise ValueError(f"{path} is not a readable image")
    if img.shape != (height, width):
        img = cv2.resize(img, (width, height), interpolation=cv2.INTER_NEAREST)
    return img > 0


def video_prompts(folder: str | Path, masks: bool = False) -> list[Prompt]:
    """One work unit per video file in ``folder`` (sorted by name); ``masks``: every video
    must have its ``NAME.mask.png``."""
    if not str(folder):
        raise UserError("--source videos needs a folder: --source videos DIR")
    path = Path(folder)
    if not path.is_dir():
        raise UserError(f"--source videos {folder}: not a folder of video files")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in VIDEO_EXTENSIONS)
    if not files:
        raise UserError(f"--source videos {folder}: no video files ({', '.join(VIDEO_EXTENSIONS)})")
    prompts: list[Prompt] = []
    seen: dict[str, Path] = {}
    for f in files:
        pid = re.sub(r"[^A-Za-z0-9_-]", "_", f.stem)[:64]
        if not ID_PATTERN.match(pid):
            pid = ("v" + pid)[:64]
        if pid in seen:
            raise UserError(f"{f}: id '{pid}' also belongs to {seen[pid].name}; rename one of them")
        seen[pid] = f
        side = f.with_suffix(".txt")
        text = ""
        if side.is_file():
            try:
                text = " ".join(side.read_text(encoding="utf-8").split())
            except UnicodeDecodeError:
                raise UserError(f"{side}: not UTF-8 text; save it as UTF-8") from None
        if masks and not mask_path(f).is_file():
            raise UserError(
                f"{f}: no object mask {mask_path(f).name} beside it, which "
                "tracker.query_mask=objects needs; add one (non-zero = object) or unset "
                "tracker.query_mask"
            )
        prompts.append(Prompt(id=pid, prompt=text, category="video", set="", source=str(f)))
    return prompts


def read_video_file(path: str | Path, num_frames: int) -> tuple[np.ndarray, dict[str, Any]]:
    """The first ``num_frames`` frames of a video file, uint8 (T, H, W, 3) RGB."""
    frames = []
    with av.open(str(path), mode="r") as container:
        stream = container.streams.video[0]
        stream.thread_type = "NONE"
        fps = float(stream.average_rate) if stream.average_rate else None
        for frame in container.decode(stream):
            frames.append(frame.to_ndarray(format="rgb24"))
            if len(frames) == num_frames:
                break
    if len(frames) < num_frames:
        raise ValueError(f"{path} has {len(frames)} frames, fewer than {num_frames} needed")
    video = np.stack(frames)
    return video, {"height": int(video.shape[1]), "width": int(video.shape[2]), "fps": fps}


def fit_size(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    if frames.shape[1:3] == (height, width):
        return frames
    shrink = frames.shape[1] * frames.shape[2] > height * width
    interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    return np.stack([cv2.resize(f, (width, height), interpolation=interp) for f in frames])


class VideoFilesSource:
    kind = "videos"

    def __init__(self, cfg: BuildConfig, features: Any | None, sampler: QuerySampler):
        self.cfg = cfg
        self.features = features
        self.sampler = sampler

    @property
    def pipe(self) -> Any:
        return self.features.pipe if self.features is not None else None

    def produce(self, units: tuple[WorkUnit, ...]) -> list[Produced]:
        g = self.cfg.generation
        out = []
        for u in units:
            frames, original = read_video_file(u.prompt.source, g.num_frames)
            frames = fit_size(frames, g.height, g.width)
            mask = None
            if self.sampler.mask:
                mask = read_mask(mask_path(u.prompt.source), g.height, g.width)
            queries = self.sampler.sample(
                g.height, g.width, g.num_frames, u.seed, first_frame=frames[0], mask=mask
            )
            capture = None
            if self.features is not None:
                capture = self.features.run(frames, u.prompt.prompt, u.seed, queries)
            out.append(
                Produced(
                    frames=np.ascontiguousarray(frames),
                    capture=capture,
                    queries=queries,
                    meta={
                        "kind": self.kind,
                        "file": Path(u.prompt.source).name,
                        "original": original,
                        "resized": list(frames.shape[1:3])
                        != [
                            original["height"],
                            original["width"],
                        ],
                    },
                )
            )
        return out

    def layout_json(self) -> dict[str, Any] | None:
        if self.features is None or self.features.layout is None:
            return None
        return self.features.layout.to_json()
