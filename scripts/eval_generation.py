"""Are the embedded model's videos worth labelling? The README's generation table.

    python scripts/eval_generation.py [--bank 250] [--captions 64] [--videos 64] [--json PATH]

Everything goes through real builds (`prepare_build` / `run_build`, the tiny preset, its
tracker and quality control, ``qc.rejected=keep`` so every verdict is read back):

1. **default bank**: the first ``--bank`` prompts of ``prompts/`` (250: the README's first
   command); wall time of that build too.
2. **held-out captions**: captions in the model's own words (``tiny_dit.caption`` of held-out
   procedural seeds ``EVAL_SEED_BASE + i``, never trained on), as a prompt bank.
3. **training distribution**: the procedural videos of those same held-out seeds, written as
   mp4 files and labelled by ``--source videos`` (the same tracker and QC): the baseline.

Reported per set: QC acceptance (share of samples QC accepts) and visible fraction (share of
point-frames the tracker marks visible), and their ratios to the baseline. Prompt following on
the held-out captions: the camera pan measured from the tracks (minus the median displacement
of the points visible in the first and last frame: most points lie on the background) agrees
with every axis the caption names ('camera pans up left': y < 0 and x < 0; captions that say
'slowly' are not counted); and each colour the caption names is present in frame 0 (at least
``COLOUR_MIN_PIXELS`` pixels of that colour word). Attention: matching accuracy on held-out
videos with exact tracks (one forward at latents noised to t), trained against random init and
the pixel-patch baseline.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from datagen.build import prepare_build, run_build
from datagen.data import open_dataset
from datagen.models import tiny_dit
from datagen.presets import resolve_config
from datagen.sources.synthetic import render_synthetic_video
from datagen.video import encode_video

ROOT = Path(__file__).resolve().parents[1]
COLOUR_MIN_PIXELS = 12
AXES = {"left": (0, -1), "right": (0, 1), "up": (1, -1), "down": (1, 1)}


def pan_words(caption: str) -> list[str]:
    """The direction words of a caption's 'camera pans ...' clause."""
    if "camera pans" not in caption:
        return []
    clause = caption.rsplit("camera pans", 1)[-1]
    return [w for w in clause.replace(",", " ").split() if w in AXES]


def measured_camera_motion(tracks: np.ndarray, visible: np.ndarray) -> np.ndarray | None:
    """Camera motion (x, y) in px over the video: minus the median displacement, first to
    last frame, of the points visible in both (None when no point is)."""
    both = visible[:, 0] & visible[:, -1]
    if not both.any():
        return None
    return -np.median(tracks[both, -1] - tracks[both, 0], axis=0)


def pan_agrees(words: list[str], motion: np.ndarray | None) -> bool:
    if motion is None:
        return False
    return all(np.sign(motion[AXES[w][0]]) == AXES[w][1] for w in words)


def colours_present(caption: str, frame0: np.ndarray) -> tuple[int, int]:
    """(named colours present in frame 0, named colours)."""
    names = {c for c, _ in tiny_dit.named_objects(caption)}
    words = np.array([tiny_dit.colour_word(p) for p in frame0.reshape(-1, 3)])
    present = sum(int((words == c).sum() >= COLOUR_MIN_PIXELS) for c in names)
    return present, len(names)


MODEL_OVERRIDES: list[str] = []
"""``model.model_id=DIR`` when ``--model`` names another pipeline folder (a training run's),
and ``--set`` overrides of the generation settings, for the two generated sets."""


def build(out: Path, prompts: Path | None, limit: int | None, *overrides: str) -> float:
    cfg = resolve_config("tiny", None, ["qc.rejected=keep", *MODEL_OVERRIDES, *overrides])
    t0 = time.perf_counter()
    run_build(prepare_build(cfg, prompts, out, limit=limit), progress=False)
    return time.perf_counter() - t0


def label_stats(folder: Path) -> dict[str, Any]:
    """QC acceptance, visible fraction and per-sample records of a build."""
    records = []
    for s in open_dataset(folder, video=True, fields=["tracks", "visible", "meta"]):
        meta = s["meta"]
        records.append(
            {
                "key": meta["key"],
                "prompt": meta["prompt"]["text"],
                "accepted": meta["qc"]["verdict"] == "accepted",
                "visible": s["visible"],
                "tracks": s["tracks"],
                "frame0": s["frames"][0],
            }
        )
    vis = np.concatenate([r["visible"].ravel() for r in records]) if records else np.zeros(0)
    return {
        "samples": len(records),
        "qc_acceptance": float(np.mean([r["accepted"] for r in records])) if records else 0.0,
        "visible_fraction": float(vis.mean()) if vis.size else 0.0,
        "records": records,
    }


def prompt_following(records: list[dict[str, Any]]) -> dict[str, Any]:
    pans = [
        pan_agrees(w, measured_camera_motion(r["tracks"], r["visible"]))
        for r in records
        if (w := pan_words(r["prompt"]))
    ]
    present = named = 0
    for r in records:
        p, n = colours_present(r["prompt"], r["frame0"])
        present, named = present + p, named + n
    return {
        "pan_agreement": float(np.mean(pans)) if pans else None,
        "pan_videos": len(pans),
        "colour_presence": present / named if named else None,
        "colours_named": named,
    }


def matching(num_videos: int, timesteps: list[int], folder: Path) -> dict[str, Any]:
    from diffusers import DiffusionPipeline

    import datagen.models.pixel_vae  # noqa: F401

    pipe = DiffusionPipeline.from_pretrained(str(folder))
    random_init = tiny_dit.build_pipeline(seed=0).transformer.eval()
    seeds = [tiny_dit.EVAL_SEED_BASE + i for i in range(num_videos)]
    videos = [render_synthetic_video(tiny_dit.TRAIN_VIDEO, s) for s in seeds]
    emb = tiny_dit.encode_captions(pipe, [tiny_dit.caption(tiny_dit.TRAIN_VIDEO, s) for s in seeds])
    table = tiny_dit.evaluate_matching(
        {"trained": pipe.transformer.float().eval(), "random init": random_init},
        videos,
        emb,
        pipe.scheduler,
        timesteps,
    )
    acc = table.to_json()["accuracy"]

    def best(prefix: str) -> tuple[float, str, str]:
        return max(
            (v, row, t)
            for row, cells in acc.items()
            if row.startswith(prefix)
            for t, v in cells.items()
        )

    trained, row, t = best("trained")
    return {
        "table": table.to_json(),
        "markdown": table.markdown(),
        "best": {"row": row, "t": t, "accuracy": trained},
        "random_init_best": best("random init")[0],
        "pixel_at_best_t": acc["pixel patches"][t],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--bank", type=int, default=250, help="prompts of the default bank")
    p.add_argument("--captions", type=int, default=64, help="held-out in-vocabulary captions")
    p.add_argument("--videos", type=int, default=64, help="held-out videos for matching (0: skip)")
    p.add_argument("--timesteps", type=int, nargs="+", default=[100, 300, 500, 800])
    p.add_argument("--model", type=Path, help="pipeline folder (default: the shipped model)")
    p.add_argument("--json", type=Path)
    p.add_argument("--keep", type=Path, help="keep the three builds in this new folder")
    p.add_argument(
        "--set", action="append", default=[], metavar="generation.FIELD=VALUE",
        help="generation setting for the generated sets, e.g. generation.guidance_scale=1",
    )  # fmt: skip
    args = p.parse_args(argv)
    MODEL_OVERRIDES[:] = list(args.set)
    if args.model is not None:
        MODEL_OVERRIDES.append(f"model.model_id={args.model.resolve()}")
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="datagen-eval-") as tmp:
        tmp_path = Path(tmp) if args.keep is None else args.keep
        if args.keep is not None and args.keep.exists():
            raise SystemExit(f"--keep {args.keep}: exists; name a new folder")
        tmp_path.mkdir(parents=True, exist_ok=True)
        seeds = [tiny_dit.EVAL_SEED_BASE + i for i in range(args.captions)]
        captions = [tiny_dit.caption(tiny_dit.TRAIN_VIDEO, s) for s in seeds]
        bank = tmp_path / "captions.jsonl"
        bank.write_text(
            "".join(
                json.dumps({"id": f"c{s}", "prompt": c}) + "\n"
                for s, c in zip(seeds, captions, strict=True)
            )
        )
        videos = tmp_path / "videos"
        videos.mkdir()
        cfg = resolve_config("tiny")
        for s in seeds:
            frames = render_synthetic_video(tiny_dit.TRAIN_VIDEO, s).frames
            (videos / f"v{s}.mp4").write_bytes(encode_video(frames, cfg.generation.fps, cfg.video))
            (videos / f"v{s}.txt").write_text(tiny_dit.caption(tiny_dit.TRAIN_VIDEO, s))
        no_capture = ("capture.corr_layers=[]", "capture.feature_layers=[]")
        secs = build(tmp_path / "bank", ROOT / "prompts", args.bank)
        sets = {"default bank": label_stats(tmp_path / "bank")}
        build(tmp_path / "captions", bank, None)
        sets["held-out captions"] = label_stats(tmp_path / "captions")
        build(
            tmp_path / "train",
            None,
            None,
            "source.kind=videos",
            f"source.videos_dir={videos}",
            *no_capture,
        )
        base = label_stats(tmp_path / "train")
        sets["training distribution"] = base
    for name, st in sets.items():
        report[name] = {k: v for k, v in st.items() if k != "records"} | {
            "qc_ratio": st["qc_acceptance"] / base["qc_acceptance"]
            if base["qc_acceptance"]
            else None,
            "visible_ratio": st["visible_fraction"] / base["visible_fraction"]
            if base["visible_fraction"]
            else None,
        }
    report["default bank"]["build_seconds"] = secs
    report["prompt following"] = prompt_following(sets["held-out captions"]["records"])
    report["prompt following (training distribution)"] = prompt_following(base["records"])
    print("| set | samples | QC acceptance | visible fraction | QC ratio | visible ratio |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in sets:
        r = report[name]
        print(
            f"| {name} | {r['samples']} | {r['qc_acceptance']:.1%} | {r['visible_fraction']:.1%} "
            f"| {r['qc_ratio']:.2f} | {r['visible_ratio']:.2f} |"
        )
    print(f"\ndefault-bank build ({args.bank} prompts): {secs:.0f} s")
    for name in ("prompt following", "prompt following (training distribution)"):
        f = report[name]
        print(
            f"{name}: camera pan agrees in {f['pan_agreement']:.1%} of {f['pan_videos']} videos; "
            f"named colours present in frame 0: {f['colour_presence']:.1%} of {f['colours_named']}"
        )
    if args.videos:
        m = matching(args.videos, args.timesteps, args.model or tiny_dit.SHIPPED_DIR)
        print(f"\nmatching accuracy, {args.videos} held-out videos with exact tracks:")
        print(m["markdown"])
        print(
            f"best: {m['best']['row']} at t={m['best']['t']}: {m['best']['accuracy']:.1%} "
            f"(random init best {m['random_init_best']:.1%}, pixel patches "
            f"{m['pixel_at_best_t']:.1%})"
        )
        report["matching"] = {k: v for k, v in m.items() if k != "markdown"}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
