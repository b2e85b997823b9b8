"""Train the embedded tiny video DiT on the project's procedural videos.

    python scripts/train_tiny_dit.py --out runs/tiny-dit --minutes 60
    python scripts/train_tiny_dit.py --out runs/tiny-dit \
        --export datagen/models/weights/tiny-cogvideox

Reproducible: seeded data (training videos are procedural-source seeds TRAIN_SEED_BASE + i,
evaluation videos EVAL_SEED_BASE + i, so evaluation is held out), seeded init, noise and
batches; the resolved config of the first leg is written to ``OUT/config.json`` and every
leg's arguments are appended to ``OUT/legs.jsonl``; every step's loss goes to
``OUT/log.jsonl`` and each evaluation to ``OUT/eval.jsonl``. Resumable: ``OUT/checkpoint.pt``
(model, EMA, optimiser, RNG states, step) is written atomically every ``--checkpoint-every``
steps and at the end; running the same command again continues from it. Stops at ``--steps``
or after ``--minutes`` of wall time, whichever comes first.

Objective: image-to-video as CogVideoX-I2V trains it: the clean first frame is concatenated to
the noisy video along channels (zeros for later frames), v-prediction on the cosine DDPM
schedule of the shipped scheduler, AdamW with warm-up, EMA of the weights (the EMA is what
ships). Timesteps: a ``--schedule-share`` of them near the preset's DDIM steps (where the
sampler queries the model), the rest half uniform over [0, 1000) and half over
[0, --focus-t) (1000: uniform); captions are dropped 10% of the time so classifier-free
guidance works.
``--init-from DIR`` starts from another tiny pipeline folder's transformer (weights for input
channels it lacks start at zero, so the start model ignores the first frame exactly).
``--export DIR`` writes the EMA weights as a diffusers pipeline folder with an fp16
transformer, the folder the ``tiny`` preset loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from datagen.models import tiny_dit
from datagen.sources.synthetic import render_synthetic_video


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="run folder (config, logs, checkpoint)")
    p.add_argument("--steps", type=int, default=4000, help="length of the LR schedule")
    p.add_argument("--stop-at", type=int, help="stop this leg at this step (schedule unchanged)")
    p.add_argument(
        "--video",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a field of the training distribution tiny_dit.TRAIN_VIDEO for this run "
        "(JSON value), e.g. --video texture_scale=1",
    )
    p.add_argument("--minutes", type=float, default=60.0, help="wall-time budget")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--pool", type=int, default=8192, help="training videos rendered up front")
    p.add_argument("--focus-t", type=int, default=1000)
    p.add_argument(
        "--high-t-share",
        type=float,
        default=0.0,
        help="share of each batch drawn uniformly from [--high-t-from, 1000): where the first "
        "sampling steps decide the motion, which only the caption can tell",
    )
    p.add_argument("--high-t-from", type=int, default=700)
    p.add_argument(
        "--init-from", type=Path, help="pipeline folder whose transformer starts the run"
    )
    p.add_argument("--cfg-drop", type=float, default=0.1)
    p.add_argument(
        "--junk-share",
        type=float,
        default=0.0,
        help="share of captions replaced by words the model is not taught (random tokenizer "
        "words outside its captions and spelled-out letter strings), trained like the empty "
        "prompt: natural prompts then condition it like no caption rather than like nothing "
        "it has seen",
    )
    p.add_argument(
        "--junk-insert",
        type=float,
        default=0.0,
        help="share of captions with such words inserted around their clauses (the caption's "
        "words still hold: a natural prompt's colours and pan still count)",
    )
    p.add_argument(
        "--schedule-share",
        type=float,
        default=0.5,
        help="share of timesteps drawn near the preset's DDIM steps (the rest: --focus-t rule)",
    )
    p.add_argument("--schedule-steps", type=int, default=6, help="DDIM steps of the preset")
    p.add_argument("--schedule-jitter", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-videos", type=int, default=48)
    p.add_argument("--eval-t", type=int, nargs="+", default=[100, 300, 500, 800])
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument(
        "--device",
        default="cpu",
        help="where the model trains (cpu, cuda, cuda:1 ...); the video pool, the random "
        "streams and evaluation stay on the CPU, so a run's batches are the same on any device",
    )
    p.add_argument("--export", type=Path, help="write the EMA weights as a pipeline folder")
    args = p.parse_args(argv)
    for name in ("cfg_drop", "junk_share", "junk_insert", "high_t_share", "schedule_share"):
        value = getattr(args, name)
        if not 0.0 <= value <= 1.0:
            p.error(f"--{name.replace('_', '-')} {value}: a share of each batch, from 0 to 1")
    return args


def training_video(overrides: list[str]):
    """tiny_dit.TRAIN_VIDEO with ``FIELD=VALUE`` overrides (JSON values; lists as tuples)."""
    changes = {}
    for item in overrides:
        name, sep, value = item.partition("=")
        if not sep or name not in {f.name for f in dataclasses.fields(tiny_dit.TRAIN_VIDEO)}:
            raise SystemExit(f"--video {item!r}: expected FIELD=VALUE with a SyntheticConfig field")
        v = json.loads(value)
        changes[name] = tuple(v) if isinstance(v, list) else v
    return dataclasses.replace(tiny_dit.TRAIN_VIDEO, **changes)


def render_pool(n: int, base: int, video) -> tuple[np.ndarray, list[str]]:
    frames = np.empty((n, tiny_dit.FRAMES, tiny_dit.HEIGHT, tiny_dit.WIDTH, 3), np.uint8)
    captions = []
    for i in range(n):
        frames[i] = render_synthetic_video(video, base + i).frames
        captions.append(tiny_dit.caption(video, base + i))
    return frames, captions


def load_pool(out: Path, n: int, video) -> tuple[np.ndarray, list[str]]:
    """Render the training videos once and cache them beside the run."""
    import hashlib

    digest = hashlib.sha256(repr(video).encode()).hexdigest()[:8]
    cache = out / f"pool-{n}-{digest}.npz"
    if cache.exists():
        data = np.load(cache, allow_pickle=False)
        return data["frames"], [str(c) for c in data["captions"]]
    frames, captions = render_pool(n, tiny_dit.TRAIN_SEED_BASE, video)
    tmp = out / f"pool-{n}-{digest}.tmp.npz"
    np.savez(tmp, frames=frames, captions=np.array(captions))
    os.replace(tmp, cache)
    return frames, captions


def _uncaptioned_words() -> list[str]:
    """The tokenizer's whole words that no caption uses, in vocabulary order."""
    from datagen.models.tiny_cogvideox import _WORDS

    return [w for w in dict.fromkeys(_WORDS) if w not in tiny_dit.CAPTION_WORDS]


def junk_words(rng: np.random.Generator, n: int, known: list[str] | None = None) -> list[str]:
    """``n`` words the captions never use: tokenizer words outside them (``known``, default
    :func:`_uncaptioned_words`), or random letter strings (which the tokenizer spells out, as it
    does most words of natural prompts)."""
    known = _uncaptioned_words() if known is None else known
    out = []
    for _ in range(n):
        if rng.random() < 0.5:
            out.append(known[rng.integers(len(known))])
        else:
            word = "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(3, 9)))
            # A random string that happens to be a caption word ('red', 'box') is not junk.
            out.append(word + "q" if word in tiny_dit.CAPTION_WORDS else word)
    return out


def junk_captions(captions: list[str], seed: int, tokenizer) -> tuple[list[str], list[str]]:
    """(captions with junk words inserted around their clauses, pure junk texts), seeded.

    An inserted caption keeps all its own words within the text encoder's
    ``MAX_TEXT_LEN`` tokens (junk is drawn again, fewer words each time, until it fits), so the
    pan clause is never cut off; pure junk is any length (truncated like natural prompts)."""
    rng = np.random.default_rng(seed)
    known = _uncaptioned_words()

    def junk(most: int) -> list[str]:
        return junk_words(rng, int(rng.integers(0, most + 1)), known)

    inserted = []
    for c in captions:
        for most in (2, 2, 1, 1, 0):
            clauses = [" ".join(junk(most) + [clause]) for clause in c.split(", ")]
            text = (", ".join(clauses) + " " + " ".join(junk(most))).strip()
            if len(tokenizer(text).input_ids) <= tiny_dit.MAX_TEXT_LEN:
                break
        inserted.append(text)
    pure = [" ".join(junk_words(rng, int(rng.integers(4, 20)), known)) for _ in range(1024)]
    return inserted, pure


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def sample_timesteps(
    n: int,
    focus: int,
    gen: torch.Generator,
    schedule: torch.Tensor | None = None,
    share: float = 0.0,
    jitter: int = 0,
) -> torch.Tensor:
    """Half uniform over [0, 1000), half over [0, focus); then a ``share`` of them replaced by
    a step of ``schedule`` (the sampler's timesteps) plus uniform jitter of +-``jitter``."""
    uniform = torch.randint(0, 1000, (n,), generator=gen)
    focused = torch.randint(0, focus, (n,), generator=gen)
    pick = torch.rand(n, generator=gen) < 0.5
    t = torch.where(pick, focused, uniform)
    if schedule is not None and share > 0:
        near = schedule[torch.randint(0, len(schedule), (n,), generator=gen)]
        near = near + torch.randint(-jitter, jitter + 1, (n,), generator=gen)
        use = torch.rand(n, generator=gen) < share
        t = torch.where(use, near.clamp(0, 999), t)
    return t


def save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def init_from(model, folder: Path) -> None:
    """Load a tiny pipeline folder's transformer weights into ``model``; input channels the
    folder's patch embedding lacks get zero weights."""
    from safetensors.torch import load_file

    state = load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    own = model.state_dict()
    for name, value in state.items():
        value = value.float()
        if own[name].shape != value.shape:
            grown = torch.zeros_like(own[name])
            grown[:, : value.shape[1]] = value
            value = grown
        own[name] = value
    model.load_state_dict(own)


def export(ema_model, folder: Path) -> None:
    """EMA weights as a CogVideoXPipeline folder, transformer in fp16 safetensors."""
    import copy

    transformer = copy.deepcopy(ema_model).to("cpu", torch.float16).eval()
    pipe = tiny_dit.build_pipeline(transformer=transformer)
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(folder), safe_serialization=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out: Path = args.out
    video = training_video(args.video)
    out.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config.update(
        transformer=tiny_dit.TRANSFORMER_CONFIG,
        scheduler=tiny_dit.SCHEDULER_CONFIG,
        video={**tiny_dit.train_video_settings(), **dataclasses.asdict(video)},
        train_seed_base=tiny_dit.TRAIN_SEED_BASE,
        eval_seed_base=tiny_dit.EVAL_SEED_BASE,
        torch=torch.__version__,
    )
    if not (out / "config.json").exists():
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    with (out / "legs.jsonl").open("a") as legs:
        legs.write(json.dumps(config, sort_keys=True) + "\n")

    torch.manual_seed(args.seed)
    pipe = tiny_dit.build_pipeline(seed=args.seed)
    device = torch.device(args.device)
    model = pipe.transformer.train()
    if args.init_from is not None:
        init_from(model, args.init_from)
    model.to(device)
    ema = tiny_dit.build_pipeline(seed=args.seed).transformer.eval().to(device)
    ema.load_state_dict(model.state_dict())
    for p in ema.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(
        model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.99)
    )
    scheduler = pipe.scheduler
    gen = torch.Generator().manual_seed(args.seed + 1)
    step = 0
    elapsed_before = 0.0
    ckpt = out / "checkpoint.pt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True, map_location=device)  # tensors, numbers
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"].cpu())
        step = state["step"]
        elapsed_before = state["elapsed"]
        print(f"resumed at step {step} ({elapsed_before / 60:.1f} min trained)", flush=True)

    t0 = time.time()
    frames, captions = load_pool(out, args.pool, video)
    print(f"pool: {len(frames)} videos ready in {time.time() - t0:.1f}s", flush=True)
    t0 = time.time()

    def encode(texts: list[str]) -> torch.Tensor:
        return torch.cat(
            [tiny_dit.encode_captions(pipe, texts[i : i + 512]) for i in range(0, len(texts), 512)]
        )

    caption_emb = encode(captions)
    empty_emb = tiny_dit.encode_captions(pipe, [""])[0]
    if args.junk_share > 0 or args.junk_insert > 0:
        inserted, pure = junk_captions(captions, args.seed + 7, pipe.tokenizer)
        inserted_emb = encode(inserted)
        junk_emb = encode(pure)
        print(f"junk examples: {inserted[0]!r} / {pure[0]!r}", flush=True)
    print(f"captions encoded in {time.time() - t0:.1f}s", flush=True)

    eval_seeds = [tiny_dit.EVAL_SEED_BASE + i for i in range(args.eval_videos)]
    eval_videos = [render_synthetic_video(video, s) for s in eval_seeds]
    eval_emb = tiny_dit.encode_captions(pipe, [tiny_dit.caption(video, s) for s in eval_seeds])

    def evaluate(models: dict) -> dict:
        import copy

        on_cpu = {k: copy.deepcopy(m).cpu() for k, m in models.items()}  # evaluation is CPU code
        table = tiny_dit.evaluate_matching(on_cpu, eval_videos, eval_emb, scheduler, args.eval_t)
        return table.to_json()

    log = (out / "log.jsonl").open("a")
    evlog = (out / "eval.jsonl").open("a")
    if step == 0:
        baseline = evaluate({"random": ema})
        evlog.write(json.dumps({"step": 0, **baseline}) + "\n")
        evlog.flush()

    def checkpoint_state(step: int, elapsed: float) -> dict:
        return dict(
            model=model.state_dict(),
            ema=ema.state_dict(),
            opt=opt.state_dict(),
            gen=gen.get_state(),
            step=step,
            elapsed=elapsed,
        )

    scheduler.set_timesteps(args.schedule_steps)
    schedule = scheduler.timesteps.clone().long()
    t_start = time.time()
    budget = args.minutes * 60.0
    alphas = scheduler.alphas_cumprod
    stop = min(args.steps, args.stop_at) if args.stop_at else args.steps
    while step < stop and elapsed_before + (time.time() - t_start) < budget:
        idx = torch.randint(0, len(frames), (args.batch,), generator=gen)
        x0 = tiny_dit.frames_to_latents(frames[idx.numpy()])
        emb = caption_emb[idx].clone()
        if args.junk_insert > 0:
            ins = torch.rand(args.batch, generator=gen) < args.junk_insert
            emb[ins] = inserted_emb[idx[ins]]
        drop = torch.rand(args.batch, generator=gen) < args.cfg_drop
        emb[drop] = empty_emb
        if args.junk_share > 0:
            junk = (torch.rand(args.batch, generator=gen) < args.junk_share) & ~drop
            pick = torch.randint(0, len(junk_emb), (args.batch,), generator=gen)
            emb[junk] = junk_emb[pick[junk]]
        t = sample_timesteps(
            args.batch, args.focus_t, gen, schedule, args.schedule_share, args.schedule_jitter
        )
        if args.high_t_share > 0:
            high = torch.randint(args.high_t_from, 1000, (args.batch,), generator=gen)
            t = torch.where(torch.rand(args.batch, generator=gen) < args.high_t_share, high, t)
        noise = torch.randn(x0.shape, generator=gen)
        a = alphas[t].float().view(-1, 1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = a.sqrt() * noise - (1 - a).sqrt() * x0  # v
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        xin = tiny_dit.with_first_frame(xt, x0)
        xin, emb, target = xin.to(device), emb.to(device), target.to(device)
        pred = model(
            hidden_states=xin, encoder_hidden_states=emb, timestep=t.to(device), return_dict=False
        )[0]
        loss = torch.nn.functional.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
                pe.lerp_(pm, 1 - decay)
        step += 1
        elapsed = elapsed_before + time.time() - t_start
        log.write(
            json.dumps(
                {
                    "step": step,
                    "loss": round(loss.item(), 5),
                    "grad_norm": round(float(gnorm), 4),
                    "lr": lr_at(step - 1, args),
                    "elapsed_s": round(elapsed, 1),
                }
            )
            + "\n"
        )
        if step % 25 == 0:
            log.flush()
            print(f"step {step} loss {loss.item():.4f} {elapsed / 60:.1f} min", flush=True)
        if step % args.checkpoint_every == 0 or step == args.steps:
            save_checkpoint(ckpt, checkpoint_state(step, elapsed))
        if step % args.eval_every == 0:
            res = evaluate({"ema": ema})
            evlog.write(json.dumps({"step": step, **res}) + "\n")
            evlog.flush()
            best = max(
                (v["100"] if "100" in v else max(v.values()), k)
                for k, v in res["accuracy"].items()
                if k.startswith("ema")
            )
            print(f"eval step {step}: best {best}", flush=True)
    elapsed = elapsed_before + time.time() - t_start
    save_checkpoint(ckpt, checkpoint_state(step, elapsed))
    log.close()
    evlog.close()
    print(f"stopped at step {step} after {elapsed / 60:.1f} min", flush=True)
    if args.export:
        export(ema, args.export)
        print(f"exported to {args.export}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
