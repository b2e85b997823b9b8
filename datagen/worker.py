"""What one shard does, wherever it runs: generate (or read) its videos, encode, decode,
track, check and write them (``ShardWorker.run``). Executors (``datagen.executors``) import
this module; it imports none of them, nor the build driver (``datagen.build``)."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from datagen.capture.products import capture_spec
from datagen.check import check_sample
from datagen.config import BuildConfig, query_sampler
from datagen.faults import failpoint
from datagen.plan import ShardTask, WorkUnit
from datagen.sample import (
    FEATURE_MEMBER,
    QC_FLAG_BITS,
    QC_MEMBER,
    Sample,
    members_for,
    npy_bytes,
)
from datagen.shards import Rejected, ShardStats, write_shard
from datagen.software import software_versions
from datagen.sources.base import Produced, Source
from datagen.track.base import TrackResult
from datagen.track.qc import run_qc
from datagen.track.queries import QuerySampler
from datagen.track.registry import make_tracker
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


def build_members(cfg: BuildConfig) -> dict[str, list[str]]:
    """Member extensions per shard kind that every sample of this build carries."""
    spec = capture_spec(cfg)
    if cfg.source.kind == "synthetic":
        out = members_for(bool(spec.corr_layers), spec.has_features)
        out["core"] = sorted(out["core"] + ["masks.npy", "object_ids.npy"])
        return out
    out = members_for(bool(spec.corr_layers), spec.has_features, qc=True)
    if cfg.qc.rejected == "separate":
        # A separated sample keeps everything it has, its q/k included.
        out["rejected"] = sorted(out["core"] + out.get("features", []))
    return out


def make_source(cfg: BuildConfig, sampler: QuerySampler | None) -> Source:
    if cfg.source.kind == "text-to-video":
        from datagen.sources.text_to_video import TextToVideoSource

        assert sampler is not None
        return TextToVideoSource(cfg, sampler)
    from datagen.sources.features import FeaturePass
    from datagen.sources.procedural import SyntheticSource
    from datagen.sources.videos import VideoFilesSource

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
            capture.meta if capture else None,
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
            correspondence=capture.correspondence if capture else None,
            features=capture.features if capture else None,
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
        failpoint("shard-start", task.index)
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
                failpoint("shard-sample", task.index)
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
