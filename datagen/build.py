"""The build: resolve inputs, plan, run each shard (generate -> encode -> decode -> track ->
check -> write), assemble the manifest.

``prepare_build`` refuses bad input before anything is written or any model loads;
``datagen.worker.ShardWorker.run`` is what one shard does, independent of where it runs (see
executors/).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import traceback
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datagen.capture.products import capture_spec
from datagen.config import SOURCE_KINDS, BuildConfig
from datagen.errors import UserError
from datagen.executors.base import ShardFailure, fatal
from datagen.faults import failpoint
from datagen.index import index_name
from datagen.lock import LOCK, BuildLock
from datagen.models import get_family, training_vocabulary
from datagen.plan import Plan, ShardTask, make_plan
from datagen.prompts import Prompt, bank_digest, load_prompts
from datagen.sampleformat import json_value
from datagen.shards import (
    MANIFEST,
    Rejected,
    ShardStats,
    build_manifest,
    committed_stats,
    read_stats,
    shard_file,
    stats_name,
)
from datagen.software import software_versions
from datagen.sources.procedural import synthetic_config, synthetic_prompts
from datagen.sources.videos import video_prompts
from datagen.summary import human_bytes, qc_warning, vocabulary_note
from datagen.track.registry import make_tracker
from datagen.worker import STAGES, ShardResult, build_members  # noqa: F401  (STAGES re-exported)

log = logging.getLogger("datagen.build")


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
        started = [e for e in entries if e.name in ("build.log", LOCK)]
        if entries and not ours and not started:
            raise UserError(
                f"output {out} is not empty and holds no datagen build; choose an empty or new "
                "folder (--out)"
            )
        for e in ours:
            try:
                data = json_value(e.read_bytes())
            except (OSError, ValueError):
                continue
            old = data.get("config_fingerprint")
            if old and old != fingerprint:
                raise UserError(
                    f"output {out} holds a build with config fingerprint {old}, this config has "
                    f"{fingerprint}; build into a new folder or delete the old one to rebuild"
                )
    usage = shutil.disk_usage(base)
    if usage.total == 0:
        raise UserError(
            f"output {out} is not writable ({base} is on a file system that holds no files, "
            "such as /proc); choose another --out"
        )
    free = usage.free
    if needed_bytes > free:
        why = (
            f"output {out}: not enough free space: the build needs about "
            f"{needed_bytes / 1e6:.1f} MB more but {base} has {free / 1e6:.1f} MB free; free "
            "space or choose another --out"
        )
        if not dry_run:
            raise UserError(why)
        return why
    return None


def committed_samples(out: Path, plan: Plan, cfg: BuildConfig) -> int:
    """Samples of the plan in shards an earlier run of this config committed, judged by
    stats markers and tar sizes only (an estimate for the disk-space check: run_build hashes
    every committed tar before it keeps one, so a resume reads each tar once)."""
    if not out.is_dir():
        return 0
    fp, kinds = cfg.fingerprint(), tuple(build_members(cfg))
    done = 0
    for task in plan.shards:
        stats = committed_stats(out, task.index, fp, kinds, hashed=False)
        planned = sorted(u.key for u in task.units)
        if stats is not None and sorted(stats.keys + [r.key for r in stats.rejected]) == planned:
            done += len(task.units)
    return done


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
        raise UserError(f"source '{kind}' is not one of {', '.join(SOURCE_KINDS)} (--source)")
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
        family.check_model(cfg.model)
        family.check_generation(cfg.generation, cfg.model)
        family.check_capture_layers(capture_spec(cfg).all_layers, cfg.model)
        if kind == "text-to-video":
            family.check_prompts(prompts, cfg.generation, cfg.model)
    try:
        make_tracker(cfg.tracker.name, **cfg.tracker.settings)
    except (ValueError, TypeError) as exc:
        raise UserError(f"tracker: {exc} (--set tracker.name=... / tracker.settings=...)") from None
    plan = make_plan(cfg, prompts, limit)
    one = plan.bytes_per_sample + plan.feature_bytes_per_sample
    g = cfg.generation
    base = _nearest_existing(out)
    disk = shutil.disk_usage(base).total if base.is_dir() else 0
    if disk and one > disk and not dry_run:
        # Not space to free up: no disk there could hold one sample of this size.
        raise UserError(
            f"generation.num_frames={g.num_frames}, height={g.height}, width={g.width}: one sample "
            f"would take about {human_bytes(one)}, more than the whole disk under {out} "
            f"({human_bytes(disk)}); lower generation.num_frames, height or width"
        )
    # A resume needs room only for the shards not yet committed.
    todo = plan.num_samples - committed_samples(out, plan, cfg)
    needed = todo * one
    shortfall = check_output_dir(out, cfg.fingerprint(), needed, dry_run)
    note = None
    known = training_vocabulary(cfg.model.model_id)
    if kind == "text-to-video" and known is not None:
        # The prompts this build generates (--limit may take a part of the bank).
        planned = {u.prompt.id: u.prompt for t in plan.shards for u in t.units}
        note = vocabulary_note(list(planned.values()), known, cfg.model.model_id)
    return BuildRequest(cfg, prompts, plan, out, limit, shortfall, note)


def failed_shard(failure: ShardFailure, fingerprint: str) -> ShardStats:
    """A shard that failed every attempt, as the manifest lists it: no files, each of its
    samples rejected at stage 'shard' with the last attempt's reason (no stats marker is
    written, so a rerun builds it)."""
    t = failure.task
    reason = f"shard failed {failure.attempts} attempts; last: {failure.reason}"
    return ShardStats(
        t.index, fingerprint, [], {}, [Rejected(u.key, t.index, "shard", reason) for u in t.units]
    )


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
    shards_failed: list[int] = field(default_factory=list)
    """Shards that failed every attempt (listed in the manifest; a rerun builds them)."""


def run_build(
    req: BuildRequest,
    progress: bool = True,
    executor: Any = None,
) -> BuildSummary:
    """Build every shard not yet committed, then write the manifest."""
    from datagen.executors.local import LocalExecutor  # the executor imports the worker only

    out = req.out
    out.mkdir(parents=True, exist_ok=True)
    with BuildLock(out):
        return _run_locked(req, progress, executor or LocalExecutor())


def _run_locked(req: BuildRequest, progress: bool, executor: Any) -> BuildSummary:
    cfg, out = req.cfg, req.out
    fp = cfg.fingerprint()
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
        results = executor.run(cfg, todo, out, progress=progress)
        built = [r.stats for r in results if isinstance(r, ShardResult)]
        failed = [failed_shard(r, fp) for r in results if isinstance(r, ShardFailure)]
        for f in failed:  # uncommitted files a failed attempt may have left
            for kind in ("core", "features", "rejected"):
                name = shard_file(kind, f.index)
                (out / name).unlink(missing_ok=True)
                (out / index_name(name)).unlink(missing_ok=True)
        timings: dict[str, float] = defaultdict(float)
        for r in results:
            for k, v in getattr(r, "timings", {}).items():
                timings[k] += v
        all_stats = kept + built + failed
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

        failpoint("manifest", 0)  # every shard committed, the manifest not yet written
        try:
            atomic_write(out / MANIFEST, json_bytes(manifest))
        except OSError as exc:
            stop = fatal(exc, out)
            if stop is None:
                raise
            raise stop from None
        seconds = time.perf_counter() - start
        summary = BuildSummary(
            out=out,
            shards_built=len(built),
            shards_failed=sorted(f.index for f in failed),
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
