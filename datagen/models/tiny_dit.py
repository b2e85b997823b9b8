"""The embedded trained model: a tiny CogVideoX-class image-to-video DiT trained by
``scripts/train_tiny_dit.py``.

Same diffusers classes as CogVideoX-5B-I2V (``CogVideoXTransformer3DModel``, here with sin-cos
position embedding, ``CogVideoXDDIMScheduler``, T5 text encoder,
``CogVideoXImageToVideoPipeline``), sized for a CPU: 6 layers, 4 heads x 32 dims, patch 4,
working directly on 8-frame 32x32 RGB videos through
:class:`datagen.models.pixel_vae.PixelSpaceVAE` (8 x 8 x 8 = 512 video tokens, no latent
compression). As in CogVideoX-I2V, the first frame is concatenated to the noisy latents along
channels (zeros for the later frames), so the DiT generates the motion of a given first frame.

Where the first frame comes from: for the ``tiny`` preset, :func:`first_frame_for_prompt`
renders it with the procedural source (the training distribution), choosing among seeded scenes
the one whose sprites best match the colours and shapes the prompt names. The text (frozen tiny
random-weight T5 embeddings of captions naming each sprite's colour and shape and the camera
pan) steers the pan; words outside the captions were trained to mean nothing, like the empty
prompt (README, "The embedded model", has the measurements).

The shipped weights live in ``datagen/models/weights/tiny-cogvideox`` as a diffusers pipeline
folder (fp16 safetensors) and load with ``DiffusionPipeline.from_pretrained`` like any checkpoint.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from datagen.models.tiny_spec import (  # noqa: F401  (re-exported)
    EVAL_SEED_BASE,
    FRAMES,
    HEIGHT,
    MAX_TEXT_LEN,
    PATCH,
    SCHEDULER_CONFIG,
    SHIPPED_DIR,
    TRAIN_SEED_BASE,
    TRAIN_VIDEO,
    TRANSFORMER_CONFIG,
    WIDTH,
    train_video_settings,
)
from datagen.sources.synthetic import SyntheticConfig, build_scene

_HUES = [
    (0.04, "red"),
    (0.11, "orange"),
    (0.19, "yellow"),
    (0.45, "green"),
    (0.70, "blue"),
    (0.83, "purple"),
    (0.95, "pink"),
    (1.01, "red"),
]


def colour_word(rgb: np.ndarray) -> str:
    r, g, b = (float(v) / 255.0 for v in rgb)
    mx, mn = max(r, g, b), min(r, g, b)
    if mx - mn < 0.12:
        return "gray"
    if mx == r:
        h = ((g - b) / (mx - mn)) % 6.0
    elif mx == g:
        h = (b - r) / (mx - mn) + 2.0
    else:
        h = (r - g) / (mx - mn) + 4.0
    h /= 6.0
    return next(word for edge, word in _HUES if h < edge)


def direction_words(dx: float, dy: float, still: float = 1.0) -> str:
    """Image-plane motion as words (y grows downwards): 'left', 'up right', 'slowly'..."""
    parts = []
    if abs(dy) >= still and abs(dy) >= 0.4 * abs(dx):
        parts.append("up" if dy < 0 else "down")
    if abs(dx) >= still and abs(dx) >= 0.4 * abs(dy):
        parts.append("left" if dx < 0 else "right")
    return " ".join(parts) if parts else "slowly"


def sprite_words(scene: Any) -> list[tuple[str, str]]:
    """(colour, noun) of each sprite of a scene, as its caption names them."""
    return [
        (
            colour_word(scene.textures[k + 1].base),
            "ball" if sp.shape in ("disc", "ellipse") else "box",
        )
        for k, sp in enumerate(scene.sprites)
    ]


def caption(config: SyntheticConfig, seed: int) -> str:
    """A prompt describing a procedural video in the tiny tokenizer's whole-word vocabulary:
    each sprite's colour and shape, then the camera pan ("red box, blue ball, green box,
    camera pans up left").

    The sprites' own directions are not named: the frozen random T5 gives a direction word
    nearly the same embedding whatever precedes it ("moves left" and "pans left" differ by an
    L2 norm of 0.66 where "left" and "right" differ by 6.6), so with sprite directions in the
    caption the DiT cannot tell which direction word is the camera's, and it learnt none.
    """
    scene = build_scene(config, seed)
    parts = [f"{colour} {noun}" for colour, noun in sprite_words(scene)]
    # world = image + offset: the offset growing in x means the camera moves right.
    last = scene.num_frames - 1
    o = scene.camera_offsets[last] - scene.camera_offsets[0]
    parts.append(f"camera pans {direction_words(o[0], o[1])}")
    return ", ".join(parts)


def build_pipeline(transformer: Any | None = None, seed: int = 0) -> Any:
    """A CogVideoXImageToVideoPipeline of the tiny trained architecture; random init (``seed``)
    when no transformer is given. The text encoder is the random tiny model's (fixed seed),
    frozen."""
    from diffusers import (
        CogVideoXDDIMScheduler,
        CogVideoXImageToVideoPipeline,
        CogVideoXTransformer3DModel,
    )

    from datagen.models.pixel_vae import PixelSpaceVAE
    from datagen.models.tiny_cogvideox import WEIGHT_SEED, tiny_text_encoder, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(WEIGHT_SEED)
        text_encoder = tiny_text_encoder(len(tokenizer))
        if transformer is None:
            torch.manual_seed(seed)
            transformer = CogVideoXTransformer3DModel(**TRANSFORMER_CONFIG)
    finally:
        torch.random.set_rng_state(state)
    return CogVideoXImageToVideoPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder.eval(),
        vae=PixelSpaceVAE().eval(),
        transformer=transformer,
        scheduler=CogVideoXDDIMScheduler(**SCHEDULER_CONFIG),
    )


def frames_to_latents(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (B, T, H, W, 3) frames -> pixel-space latents (B, T, 3, H, W) in [-1, 1]."""
    x = torch.as_tensor(np.asarray(frames))
    return (x.permute(0, 1, 4, 2, 3).float() / 127.5 - 1.0).contiguous()


def with_first_frame(latents: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """The I2V transformer input: noisy ``latents`` (B, F, C, H, W) with the clean first frame
    of ``x0`` concatenated along channels (zeros for the later frames), as
    ``CogVideoXImageToVideoPipeline`` builds it."""
    from datagen.models.cogvideox import first_frame_latents

    return torch.cat([latents, first_frame_latents(x0).to(latents.dtype)], dim=2)


def with_clean_first(latents: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """``latents`` with frame 0 replaced by the clean one of ``x0`` (what an image-to-video
    model knows of frame 0)."""
    out = latents.clone()
    out[:, :1] = x0[:, :1]
    return out


def tiny_layout() -> Any:
    from datagen.layout import TokenLayout

    return TokenLayout(
        family="cogvideox",
        num_frames=FRAMES,
        height=HEIGHT,
        width=WIDTH,
        vae_compression=(1, 1, 1),
        patch_size=(1, PATCH, PATCH),
        text_tokens=MAX_TEXT_LEN,
        text_position="first",
    )


def encode_captions(pipe: Any, captions: list[str]) -> torch.Tensor:
    """(B, MAX_TEXT_LEN, 32) T5 embeddings of captions, as the pipeline computes them."""
    with torch.inference_mode():
        emb, _ = pipe.encode_prompt(
            captions,
            do_classifier_free_guidance=False,
            max_sequence_length=MAX_TEXT_LEN,
            device=torch.device("cpu"),
        )
    return emb.float().clone()


def evaluate_matching(
    models: dict[str, Any],
    videos: list[Any],
    text_emb: torch.Tensor,
    scheduler: Any,
    timesteps: list[int],
    seed: int = 0,
    batch: int = 16,
) -> Any:
    """Matching accuracy per model x layer x timestep on procedural videos with exact tracks.

    ``videos``: SyntheticVideo objects at the tiny size; ``text_emb`` their caption embeddings.
    The same seeded noise is used for every model and the pixel baseline.
    """
    from datagen.analysis.matching import (
        MatchingTable,
        head_averaged_matches,
        pixel_matches,
        query_tokens_of,
        score_matches,
    )
    from datagen.models.cogvideox import capture_qk

    layout = tiny_layout()
    table = MatchingTable(timesteps=list(timesteps))
    f_count = layout.token_grid[0]
    for start in range(0, len(videos), batch):
        chunk = videos[start : start + batch]
        x0 = frames_to_latents(np.stack([v.frames for v in chunk]))
        emb = text_emb[start : start + batch]
        qtok = [query_tokens_of(v.queries[:, 1:], layout) for v in chunk]
        for t in timesteps:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + start * 1009 + int(t))
            noise = torch.randn(x0.shape, generator=gen)
            tt = torch.full((x0.shape[0],), int(t), dtype=torch.long)
            xt = scheduler.add_noise(x0, noise, tt)

            def score(row: str, matches: torch.Tensor, chunk=chunk, qtok=qtok, t=t) -> None:
                for b, v in enumerate(chunk):
                    m = matches[b].numpy()[qtok[b]]  # (N, F)
                    table.add(row, t, score_matches(m, qtok[b], v.tracks, v.visible, layout))

            # The model sees the clean first frame (image-to-video); so does the baseline.
            score("pixel patches", pixel_matches(with_clean_first(xt, x0), PATCH))
            still = torch.stack([torch.arange(layout.tokens_per_frame)] * f_count, -1)
            score("no motion", still[None].expand(x0.shape[0], -1, -1))
            for name, transformer in models.items():
                qk = capture_qk(transformer, with_first_frame(xt, x0), emb, tt)
                for layer, (q, k) in sorted(qk.items()):
                    score(f"{name} layer {layer}", head_averaged_matches(q, k))
    return table


COLOUR_WORDS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "gray")
CAPTION_WORDS = frozenset(
    COLOUR_WORDS
    + ("ball", "box", "moves", "camera", "pans", "slowly", "up", "down", "left", "right")
)
"""Every word of the training captions (:func:`caption`, and 'moves' of the earlier legs'
captions, which named each sprite's direction): all the text the model learnt."""
_NOUNS = {"ball": "ball", "balls": "ball", "box": "box", "boxes": "box"}


def named_objects(prompt: str) -> list[tuple[str, str | None]]:
    """The (colour, noun) pairs a prompt names, in order: a colour word followed (within two
    words) by 'ball' or 'box' gives both, a lone colour gives (colour, None). 'grey' is 'gray'."""
    words = [w.strip(".,;:!?()'\"").lower() for w in prompt.split()]
    words = ["gray" if w == "grey" else w for w in words]
    out: list[tuple[str, str | None]] = []
    for i, w in enumerate(words):
        if w in COLOUR_WORDS:
            noun = next((_NOUNS[x] for x in words[i + 1 : i + 3] if x in _NOUNS), None)
            out.append((w, noun))
    return out


def _match_score(named: list[tuple[str, str | None]], have: list[tuple[str, str]]) -> float:
    """Named objects found in a scene: 1 for colour and noun, 0.5 for the colour alone; each
    scene sprite serves one named object (greedy, full matches first)."""
    free = list(have)
    score = 0.0
    for want_noun in (True, False):
        for colour, noun in named:
            hit = next(
                (o for o in free if o[0] == colour and (not want_noun or o[1] == noun)), None
            )
            if hit is None or (want_noun and noun is None):
                continue
            free.remove(hit)
            score += 1.0 if want_noun else 0.5
    return score


FIRST_FRAME_CANDIDATES = 1024
"""Scenes searched per video for the one that best matches the prompt's named objects."""


def first_frame_for_prompt(
    prompt: str, seed: int, config: SyntheticConfig = TRAIN_VIDEO
) -> tuple[np.ndarray, int]:
    """The procedural first frame for a prompt: uint8 (H, W, 3) and the scene seed used.

    Scenes are drawn from the training distribution with seeds derived from ``seed``; the first
    whose sprites match every named (colour, noun) is taken, else the best-matching of
    :data:`FIRST_FRAME_CANDIDATES`. A prompt naming no colour takes the first scene.
    Deterministic in (prompt, seed).
    """
    named = named_objects(prompt)
    base = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0x1F]).generate_state(1)[0]
    best, best_score = int(base), -1.0
    if named:
        full = sum(1.0 for _, n in named if n is not None) + 0.5 * sum(
            1 for _, n in named if n is None
        )
        for i in range(FIRST_FRAME_CANDIDATES):
            cand = int(base) + i
            score = _match_score(named, sprite_words(build_scene(config, cand)))
            if score > best_score:
                best, best_score = cand, score
            if score >= full:
                break
    frame, _ = build_scene(config, best).render_frame(0)
    return frame, best
