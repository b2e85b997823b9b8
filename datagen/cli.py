"""Command line: parses arguments and calls the API. Bad input -> one line, exit 2."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from datagen.errors import UserError
from datagen.quiet import quiet_libraries
from datagen.summary import human_bytes


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every user error
        words = self.prog.split()
        command = "datagen" if len(words) == 1 else f"datagen {words[-1]}"
        raise UserError(f"{message} (see '{command} --help')")


def cmd_build(args: argparse.Namespace) -> int:
    from datagen.build import prepare_build, run_build
    from datagen.capture.products import capture_spec
    from datagen.config import SOURCE_KINDS
    from datagen.presets import resolve_config
    from datagen.summary import qc_warning, summary_lines

    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    if args.max_retries < 0:
        raise UserError(f"--max-retries must be 0 or more, got {args.max_retries}")
    if args.executor != "ray" and (args.ray_address or args.ray_actors):
        raise UserError("--ray-address and --ray-actors go with --executor ray")
    if args.executor == "ray" and args.workers > 1:
        raise UserError("--workers is for the local executor; with --executor ray use --ray-actors")
    if args.ray_actors is not None and args.ray_actors < 1:
        raise UserError(f"--ray-actors must be at least 1, got {args.ray_actors}")
    overrides = list(args.set)
    if args.source:
        kind, *rest = args.source
        choices = SOURCE_KINDS
        if kind not in choices:
            raise UserError(f"--source {kind}: choose one of {', '.join(choices)}")
        if (kind == "videos") != bool(rest) or len(rest) > 1:
            raise UserError(
                "--source takes a folder only for videos: --source videos DIR, "
                "--source synthetic, --source text-to-video"
            )
        overrides.insert(0, f"source.kind={kind}")
        if rest:
            overrides.insert(1, f"source.videos_dir={rest[0]}")
    cfg = resolve_config(args.preset, args.config, overrides)
    req = prepare_build(cfg, args.prompts, args.out, args.limit, dry_run=args.dry_run)
    plan = req.plan
    total = plan.num_samples * (plan.bytes_per_sample + plan.feature_bytes_per_sample)
    cap = cfg.capture
    if cfg.source.kind == "synthetic":
        what = f"{plan.num_samples} synthetic videos with exact tracks"
    elif cfg.source.kind == "videos":
        what = f"{plan.num_samples} videos from {cfg.source.videos_dir}"
    else:
        what = (
            f"{plan.num_samples} samples from {len(req.prompts)} prompts "
            f"({cfg.generation.replicas} per prompt), preset {cfg.preset}, "
            f"model {cfg.model.model_id}"
        )
    print(
        f"plan: {what}; {len(plan.shards)} shards of up to {plan.samples_per_shard}; "
        f"config fingerprint {cfg.fingerprint()}"
    )
    capture = (
        f" + {human_bytes(plan.feature_bytes_per_sample)} of q/k features "
        f"({len(cap.feature_layers)} layers x {len(cap.feature_steps)} steps"
        + (f", hidden states of {len(cap.hidden_layers)} layers" if cap.hidden_layers else "")
        + f"; correspondence "
        f"for {len(cap.corr_layers)} layers x {len(cap.corr_steps)} steps)"
        if capture_spec(cfg).enabled
        else ""
    )
    print(
        f"size: about {human_bytes(plan.bytes_per_sample)} per core sample{capture}, "
        f"{human_bytes(total)} in all"
    )
    if req.vocabulary_note:
        print(req.vocabulary_note)
    if args.dry_run:
        if req.disk_shortfall:
            print(
                f"dry run: nothing written; the build itself would stop here: {req.disk_shortfall}"
            )
            return 0
        print("dry run: nothing written")
        return 0
    quiet_libraries()
    if args.executor == "ray":
        from datagen.executors.ray_executor import RayExecutor

        executor: Any = RayExecutor(args.ray_address, args.ray_actors, args.max_retries)
    elif args.workers > 1:
        from datagen.executors.processes import ProcessExecutor

        executor = ProcessExecutor(args.workers, args.max_retries)
    else:
        from datagen.executors.local import LocalExecutor

        executor = LocalExecutor(args.max_retries)
    s = run_build(req, progress=not args.quiet, executor=executor)
    for line in summary_lines(s.manifest, s.out, s.seconds, s.shards_kept):
        print(line)
    warning = qc_warning(s.manifest)
    if warning:
        print(warning, file=sys.stderr)
    if s.shards_failed:
        print(
            f"datagen: error: shard(s) {', '.join(map(str, s.shards_failed))} failed every "
            f"attempt ({args.max_retries} retries; reasons in {s.out / 'manifest.json'}); run "
            "the same command again to build only those",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from datagen.validate import validate_dataset

    problems, checked = validate_dataset(args.dataset)
    for p in problems:
        print(f"{args.dataset}: {p}")
    if problems:
        print(f"invalid: {len(problems)} problem(s) in {args.dataset}", file=sys.stderr)
        return 1
    print(f"valid: {checked} samples in {args.dataset}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from datagen.verify import verify

    problems, what = verify(args.path, quick=args.quick)
    for p in problems:
        print(f"{args.path}: {p}")
    depth = "checksums and counts" if args.quick else "checksums, counts and every sample"
    if problems:
        print(f"not verified: {len(problems)} problem(s) in {what} {args.path}", file=sys.stderr)
        return 1
    print(f"verified {what} {args.path} ({depth})")
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    from datagen.release import make_release

    made = make_release(
        args.dataset,
        args.out,
        args.name,
        args.version,
        args.license,
        features=args.features,
        prompts=args.prompts,
        calibration=args.calibration,
        extends=args.extends,
    )
    print(
        f"release {made['name']} {args.version}: {made['samples']} samples in {made['shards']} "
        f"core shards -> {made['out']} (check it with datagen verify {made['out']})"
    )
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    from datagen.publish import publish

    done = publish(
        args.release, args.to, dry_run=args.dry_run, revision=args.revision, private=args.private
    )
    if args.dry_run:
        for i, commit in enumerate(done.get("commits") or [done["send"]]):
            where = f" (commit {i + 1} of {len(done['commits'])})" if "commits" in done else ""
            for path in commit:
                print(f"would send {path}{where}")
        print(f"dry run: {len(done['send'])} to send, {len(done['skip'])} already there; "
              "nothing sent")  # fmt: skip
        return 0
    if "commits" in done:  # the Hub: upload_folder itself skips files already there
        print(f"published {args.release} -> {args.to}: {len(done['send'])} files in 2 commits "
              f"(data, then card and checksums), {done['checked']} checked on the Hub")  # fmt: skip
    else:
        print(
            f"published {args.release} -> {args.to}: {len(done['send'])} sent, "
            f"{len(done['skip'])} already there, {done['checked']} checked at the target"
        )
    if done.get("others"):
        print(f"note: the target also holds {len(done['others'])} file(s) not in this release, "
              f"e.g. {done['others'][0]}")  # fmt: skip
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from datagen.inspection import default_png, find_sample, render_tracks, summary, write_png

    sample = find_sample(args.dataset, args.key)
    print(summary(sample))
    png = args.png or default_png(sample["key"])
    write_png(png, render_tracks(sample))
    print(f"tracks drawn over frames: {png}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    import json

    from datagen.calibrate import calibrate, format_report
    from datagen.config import parse_overrides
    from datagen.sources.procedural import synthetic_config
    from datagen.track.registry import make_tracker

    settings: dict = {}
    for section, values in parse_overrides(args.set).items():
        if section != "tracker":
            raise UserError(f"--set {section}.*: calibrate takes tracker.SETTING=VALUE only")
        for k, v in values.items():
            try:
                settings[k] = json.loads(v)
            except json.JSONDecodeError:
                settings[k] = v
    try:
        make_tracker(args.tracker, **settings)
    except (ValueError, TypeError) as exc:
        raise UserError(f"--tracker {args.tracker}: {exc}") from None
    if args.videos <= 0:
        raise UserError(f"--videos must be positive, got {args.videos}")
    if args.json is not None and not args.json.parent.is_dir():
        raise UserError(f"--json {args.json}: folder {args.json.parent} does not exist")
    names = ("busy", "smooth") if args.scenes == "both" else (args.scenes,)
    base: dict = {}
    if args.preset is not None:
        from datagen.presets import preset

        base = dict(preset(args.preset).source.synthetic)
    reports = {}
    for name in names:
        scenes = synthetic_config({**base, "texture": "smooth"} if name == "smooth" else base)
        reports[name] = calibrate(
            args.tracker, settings, num_videos=args.videos, synthetic=scenes, seed=args.seed
        )
        print(f"== {name} textures ==")
        print(format_report(reports[name]))
    if args.json is not None:
        body = reports[names[0]] if len(names) == 1 else {"sets": reports}
        args.json.write_text(json.dumps(body, indent=1, sort_keys=True) + "\n")
        print(f"report: {args.json}")
    return 0


def cmd_analyse(args: argparse.Namespace) -> int:
    import json

    from datagen.analysis.matching import analyse_dataset

    if args.json is not None and not args.json.parent.is_dir():
        raise UserError(f"--json {args.json}: folder {args.json.parent} does not exist")
    if args.report is not None:
        _check_report_folder(args.report)
    if not (math.isfinite(args.threshold_px) and args.threshold_px > 0):
        raise UserError(f"--threshold-px {args.threshold_px}: must be a positive number of pixels")
    if args.examples < 0:
        raise UserError(f"--examples {args.examples}: must be 0 or more")
    try:
        table = analyse_dataset(args.dataset, kept_only=not args.all_tracks)
    except ValueError as exc:
        raise UserError(f"{exc} (build with capture.corr_layers and capture.corr_steps)") from None
    which = "all tracks" if args.all_tracks else "tracks kept by quality control"
    print(
        f"matching accuracy of attention (argmax, frame 0 -> f) against {which} "
        "(correct / counted: points visible on frame f that moved at least one token):"
    )
    print(table.markdown(counts=True))
    if args.json is not None:
        args.json.write_text(json.dumps(table.to_json(), indent=1) + "\n")
        print(f"report: {args.json}")
    if args.report is not None:
        from datagen.analysis.collect import StudyOptions
        from datagen.analysis.report import write_report

        opts = StudyOptions(
            reference_px=args.threshold_px,
            kept_only=not args.all_tracks,
            qk=not args.no_qk,
            examples=args.examples,
            pseudo=not args.no_retrack,
        )
        try:
            data = write_report(args.dataset, args.report, opts, rank_by=args.rank_by)
        except ValueError as exc:
            raise UserError(
                f"{exc} (build with capture.corr_layers and capture.corr_steps)"
            ) from None
        s = data["summary"]
        print(
            f"study: {s['videos_used']} videos, {s['points_used']} points; best layer "
            f"{s['best_layer']} (ranked by {data['settings']['rank_by']}); "
            f"report: {args.report / 'index.html'}"
        )
        for note in data["notes"]:
            print(f"note: {note}")
    return 0


def _check_report_folder(path: Path) -> None:
    """A report folder is new, empty, or an earlier report (its files are replaced)."""
    if path.exists() and not path.is_dir():
        raise UserError(f"--report {path}: is a file; pass a folder to create")
    if path.is_dir() and any(path.iterdir()) and not (path / "report.json").is_file():
        raise UserError(
            f"--report {path}: folder exists and holds no earlier report; pass a new folder"
        )
    if not path.parent.is_dir():
        raise UserError(f"--report {path}: folder {path.parent} does not exist")


def cmd_export(args: argparse.Namespace) -> int:
    from datagen.export import export_dataset

    result = export_dataset(
        args.dataset,
        args.to,
        features=args.features,
        keys=args.key or None,
        overwrite=args.overwrite,
    )
    print(
        f"exported {result.samples} samples ({result.files} files, {human_bytes(result.bytes)}) "
        f"-> {result.path}"
    )
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="datagen",
        description="Generate video-DiT correspondence datasets as WebDataset shards.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    b = sub.add_parser("build", help="turn a prompt bank into validated, sharded data")
    b.add_argument(
        "--prompts",
        type=Path,
        help="prompt file or folder (.txt, .jsonl, .csv); needed for text-to-video",
    )
    b.add_argument("--out", type=Path, required=True, help="dataset folder to write")
    b.add_argument(
        "--source",
        nargs="+",
        metavar="KIND",
        help="text-to-video (default: the model, from --prompts), synthetic (procedural "
        "videos with exact tracks) or 'videos DIR' (existing video files); with capture on, "
        "synthetic and video files get q/k from one forward at noised latents",
    )
    b.add_argument(
        "--preset",
        default="tiny",
        help="tiny (default: the trained tiny DiT), tiny-random, cogvideox-2b, cogvideox-5b",
    )
    b.add_argument("--config", type=Path, help="TOML or JSON file overriding the preset")
    b.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override one config field, e.g. generation.seed=7 (repeatable)",
    )
    b.add_argument("--limit", type=int, help="build only the first N samples of the plan")
    b.add_argument(
        "--dry-run", action="store_true", help="print the plan and size estimate, write nothing"
    )
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.add_argument(
        "--workers",
        type=int,
        default=1,
        help="local worker processes, each loading the model once (default 1: in this process)",
    )
    b.add_argument(
        "--executor",
        choices=("local", "ray"),
        default="local",
        help="local (this machine; see --workers) or ray (a Ray cluster; pip install -e '.[ray]')",
    )
    b.add_argument("--ray-address", help="attach to this Ray cluster (default: start a local one)")
    b.add_argument(
        "--ray-actors",
        type=int,
        help="Ray actors, each loading the model once (default: one a GPU, else 1)",
    )
    b.add_argument(
        "--max-retries",
        type=int,
        default=2,
        help="retries of a shard whose attempt failed or whose worker died (default 2)",
    )
    b.set_defaults(func=cmd_build)

    v = sub.add_parser("validate", help="check every shard against manifest and schemas")
    v.add_argument("dataset", type=Path)
    v.set_defaults(func=cmd_validate)

    r = sub.add_parser("release", help="a versioned, carded, checksummed release folder")
    r.add_argument("dataset", type=Path, help="build folder")
    r.add_argument("--name", help="dataset name (required unless --extends)")
    r.add_argument("--version", required=True, help="X.Y.Z")
    r.add_argument("--license", help="SPDX id, e.g. cc-by-4.0 (required unless --extends)")
    r.add_argument("--out", type=Path, required=True, help="release folder to create")
    r.add_argument("--prompts", type=Path, help="the prompt bank the build used (included)")
    r.add_argument(
        "--features",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="include the q/k feature shards (default) or not",
    )
    r.add_argument(
        "--calibration",
        type=Path,
        help="a `datagen calibrate --json` report of the build's tracker: its figures go in "
        "the card and stats/calibration.json",
    )
    r.add_argument(
        "--extends",
        type=Path,
        help="an earlier release folder: the new release holds its shards and the build's "
        "(renumbered after them), with both versions in the card and changelog",
    )
    r.set_defaults(func=cmd_release)

    pb = sub.add_parser(
        "publish", help="copy a verified release to the Hugging Face Hub or a file system URL"
    )
    pb.add_argument("release", type=Path)
    pb.add_argument(
        "--to",
        required=True,
        help="hf://datasets/ORG/NAME, or a file://, s3://, gs:// ... (fsspec) URL",
    )
    pb.add_argument("--dry-run", action="store_true", help="list what would be sent, send nothing")
    pb.add_argument("--revision", help="hf:// only: the branch to publish to (created if missing)")
    pb.add_argument("--private", action="store_true", help="hf:// only: create the repo private")
    pb.set_defaults(func=cmd_publish)

    f = sub.add_parser("verify", help="check a release (or build) folder: sums, card, samples")
    f.add_argument("path", type=Path)
    f.add_argument("--quick", action="store_true", help="checksums and counts only")
    f.set_defaults(func=cmd_verify)

    c = sub.add_parser(
        "calibrate",
        help="score a tracker and quality control against exact ground truth (synthetic set)",
    )
    c.add_argument(
        "--tracker",
        default="lk_recover",
        help="lk_recover (default; the tiny preset's with tracker.win_size=9), lk, dis, "
        "cotracker3_offline, ...",
    )
    c.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="tracker.SETTING=VALUE",
        help="tracker setting, e.g. tracker.win_size=7 (repeatable)",
    )
    c.add_argument("--videos", type=int, default=8, help="synthetic videos (default 8)")
    c.add_argument(
        "--seed",
        type=int,
        default=1000,
        help="first video seed (default 1000, held out from tests and tuning)",
    )
    c.add_argument(
        "--scenes",
        choices=("busy", "smooth", "both"),
        default="both",
        help="calibration set: busy (detailed textures), smooth (8x longer texture "
        "wavelengths), or both (default)",
    )
    c.add_argument(
        "--preset",
        help="calibrate on this preset's synthetic scenes (e.g. tiny: its model's training "
        "distribution, 8 frames at 32x32) instead of the default 24 frames at 96x128",
    )
    c.add_argument("--json", type=Path, help="also write the full report as JSON")
    c.set_defaults(func=cmd_calibrate)

    a = sub.add_parser(
        "analyse",
        help="matching accuracy of each captured layer x step against the tracks; with "
        "--report, the whole study (ranking, zero-shot tracking, figures, HTML)",
    )
    a.add_argument("dataset", type=Path)
    a.add_argument("--all-tracks", action="store_true", help="not only the QC-kept tracks")
    a.add_argument("--json", type=Path, help="also write the table as JSON")
    a.add_argument(
        "--report",
        type=Path,
        metavar="R",
        help="write the study to folder R: index.html, report.json, CSV tables, figures",
    )
    a.add_argument(
        "--threshold-px",
        type=float,
        default=8.0,
        help="matching threshold in pixels at 480x720, scaled to the build (default 8, the "
        "paper's)",
    )
    a.add_argument(
        "--rank-by",
        choices=("px", "token"),
        default="px",
        help="accuracy in the layer ranking: within the pixel threshold (default, the paper's) "
        "or within one token",
    )
    a.add_argument("--no-qk", action="store_true", help="do not read the stored q/k")
    a.add_argument("--examples", type=int, default=3, help="videos drawn with tracks (default 3)")
    a.add_argument(
        "--no-retrack",
        action="store_true",
        help="for videos with exact tracks (--source synthetic), do not also label them with "
        "the build's tracker and score zero-shot tracking against those pseudo labels",
    )
    a.set_defaults(func=cmd_analyse)

    e = sub.add_parser("export", help="write a dataset as plain files: one folder per key")
    e.add_argument("dataset", help="dataset folder, manifest, shard glob or URL")
    e.add_argument("--to", type=Path, required=True, help="folder to create")
    e.add_argument("--features", action="store_true", help="also write the q/k feature arrays")
    e.add_argument("--key", action="append", default=[], help="only this key (repeatable)")
    e.add_argument("--overwrite", action="store_true", help="replace an earlier export in --to")
    e.set_defaults(func=cmd_export)

    i = sub.add_parser("inspect", help="summarise a sample and draw its tracks to a PNG")
    i.add_argument("dataset", type=Path)
    i.add_argument("--key", help="sample key (default: the first sample)")
    i.add_argument("--png", type=Path, help="where to write the PNG (default: KEY.png)")
    i.set_defaults(func=cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = make_parser().parse_args(argv)
        return args.func(args)
    except UserError as exc:
        print(f"datagen: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("datagen: interrupted; committed shards are kept, rerun to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
