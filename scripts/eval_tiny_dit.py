"""Matching accuracy of the shipped tiny DiT: the README's tables.

    python scripts/eval_tiny_dit.py [--videos 64] [--generated 64] [--json PATH]

1. Held-out procedural videos with exact tracks (seeds EVAL_SEED_BASE + i, never trained on):
   accuracy per layer x timestep of the shipped weights, of the same architecture at random
   init, of the pixel-patch baseline and of "no motion" (definitions in
   datagen/analysis/matching.py), from one forward at latents noised to each timestep.
2. The model's own generated videos (the default build, prompt bank order) against the tracker's
   pseudo-labels (QC-kept tracks), from the correspondence captured during generation at every
   layer and step.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from datagen.analysis.matching import analyse_dataset
from datagen.build import prepare_build, run_build
from datagen.models import tiny_dit
from datagen.presets import resolve_config
from datagen.sources.synthetic import render_synthetic_video

ROOT = Path(__file__).resolve().parents[1]


def held_out(num_videos: int, timesteps: list[int]):
    from diffusers import DiffusionPipeline

    import datagen.models.pixel_vae  # noqa: F401

    pipe = DiffusionPipeline.from_pretrained(str(tiny_dit.SHIPPED_DIR), dtype=torch.float32)
    random_init = tiny_dit.build_pipeline(seed=0).transformer.eval()
    seeds = [tiny_dit.EVAL_SEED_BASE + i for i in range(num_videos)]
    videos = [render_synthetic_video(tiny_dit.TRAIN_VIDEO, s) for s in seeds]
    captions = [tiny_dit.caption(tiny_dit.TRAIN_VIDEO, s) for s in seeds]
    emb = tiny_dit.encode_captions(pipe, captions)
    return tiny_dit.evaluate_matching(
        {"trained": pipe.transformer.eval(), "random init": random_init},
        videos,
        emb,
        pipe.scheduler,
        timesteps,
    )


def generated(num_videos: int):
    layers = list(range(tiny_dit.TRANSFORMER_CONFIG["num_layers"]))
    cfg = resolve_config(
        "tiny",
        None,
        [
            f"capture.corr_layers={json.dumps(layers)}",
            "capture.corr_steps=[0,2,4,5]",
            "capture.feature_layers=[]",
        ],
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ds"
        run_build(prepare_build(cfg, ROOT / "prompts", out, limit=num_videos), progress=False)
        return analyse_dataset(out), analyse_dataset(out, kept_only=False)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--videos", type=int, default=64)
    p.add_argument("--generated", type=int, default=64)
    p.add_argument("--timesteps", type=int, nargs="+", default=[100, 300, 500, 800])
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    t0 = time.time()
    table = held_out(args.videos, args.timesteps)
    print(f"held-out procedural videos ({args.videos}), exact tracks, moving points:")
    print(table.markdown())
    print(f"({time.time() - t0:.0f} s)\n")
    report = {"held_out": table.to_json(), "videos": args.videos}
    if args.generated:
        t0 = time.time()
        kept, every = generated(args.generated)
        print(f"the model's own videos ({args.generated} prompts), LK pseudo-labels kept by QC:")
        print(kept.markdown(counts=True))
        print("\nsame, all tracks:")
        print(every.markdown(counts=True))
        print(f"({time.time() - t0:.0f} s)")
        report["generated_kept"] = kept.to_json()
        report["generated_all"] = every.to_json()
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
