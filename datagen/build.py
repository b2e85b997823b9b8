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

from datagen.check import check_sample
from datagen.config import BuildConfig, query_sampler
from datagen.errors import UserError
from datagen.models import get_family, training_vocabulary
from datagen.plan import Plan, ShardTask, WorkUnit, make_plan
from datagen.prompts import Prompt, bank_digest, load_prompts
from datagen.sample import (
    FEATURE_MEMBER,
    QC_FLAG_BITS,
    QC_MEMBER,
    Sample,
    members_for,
    npy_bytes,
)
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
from datagen.sources.base import Produced, Source
from datagen.sources.procedural import SyntheticSource, synthetic_config, synthetic_prompts
from datagen.sources.text_to_video import TextToVideoSource, capture_spec
from datagen.sources.videos import VideoFilesSource, video_prompts
from datagen.summary import qc_warning, vocabulary_note
from datagen.track.base import TrackResult, make_tracker
from datagen.track.qc import run_qc
from datagen.track.queries import QuerySampler
from datagen.video import decode_video, encode_video

log = logging.getLogger("datagen.build")
STAGES = ("load", "generate", "encode", "decode", "track", "qc", "validate", "write")


def qc_cause(verdict: dict[str, Any]) -> str:
    """The main cause of a QC rejection: the track flag that fired on most tracks, or
    'no tracks'."""
    counts = verdict.get("counts") or {}
    if not verdict.get("num_tracks"):
        return "no tracks"
    fired = sorted((-n, k) for k, n in counts.items() if n)
    return fired[0][1] if fired else "kept"


def qc_summary(verdicts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per-shard quality-control outcome: verdict counts, main causes of rejection and the
    rejected keys' reasons."""
    if not verdicts:
        return {}
    rejected = {k: v["reasons"] for k, v in sorted(verdicts.items()) if v["verdict"] != "accepted"}
    causes: dict[str, int] = defaultdict(int)
    for k in rejected:
        causes[qc_cause(verdicts[k])] += 1
    return {
        "accepted": len(verdicts) - len(rejected),
        "rejected": len(rejected),
        "kept_fraction_mean": float(np.mean([v["kept_fraction"] for v in verdicts.values()])),
        "causes": dict(sorted(causes.items())),
        "rejected_reasons": rejected,
    }


@dataclass
class BuildRequest:
    cfg: BuildConfig
    prompts: list[Prompt]
    plan: Plan
    out: Path
    limit: int | None
    disk_shortfall: str | None = None
    """Why the real build would be refused for lack of space (only a dry run gets here)."""
    vocabulary_note: str | None = None
    """One line on prompt words the model was not trained on (None: none, or not known)."""


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists():
        if p.parent == p:
            break
        p = p.parent
    return p


def check_output_dir(
    out: Path, fingerprint: str, needed_bytes: int, dry_run: bool = False
) -> str | None:
    """Refuse an output folder we cannot or must not write into (writes nothing). A dry run
    is not refused for lack of space: it gets the reason back, to print with its estimate."""
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
        # A build stopped before its first shard committed leaves only its log (and hidden
        # partial files): that folder is ours to resume into.
        started = [e for e in entries if e.name == "build.log"]
        if entries and not ours and not started:
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
        why = (
            f"output {out} is not writable: the build needs about {needed_bytes / 1e6:.1f} MB "
            f"but {base} has {free / 1e6:.1f} MB free; free space or choose another --out"
        )
        if not dry_run:
            raise UserError(why)
        return why
    return None


def prepare_build(
    cfg: BuildConfig,
    prompts_path: Path | None,
    out: Path,
    limit: int | None = None,
    dry_run: bool = False,
) -> BuildRequest:
    """Every check that needs no model: prompts, config, tracker, output folder, plan."""
    if limit is not None and limit <= 0:
        raise UserError(f"--limit must be positive, got {limit}")
    kind = cfg.source.kind
    if kind not in SOURCE_KINDS:
        raise UserError(
            f"source.kind '{kind}' is unknown; choose one of: {', '.join(SOURCE_KINDS)}"
        )
    capturing = capture_spec(cfg).enabled
    if kind in ("synthetic", "videos") and prompts_path is not None:
        raise UserError(f"--source {kind} takes no --prompts; drop --prompts")
    if kind == "synthetic":
        scene = synthetic_config(cfg.source.synthetic)  # refuse bad scene settings now
        g = cfg.generation
        if capturing and (scene.num_frames, scene.height, scene.width) != (
            g.num_frames,
            g.height,
            g.width,
        ):
            raise UserError(
                f"source.synthetic size {scene.num_frames}x{scene.height}x{scene.width} "
                f"differs from the model's generation size {g.num_frames}x{g.height}x{g.width}; "
                "the feature pass needs the model's size: set source.synthetic.num_frames/"
                "height/width to match, or switch capture off (capture.corr_layers=[] "
                "capture.feature_layers=[])"
            )
        prompts = synthetic_prompts(cfg.source.num_videos)
    elif kind == "videos":
        prompts = video_prompts(cfg.source.videos_dir, masks=bool(cfg.tracker.query_mask))
    else:
        if prompts_path is None:
            raise UserError("--prompts is required for --source text-to-video")
        prompts = load_prompts(prompts_path)
    if kind != "synthetic" or capturing:
        family = get_family(cfg.model.family)
        family.check_generation(cfg.generation, cfg.model)
        if kind == "text-to-video":
            family.check_prompts(prompts, cfg.generation, cfg.model)
    try:
        make_tracker(cfg.tracker.name, **cfg.tracker.settings)
    except (ValueError, TypeError) as exc:
        raise UserError(f"tracker: {exc} (--set tracker.name=... / tracker.settings=...)") from None
    plan = make_plan(cfg, prompts, limit)
    needed = plan.num_samples * (plan.bytes_per_sample + plan.feature_bytes_per_sample)
    shortfall = check_output_dir(out, cfg.fingerprint(), needed, dry_run)
    note = None
    known = training_vocabulary(cfg.model.model_id)
    if kind == "text-to-video" and known is not None:
        # The prompts this build generates (--limit may take a part of the bank).
        planned = {u.prompt.id: u.prompt for t in plan.shards for u in t.units}
        note = vocabulary_note(list(planned.values()), known, cfg.model.model_id)
    return BuildRequest(cfg, prompts, plan, out, limit, shortfall, note)


def sample_metadata(
    cfg: BuildConfig,
    unit: WorkUnit,
    layout: dict[str, Any] | None,
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
        **({"layout": layout} if layout is not None else {}),
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


SOURCE_KINDS = ("text-to-video", "synthetic", "videos")


def build_members(cfg: BuildConfig) -> dict[str, list[str]]:
    """Member extensions per shard kind that every sample of this build carries."""
    spec = capture_spec(cfg)
    if cfg.source.kind == "synthetic":
        out = members_for(bool(spec.corr_layers), bool(spec.feature_layers))
        out["core"] = sorted(out["core"] + ["masks.npy", "object_ids.npy"])
        return out
    out = members_for(bool(spec.corr_layers), bool(spec.feature_layers), qc=True)
    if cfg.qc.rejected == "separate":
        # A separated sample keeps everything it has, its q/k included.
        out["rejected"] = sorted(out["core"] + out.get("features", []))
    return out


def make_source(cfg: BuildConfig, sampler: QuerySampler | None) -> Source:
    if cfg.source.kind == "text-to-video":
        assert sampler is not None
        return TextToVideoSource(cfg, sampler)
    from datagen.sources.features import FeaturePass

    spec = capture_spec(cfg)
    features = FeaturePass(cfg, spec) if spec.enabled else None
    if cfg.source.kind == "synthetic":
        return SyntheticSource(cfg.source.synthetic, features, sampler)
    assert sampler is not None
    return VideoFilesSource(cfg, features, sampler)


@dataclass
class ShardResult:
    stats: ShardStats
    timings: dict[str, float] = field(default_factory=dict)


class ShardWorker:
    """What one shard does. Holds the model and tracker, loaded once per worker."""

    def __init__(self, cfg: BuildConfig):
        self.cfg = cfg
        self.tracker = make_tracker(cfg.tracker.name, **cfg.tracker.settings)
        self.sampler = query_sampler(cfg)
        """Samples each video's queries (None: a synthetic build's own points)."""
        self.source = make_source(cfg, self.sampler)
        self.qc = cfg.qc.thresholds()

    def label(self, unit: WorkUnit, made: Produced, timings: dict[str, float]) -> Sample:
        """Encode, decode, label and describe one video (raises _StageError on failure).

        Labels come from the source when it knows them exactly, else from the tracker run on
        the decoded frames, the frames a consumer will see.
        """
        cfg = self.cfg
        stage = "encode"
        try:
            t0 = time.perf_counter()
            video = encode_video(made.frames, cfg.generation.fps, cfg.video)
            t1 = time.perf_counter()
            stage = "decode"
            frames = decode_video(video)
            t2 = time.perf_counter()
            stage = "track"
            if made.labels is not None:
                queries = made.labels["queries"]
                result = TrackResult(made.labels["tracks"], made.labels["visible"], None)
                tracker_info = {"name": "ground-truth", "settings": {}}
                if self.sampler is None:
                    queries_meta = {"method": "synthetic-ground-truth", "frame": 0}
                else:
                    queries_meta = {**self.sampler.describe(), "labels": "exact"}
            else:
                assert made.queries is not None and self.sampler is not None
                queries = made.queries
                result = self.tracker.track(frames, queries)
                tracker_info = {"name": self.tracker.name, "settings": self.tracker.settings()}
                queries_meta = self.sampler.describe()
            t3 = time.perf_counter()
            stage = "qc"
            qc = None
            if made.labels is None:
                qc = run_qc(self.tracker, frames, result, queries, self.qc)
            t4 = time.perf_counter()
        except Exception as exc:
            raise _StageError(stage, exc) from exc
        timings["encode"] += t1 - t0
        timings["decode"] += t2 - t1
        timings["track"] += t3 - t2
        timings["qc"] += t4 - t3
        confidence = result.confidence
        has_conf = confidence is not None
        if confidence is None:
            confidence = np.full(result.visible.shape, np.nan, np.float32)
        queries_meta["count"] = int(queries.shape[0])
        capture = made.capture
        meta = sample_metadata(
            cfg,
            unit,
            self.source.layout_json(),
            tracker_info,
            frames,
            result.visible,
            queries_meta,
            has_conf,
            capture[0] if capture else None,
        )
        meta["source"] = made.meta
        extra = dict(made.extra_members)
        if qc is not None:
            bits = np.zeros(queries.shape[0], np.uint8)
            for name, bit in QC_FLAG_BITS.items():
                bits |= np.where(qc.flags[name], bit, 0).astype(np.uint8)
            extra[QC_MEMBER] = npy_bytes(bits)
            finite = qc.cycle_error[np.isfinite(qc.cycle_error)]
            meta["qc"] = {
                **qc.verdict,
                "flag_bits": QC_FLAG_BITS,
                "settings": self.qc.to_dict(),
                "cycle_error_median": float(np.median(finite)) if finite.size else None,
            }
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
            extra_members=extra,
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
        verdicts: dict[str, dict[str, Any]] = {}
        rejected: list[Rejected] = []
        separated: dict[str, dict[str, bytes]] = {}
        """QC-rejected samples of a qc.rejected=separate build."""
        # Existing videos go one at a time, so one bad file fails alone.
        bs = cfg.generation.batch_size if self.source.kind == "text-to-video" else 1
        t0 = time.perf_counter()
        _ = getattr(self.source, "pipe", None)  # load once, timed apart from generation
        timings["load"] += time.perf_counter() - t0
        for start in range(0, len(task.units), bs):
            batch = task.units[start : start + bs]
            t0 = time.perf_counter()
            try:
                made = self.source.produce(batch)
            except Exception as exc:  # a failed batch is recorded, the shard goes on
                log.warning("generation failed for %s: %s", [u.key for u in batch], exc)
                for u in batch:
                    stage = "generate" if self.source.kind == "text-to-video" else "read"
                    rejected.append(Rejected(u.key, task.index, stage, _reason(exc)))
                if on_sample:
                    on_sample(len(batch))
                continue
            timings["generate"] += time.perf_counter() - t0
            for unit, one in zip(batch, made, strict=True):
                try:
                    sample = self.label(unit, one, timings)
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
                        verdict = sample.meta.get("qc")
                        if verdict is not None:
                            verdicts[unit.key] = verdict
                        one = sample.members()
                        feats = (
                            {FEATURE_MEMBER: sample.features} if sample.features is not None else {}
                        )
                        failed_qc = verdict is not None and verdict["verdict"] == "rejected"
                        if failed_qc and cfg.qc.rejected != "keep":
                            reason = "; ".join(verdict["reasons"])
                            rejected.append(Rejected(unit.key, task.index, "qc", reason))
                            if cfg.qc.rejected == "separate":
                                separated[unit.key] = {**one, **feats}
                        else:
                            members[unit.key] = one
                            if feats:
                                features[unit.key] = feats
                if on_sample:
                    on_sample(1)
        t0 = time.perf_counter()
        tars = {"core": members}
        kinds = build_members(cfg)
        if "features" in kinds:
            tars["features"] = features
        if "rejected" in kinds:
            tars["rejected"] = separated
        stats = write_shard(
            out, task.index, tars, cfg.fingerprint(), rejected, qc_summary(verdicts)
        )
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
            "done in %.1fs: %d samples, %d rejected (%d failed), qc %s, stage seconds %s",
            seconds,
            summary.samples,
            summary.rejected,
            manifest["totals"]["failed"],
            {k: manifest["qc"][k] for k in ("accepted", "rejected")} if manifest["qc"] else None,
            {k: round(v, 2) for k, v in timings.items()},
        )
        warning = qc_warning(manifest)
        if warning:
            log.warning(warning)
        return summary
    except Exception:
        log.error("build failed:\n%s", traceback.format_exc())
        raise
    finally:
        logging.getLogger("datagen").removeHandler(handler)
        handler.close()
