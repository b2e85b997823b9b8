"""Capture overhead at full CogVideoX-2B size: one denoising step with and without capture.

Usage: python scripts/bench_capture_gpu.py [--device cuda] [--layers 0,14,29] [--repeats 5]
       [--queries 400] [--small] [--json PATH]

A random-weight ``CogVideoXTransformer3DModel`` with the public CogVideoX-2B config (30 layers,
30 heads x 64, patch 2, 226 text tokens, no RoPE), fp16, runs one denoising step of the
classifier-free-guidance batch (2 x 13 latent frames x 60 x 90: 49 frames at 480x720) with
and without capture of 3 layers. Capture = what a build stores: the conditional branch's q/k
of those layers copied to the CPU as fp16, plus the online correspondence of ``--queries``
frame-0 tokens (computed on the device). Rows alternate (off, on, off, on ...) after one
warm-up each; the figure is median(on) / median(off) (target <= 1.03). The step's output with
capture on must equal the output without, bit for bit; the script fails otherwise.

``--small`` swaps in a 2-layer, 4-head model at 9x64x96 so the script itself can be checked
on a CPU. Writes the figures as JSON to ``--json`` (default ``$OUT/bench_capture_gpu.json``
when ``$OUT`` is set).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from datagen.capture.recorder import CaptureSpec, Recorder
from datagen.models.cogvideox import CogVideoXFamily

ROOT = Path(__file__).resolve().parents[1]

# THUDM/CogVideoX-2b transformer/config.json (the fields that differ from diffusers' defaults
# are spelled out; the rest are the defaults it also uses).
CONFIG_2B = dict(
    num_attention_heads=30,
    attention_head_dim=64,
    in_channels=16,
    out_channels=16,
    flip_sin_to_cos=True,
    freq_shift=0,
    time_embed_dim=512,
    text_embed_dim=4096,
    num_layers=30,
    dropout=0.0,
    attention_bias=True,
    sample_width=90,
    sample_height=60,
    sample_frames=49,
    patch_size=2,
    temporal_compression_ratio=4,
    max_text_seq_length=226,
    activation_fn="gelu-approximate",
    timestep_activation_fn="silu",
    norm_elementwise_affine=True,
    norm_eps=1e-5,
    spatial_interpolation_scale=1.875,
    temporal_interpolation_scale=1.0,
    use_rotary_positional_embeddings=False,
    use_learned_positional_embeddings=False,
)
SMALL = dict(
    CONFIG_2B,
    num_attention_heads=4,
    attention_head_dim=16,
    text_embed_dim=32,
    num_layers=2,
    sample_width=12,
    sample_height=8,
    sample_frames=9,
    max_text_seq_length=16,
)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", default="0,14,29")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--queries", type=int, default=400)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    config = SMALL if args.small else CONFIG_2B
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    layers = tuple(int(x) for x in args.layers.split(",")) if not args.small else (0, 1)

    from diffusers import CogVideoXTransformer3DModel

    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = CogVideoXTransformer3DModel(**config)
    model = model.to(dtype).eval()
    load_s = time.perf_counter() - t0

    lat_f = (config["sample_frames"] - 1) // config["temporal_compression_ratio"] + 1
    lat_h, lat_w = config["sample_height"], config["sample_width"]
    h, w = lat_h // config["patch_size"], lat_w // config["patch_size"]
    g = torch.Generator(device="cpu").manual_seed(1)
    latents = torch.randn(2, lat_f, config["in_channels"], lat_h, lat_w, generator=g)
    text = torch.randn(2, config["max_text_seq_length"], config["text_embed_dim"], generator=g)
    latents, text = latents.to(device, dtype), text.to(device, dtype)
    timestep = torch.full((2,), 999, device=device)
    family = CogVideoXFamily()
    tokens = torch.randperm(h * w, generator=g)[: min(args.queries, h * w)].sort().values

    def step(capture: bool) -> tuple[torch.Tensor, float, Recorder | None]:
        recorder, restore = None, None
        if capture:
            spec = CaptureSpec(layers, (0,), layers, (0,))
            recorder = Recorder(spec, batch=1, query_tokens=tokens, token_grid=(lat_f, h, w))
            recorder.resolve_steps([999])
            recorder.begin_forward(0, 999, slice(1, 2))  # CogVideoX: conditional rows second
            restore = family.install_processors(model, recorder)
        sync(device)
        t = time.perf_counter()
        with torch.no_grad():
            out = model(
                hidden_states=latents,
                encoder_hidden_states=text,
                timestep=timestep,
                return_dict=False,
            )[0]
        sync(device)
        seconds = time.perf_counter() - t
        if restore is not None:
            restore()
        return out, seconds, recorder

    ref, _, _ = step(False)  # warm-up
    got, _, rec = step(True)
    identical = torch.equal(ref, got)
    times: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(args.repeats):
        times["off"].append(step(False)[1])
        times["on"].append(step(True)[1])
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["on"] / med["off"]
    assert rec is not None
    stored = sum(t.numel() * t.element_size() for t in rec.features[0].values())
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "config": "small" if args.small else "CogVideoX-2B",
        "latents": list(latents.shape),
        "video_tokens": lat_f * h * w,
        "layers": list(layers),
        "queries": int(tokens.numel()),
        "model_build_s": round(load_s, 2),
        "step_off_s": [round(x, 4) for x in times["off"]],
        "step_on_s": [round(x, 4) for x in times["on"]],
        "median_off_s": round(med["off"], 4),
        "median_on_s": round(med["on"], 4),
        "ratio": round(ratio, 4),
        "target": 1.03,
        "video_identical": identical,
        "qk_bytes_stored": stored,
        "corr_pairs": len(rec.correspondence[0]),
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0,
    }
    print(json.dumps(result, indent=1))
    out = args.json or (
        Path(os.environ["OUT"]) / "bench_capture_gpu.json" if "OUT" in os.environ else None
    )
    if out is not None:
        out.write_text(json.dumps(result, indent=1) + "\n")
    if not identical:
        raise SystemExit("capture changed the step's output")


if __name__ == "__main__":
    main()
