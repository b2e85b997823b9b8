"""The build: resolve inputs, plan, run each shard (generate -> encode -> decode -> track ->
check -> write), assemble the manifest.

``prepare_build`` refuses bad input before anything is written or any model loads;
``ShardWorker.run`` is what one shard does, independent of where it runs (see executors/).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import traceback
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datagen.capture.recorder import CaptureSpec, Recorder
from datagen.check import check_sample
from datagen.config import BuildConfig
from datagen.errors import UserError
from datagen.layout import TokenLayout
from datagen.models import get_family
from datagen.plan import Plan, ShardTask, WorkUnit, make_plan
from datagen.prompts import Prompt, bank_digest, load_prompts
from datagen.sample import FEATURE_MEMBER, Sample, members_for
from datagen.shards import (
    MANIFEST,
    Rejected,
    ShardStats,
    build_manifest,
    committed_stats,
    read_stats,
    stats_name,
    write_shard,
)
from datagen.software import software_versions
from datagen.track.base import make_tracker
from datagen.track.queries import grid_queries
from datagen.video import decode_video, encode_video

log = logging.getLogger("datagen.build")
STAGES = ("load", "generate", "encode", "decode", "track", "validate", "write")


@dataclass
class BuildRequest:
    cfg: BuildConfig
    prompts: list[Prompt]
    plan: Plan
    out: Path
    limit: int | None


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists():
        if p.parent == p:
            break
        p = p.parent
    return p


def check_output_dir(out: Path, fingerprint: str, needed_bytes: int) -> None:
    """Refuse an output folder we cannot or must not write into (writes nothing)."""
    base = _nearest_existing(out)
    if not base.is_dir():
        raise UserError(f"output {out} cannot be created: {base} is not a folder (--out)")
    read_only = bool(os.statvfs(base).f_flag & os.ST_RDONLY)
    if read_only or not os.access(base, os.W_OK | os.X_OK):
        why = "is on a read-only file system" if read_only else "denies writing"
        raise UserError(f"output {out} is not writable ({base} {why}); choose another --out")
    if out.exists():
        if not out.is_dir():
            raise UserError(f"output {out} exists and is not a folder (--out)")
        entries = [e for e in out.iterdir() if not e.name.startswith(".")]
        ours = [e for e in entries if e.name == MANIFEST or e.name.endswith(".stats.json")]
        if entries and not ours:
            raise UserError(
                f"output {out} is not empty and holds no datagen build; choose an empty or new "
                "folder (--out)"
            )
        for e in ours:
            try:
                data = json.loads(e.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            old = data.get("config_fingerprint")
            if old and old != fingerprint:
                raise UserError(
                    f"output {out} holds a build with config fingerprint {old}, this config has "
                    f"{fingerprint}; build into a new folder or delete the old one to rebuild"
                )
    free = shutil.disk_usage(base).free
    if needed_bytes > free:
        raise UserError(
            f"output {out} is not writable: the build needs about {needed_bytes / 1e6:.1f} MB "
            f"but {base} has {free / 1e6:.1f} MB free; free space or choose another --out"
        )


def prepare_build(
    cfg: BuildConfig, prompts_path: Path, out: Path, limit: int | None = None
) -> BuildRequest:
    """Every check that needs no model: prompts, config, tracker, output folder, plan."""
    if limit is not None and limit <= 0:
        raise UserError(f"--limit must be positive, got {limit}")
    family = get_family(cfg.model.family)
    family.check_generation(cfg.generation)
    try:
        make_tracker(cfg.tracker.name, **cfg.tracker.settings)
    except (ValueError, TypeError) as exc:
        raise UserError(f"tracker: {exc} (--set tracker.name=... / tracker.settings=...)") from None
    prompts = load_prompts(prompts_path)
    plan = make_plan(cfg, prompts, limit)
    needed = plan.num_samples * (plan.bytes_per_sample + plan.feature_bytes_per_sample)
    check_output_dir(out, cfg.fingerprint(), needed)
    return BuildRequest(cfg, prompts, plan, out, limit)


def sample_metadata(
    cfg: BuildConfig,
    unit: WorkUnit,
    layout: dict[str, Any],
    tracker_info: dict[str, Any],
    frames: np.ndarray,
    visible: np.ndarray,
    queries_meta: dict[str, Any],
    has_confidence: bool,
    capture: dict[str, Any] | None = None,
) -> dict[str, Any]:
    g = cfg.generation
    t, h, w = frames.shape[:3]
    return {
        "format_version": 1,
        "key": unit.key,
        "prompt": {
            "id": unit.prompt.id,
            "text": unit.prompt.prompt,
            "category": unit.prompt.category,
            "set": unit.prompt.set,
            "negative": unit.negative_prompt,
            "replica": unit.replica,
        },
        "seed": unit.seed,
        "config": cfg.to_dict(),
        "config_fingerprint": cfg.fingerprint(),
        "video": {
            "num_frames": int(t),
            "height": int(h),
            "width": int(w),
            "fps": g.fps,
            "codec": cfg.video.codec,
            "pix_fmt": cfg.video.pix_fmt,
        },
        "layout": layout,
        "tracker": tracker_info,
        "queries": queries_meta,
        "labels": {
            "num_points": int(visible.shape[0]),
            "num_frames": int(t),
            "visible_fraction": float(visible.mean()) if visible.size else 0.0,
            "confidence": "tracker" if has_confidence else "none",
        },
        "coordinates": "raster",
        "software": software_versions(),
        **({"capture": capture} if capture is not None else {}),
    }


def capture_spec(cfg: BuildConfig) -> CaptureSpec:
    c = cfg.capture
    return CaptureSpec(
        feature_layers=tuple(c.feature_layers) if c.feature_steps else (),
        feature_steps=tuple(c.feature_steps) if c.feature_layers else (),
        corr_layers=tuple(c.corr_layers) if c.corr_steps else (),
        corr_steps=tuple(c.corr_steps) if c.corr_layers else (),
        step_unit=c.step_unit,
    )


def build_members(cfg: BuildConfig) -> dict[str, list[str]]:
    spec = capture_spec(cfg)
    return members_for(bool(spec.corr_layers), bool(spec.feature_layers))


@dataclass
class ShardResult:
    stats: ShardStats
    timings: dict[str, float] = field(default_factory=dict)


class ShardWorker:
    """What one shard does. Holds the model and tracker, loaded once per worker."""

    def __init__(self, cfg: BuildConfig):
        self.cfg = cfg
        self.family = get_family(cfg.model.family)
        self.tracker = make_tracker(cfg.tracker.name, **cfg.tracker.settings)
        self.spec = capture_spec(cfg)
        self._pipe = None
        self.layout: TokenLayout | None = None

    @property
    def pipe(self) -> Any:
        if self._pipe is None:
            self._pipe = self.family.load_pipeline(self.cfg.model)
            self.layout = self.family.layout(self._pipe, self.cfg.generation)
        return self._pipe

    def query_points(self) -> np.ndarray:
        """The tracker's query points, known before generation (a grid on frame 0)."""
        g = self.cfg.generation
        return grid_queries(self.cfg.tracker.grid_size, g.height, g.width, frame=0)

    def generate(self, units: tuple[WorkUnit, ...]) -> tuple[np.ndarray, Recorder | None]:
        """Generate a batch of videos, capturing attention when the config asks for it."""
        cfg, pipe = self.cfg, self.pipe
        recorder = None
        remove = None
        if self.spec.enabled:
            layout = self.layout
            rowcol = layout.token_of_pixel(self.query_points()[:, 1:])
            _, _, w = layout.token_grid
            recorder = Recorder(
                self.spec,
                batch=len(units),
                query_tokens=torch.from_numpy(rowcol[:, 0] * w + rowcol[:, 1]),
                token_grid=layout.token_grid,
            )
            remove = self.family.install_capture(
                pipe, recorder, guidance=cfg.generation.guidance_scale > 1
            )
        try:
            videos = self.family.generate(
                pipe,
                [u.prompt.prompt for u in units],
                [u.negative_prompt for u in units],
                [u.seed for u in units],
                cfg.generation,
            )
        finally:
            if remove is not None:
                remove()
        return videos, recorder

    def capture_products(
        self, recorder: Recorder, b: int
    ) -> tuple[dict[str, Any], bytes | None, bytes | None]:
        """Video ``b``'s capture metadata, correspondence safetensors and q/k safetensors."""
        import safetensors.numpy
        import safetensors.torch

        arrays, layers, steps = recorder.stacked_correspondence(b)
        corr = None
        if self.spec.corr_layers:
            corr = safetensors.numpy.save(
                arrays,
                # One key only: safetensors writes metadata maps in no fixed order.
                metadata={"layers_steps": json.dumps({"layers": layers, "steps": steps})},
            )
        feats = None
        if self.spec.feature_layers:
            feats = safetensors.torch.save(recorder.features[b])
        meta = {
            "corr_layers": layers,
            "corr_steps": steps,
            "corr_arrays": {k: list(v.shape) for k, v in sorted(arrays.items())},
            "feature_tensors": sorted(recorder.features[b]),
            "step_timesteps": {str(k): v for k, v in sorted(recorder.step_timesteps.items())},
            "query_tokens": "token of each query point in token frame 0, index row*w + col",
            "cfg_branch": "conditional",
            "dtype": "float16",
        }
        return meta, corr, feats

    def label(
        self,
        unit: WorkUnit,
        raw: np.ndarray,
        timings: dict[str, float],
        capture: tuple[dict[str, Any], bytes | None, bytes | None] | None = None,
    ) -> Sample:
        """Encode, decode, track and describe one generated video (raises on failure)."""
        cfg = self.cfg
        stage = "encode"
        try:
            t0 = time.perf_counter()
            video = encode_video(raw, cfg.generation.fps, cfg.video)
            t1 = time.perf_counter()
            stage = "decode"
            frames = decode_video(video)
            t2 = time.perf_counter()
            stage = "track"
            queries = self.query_points()
            result = self.tracker.track(frames, queries)
            t3 = time.perf_counter()
        except Exception as exc:
            raise _StageError(stage, exc) from exc
        timings["encode"] += t1 - t0
        timings["decode"] += t2 - t1
        timings["track"] += t3 - t2
        confidence = result.confidence
        has_conf = confidence is not None
        if confidence is None:
            confidence = np.full(result.visible.shape, np.nan, np.float32)
        meta = sample_metadata(
            cfg,
            unit,
            self.layout.to_json() if self.layout else {},
            {"name": self.tracker.name, "settings": self.tracker.settings()},
            frames,
            result.visible,
            {
                "method": "grid",
                "grid_size": cfg.tracker.grid_size,
                "frame": 0,
                "count": int(queries.shape[0]),
            },
            has_conf,
            capture[0] if capture else None,
        )
        return Sample(
            key=unit.key,
            video=video,
            frames=frames,
            tracks=np.asarray(result.tracks, np.float32),
            visible=np.asarray(result.visible, bool),
            queries=np.asarray(queries, np.float32),
            confidence=np.asarray(confidence, np.float32),
            meta=meta,
            correspondence=capture[1] if capture else None,
            features=capture[2] if capture else None,
        )

    def run(
        self,
        task: ShardTask,
        out: Path,
        on_sample: Callable[[int], None] | None = None,
    ) -> ShardResult:
        cfg = self.cfg
        timings: dict[str, float] = defaultdict(float)
        members: dict[str, dict[str, bytes]] = {}
        features: dict[str, dict[str, bytes]] = {}
        rejected: list[Rejected] = []
        bs = cfg.generation.batch_size
        t0 = time.perf_counter()
        _ = self.pipe  # load once, timed apart from generation
        timings["load"] += time.perf_counter() - t0
        for start in range(0, len(task.units), bs):
            batch = task.units[start : start + bs]
            t0 = time.perf_counter()
            try:
                videos, recorder = self.generate(batch)
            except Exception as exc:  # a failed batch is recorded, the shard goes on
                log.warning("generation failed for %s: %s", [u.key for u in batch], exc)
                for u in batch:
                    rejected.append(Rejected(u.key, task.index, "generate", _reason(exc)))
                if on_sample:
                    on_sample(len(batch))
                continue
            timings["generate"] += time.perf_counter() - t0
            for b, (unit, raw) in enumerate(zip(batch, videos, strict=True)):
                try:
                    products = self.capture_products(recorder, b) if recorder else None
                    sample = self.label(unit, raw, timings, products)
                except _StageError as err:
                    log.warning("%s failed at %s: %s", unit.key, err.stage, err.exc)
                    rejected.append(Rejected(unit.key, task.index, err.stage, _reason(err.exc)))
                else:
                    t0 = time.perf_counter()
                    problems = check_sample(
                        sample.frames,
                        sample.tracks,
                        sample.visible,
                        sample.queries,
                        sample.confidence,
                        sample.meta,
                    )
                    timings["validate"] += time.perf_counter() - t0
                    if problems:
                        log.warning("%s rejected: %s", unit.key, "; ".join(problems))
                        rejected.append(
                            Rejected(unit.key, task.index, "validate", "; ".join(problems))
                        )
                    else:
                        members[unit.key] = sample.members()
                        if sample.features is not None:
                            features[unit.key] = {FEATURE_MEMBER: sample.features}
                if on_sample:
                    on_sample(1)
        t0 = time.perf_counter()
        tars = {"core": members}
        if self.spec.feature_layers:
            tars["features"] = features
        stats = write_shard(out, task.index, tars, cfg.fingerprint(), rejected)
        timings["write"] += time.perf_counter() - t0
        return ShardResult(stats, dict(timings))


class _StageError(Exception):
    def __init__(self, stage: str, exc: BaseException):
        super().__init__(f"{stage}: {exc}")
        self.stage = stage
        self.exc = exc


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


@dataclass
class BuildSummary:
    out: Path
    shards_built: int
    shards_kept: int
    samples: int
    rejected: int
    bytes: int
    seconds: float
    timings: dict[str, float]
    manifest: dict[str, Any]


def run_build(
    req: BuildRequest,
    progress: bool = True,
    executor: Any = None,
) -> BuildSummary:
    """Build every shard not yet committed, then write the manifest."""
    from datagen.executors.local import LocalExecutor

    cfg, out = req.cfg, req.out
    fp = cfg.fingerprint()
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / "build.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger("datagen").addHandler(handler)
    logging.getLogger("datagen").setLevel(logging.INFO)
    start = time.perf_counter()
    try:
        log.info(
            "build %s: fingerprint %s, %d samples in %d shards",
            out,
            fp,
            req.plan.num_samples,
            len(req.plan.shards),
        )
        kept: list[ShardStats] = []
        todo: list[ShardTask] = []
        kinds = tuple(build_members(cfg))
        for task in req.plan.shards:
            stats = committed_stats(out, task.index, fp, kinds)
            planned = sorted(u.key for u in task.units)
            if (
                stats is not None
                and sorted(stats.keys + [r.key for r in stats.rejected]) == planned
            ):
                kept.append(stats)
            else:
                if read_stats(out, task.index) is not None:
                    log.info(
                        "shard %d: stats do not match its tars or plan; rebuilding", task.index
                    )
                    (out / stats_name(task.index)).unlink(missing_ok=True)
                todo.append(task)
        log.info("%d shards already committed, %d to build", len(kept), len(todo))
        executor = executor or LocalExecutor()
        results = executor.run(cfg, todo, out, progress=progress)
        built = [r.stats for r in results]
        timings: dict[str, float] = defaultdict(float)
        for r in results:
            for k, v in r.timings.items():
                timings[k] += v
        all_stats = kept + built
        manifest = build_manifest(
            all_stats,
            cfg.to_dict(),
            fp,
            {"digest": bank_digest(req.prompts), "prompts": len(req.prompts)},
            software_versions(),
            build_members(cfg),
            req.limit,
        )
        from datagen.sample import json_bytes
        from datagen.shards import atomic_write

        atomic_write(out / MANIFEST, json_bytes(manifest))
        seconds = time.perf_counter() - start
        summary = BuildSummary(
            out=out,
            shards_built=len(built),
            shards_kept=len(kept),
            samples=manifest["totals"]["samples"],
            rejected=manifest["totals"]["rejected"],
            bytes=manifest["totals"]["bytes"],
            seconds=seconds,
            timings=dict(timings),
            manifest=manifest,
        )
        log.info(
            "done in %.1fs: %d samples, %d rejected, stage seconds %s",
            seconds,
            summary.samples,
            summary.rejected,
            {k: round(v, 2) for k, v in timings.items()},
        )
        return summary
    except Exception:
        log.error("build failed:\n%s", traceback.format_exc())
        raise
    finally:
        logging.getLogger("datagen").removeHandler(handler)
        handler.close()
