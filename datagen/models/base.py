"""The model-family plugin interface, and the mechanics every family shares.

A family (``cogvideox``, ``wan``, ``hunyuanvideo``) subclasses :class:`ModelFamily` and
implements every abstract method; nothing calls a family through ``hasattr``. What is the same
for all of them lives here, once:

- size checks from the family's :class:`Geometry` (known before any weights load);
- installing capture processors on the chosen layers (layer range checked once) and undoing it;
- the step clock: which denoising step a transformer forward belongs to and which of its rows
  are the conditional branch, read from the label diffusers pipelines put on each forward
  (``transformer.cache_context("cond" | "uncond" | "cond_uncond")``);
- generation through the diffusers pipeline with one seeded generator per video;
- the feature pass of given videos (VAE encode, noising to a timestep, one forward with capture)
  as a sequence of family methods (see :mod:`datagen.sources.features`).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from datagen.capture.recorder import Recorder
from datagen.config import GenerationConfig, ModelConfig
from datagen.errors import UserError
from datagen.layout import TokenLayout


@dataclass(frozen=True)
class Geometry:
    """What a model does to a video's shape, known before its weights load."""

    temporal: int
    """VAE temporal compression."""
    spatial: int
    """VAE spatial compression."""
    patch: int
    """Transformer spatial patch."""
    patch_t: int
    """Transformer temporal patch (1: none)."""
    heads_dim: int
    """Attention heads x head dimension (q/k bytes per token / 2)."""
    layers: int | None
    """Attention layers capture can choose from (``capture.*_layers`` are 0..layers-1);
    None when not known before the model loads."""

    def token_grid(self, gen: GenerationConfig) -> tuple[int, int, int]:
        """(token frames, rows, columns) of one video of the generation size; latent frames
        are padded up to a multiple of the temporal patch (CogVideoX 1.5)."""
        latent_f = (gen.num_frames - 1) // self.temporal + 1
        step = self.spatial * self.patch
        return -(-latent_f // self.patch_t), gen.height // step, gen.width // step


Schedule = Sequence[int] | Callable[[], Sequence[Any]]
"""Timesteps of the denoising loop, or a function returning them (read at the first forward,
once the pipeline has set them)."""


class ModelFamily(ABC):
    """One video DiT family: geometry, loading, token layout, capture, generation and the
    feature pass of given videos."""

    name: ClassVar[str]
    """``model.family`` value."""
    title: ClassVar[str]
    """Name in messages."""
    size_hint: ClassVar[str] = ""
    folder_example: ClassVar[str]
    """A local-folder example for the offline hint."""
    builtin_ids: ClassVar[tuple[str, ...]]
    """Model ids the project builds (tiny random-weight models) or ships (the trained tiny
    model) for this family."""

    # --- before any weights load ------------------------------------------------------------

    def check_model(self, model: ModelConfig) -> None:
        """Refuse another family's built-in model id (a hub id or folder is checked when it
        loads)."""
        mid = model.model_id
        if mid.startswith("datagen/") and mid not in self.builtin_ids and not local_folder(mid):
            raise UserError(
                f"model.model_id '{mid}' is not a {self.title} model; for model.family="
                f"{self.name} pass a checkpoint (--set model.model_id={self.folder_example}) "
                f"or one of: {', '.join(self.builtin_ids)}"
            )

    @abstractmethod
    def geometry(self, model: ModelConfig) -> Geometry:
        """Compressions, patches, attention width and layer count of ``model``: from its
        configs when they are on this machine (a local folder or the Hugging Face cache),
        else from the family's table of public checkpoints."""

    def check_generation(self, gen: GenerationConfig, model: ModelConfig) -> None:
        """Refuse sizes the model cannot take as given (pipelines would silently round them,
        and the video would not match the recorded layout): frames must be ``temporal*k + 1``
        and each side a multiple of ``spatial * patch``."""
        geo = self.geometry(model)
        if gen.num_frames < 1 or (gen.num_frames - 1) % geo.temporal:
            raise UserError(
                f"generation.num_frames={gen.num_frames}: {self.title} needs {geo.temporal}k+1 "
                f"frames (e.g. {', '.join(str(geo.temporal * k + 1) for k in (2, 4, 12))})"
            )
        step = geo.spatial * geo.patch
        for name, value in (("height", gen.height), ("width", gen.width)):
            if value < step or value % step:
                raise UserError(
                    f"generation.{name}={value}: {self.title} needs a multiple of {step} "
                    f"(VAE {geo.spatial}x times patch {geo.patch}){self.size_hint}"
                )

    def check_capture_layers(self, layers: Sequence[int], model: ModelConfig) -> None:
        """Refuse capture layers the model does not have, when its layer count is known before
        it loads (checked again on the loaded transformer)."""
        count = self.geometry(model).layers
        if count is not None:
            check_layers(layers, count, self.layer_description(count, None))

    def check_prompts(self, prompts: list[Any], gen: GenerationConfig, model: ModelConfig) -> None:
        """Raise UserError when the prompts lack what the model needs, or carry what it
        cannot use (before it loads). Text-to-video families need nothing more."""
        return None

    # --- loading ------------------------------------------------------------------------------

    def load_pipeline(self, cfg: ModelConfig) -> Any:
        """The model's diffusers pipeline on ``cfg.device``, progress bar off."""
        self.check_model(cfg)
        device = resolve_device(cfg.device)
        pipe = self.load(cfg, getattr(torch, cfg.dtype))
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device)

    @abstractmethod
    def load(self, cfg: ModelConfig, dtype: torch.dtype) -> Any:
        """A diffusers pipeline: ``from_pretrained`` of a hub id or a local folder, or of the
        family's tiny random-weight model (built from configs, see :func:`from_built`)."""

    @abstractmethod
    def layout(self, pipe: Any, gen: GenerationConfig) -> TokenLayout:
        """The token layout of one video (recorded in each sample), read from the loaded
        pipeline's configs (see :meth:`token_layout`)."""

    def token_layout(
        self,
        gen: GenerationConfig,
        vae: tuple[int, int],
        patch: tuple[int, int, int],
        text_tokens: int,
        text_position: str,
        **rest: Any,
    ) -> TokenLayout:
        """A video of ``gen``'s size through a VAE compressing ``vae`` = (time, space) and a
        transformer patching ``patch`` = (t, h, w), with ``text_tokens`` text tokens at
        ``text_position``; ``rest``: the other :class:`TokenLayout` fields."""
        return TokenLayout(
            family=self.name,
            num_frames=gen.num_frames,
            height=gen.height,
            width=gen.width,
            vae_compression=(vae[0], vae[1], vae[1]),
            patch_size=patch,
            text_tokens=text_tokens,
            text_position=text_position,
            **rest,
        )

    # --- capture ------------------------------------------------------------------------------

    @abstractmethod
    def attention_layers(self, transformer: Any) -> list[Any]:
        """The attention modules capture can choose from, in ``capture.*_layers`` order."""

    @abstractmethod
    def capture_processor(self, recorder: Recorder, layer: int, replaced: Any) -> Any:
        """An attention processor for ``layer`` that computes exactly what ``replaced`` does
        and hands its q/k/v to ``recorder``."""

    @abstractmethod
    def blocks(self, transformer: Any) -> list[Any]:
        """The transformer blocks in ``capture.*_layers`` order (block ``i`` holds attention
        layer ``i``); ``capture.hidden_layers`` hooks their outputs."""

    def block_video_tokens(self, output: Any) -> Tensor:
        """The video tokens (B, F*h*w, dim), frame-major, of one block's output. Default: the
        output itself, or its first element (blocks that return (video, text))."""
        return output[0] if isinstance(output, tuple) else output

    def layer_description(self, count: int, transformer: Any | None) -> str:
        """How the ``count`` layers are numbered, for the message refusing a layer."""
        return f"{self.title} has {count} layers (0..{count - 1})"

    def check_layer(self, layer: int, attn: Any) -> None:
        """Refuse a layer whose attention the capture processor cannot reproduce."""
        return None

    def conditional_rows(self, label: str | None, batch: int, guidance: bool) -> slice | None:
        """Rows of one forward's batch that are the conditional branch (None: record nothing).

        Default: a pass labelled ``"uncond"`` is the unconditional branch; any other pass
        holds the conditional branch in all its rows (one branch per forward)."""
        return None if label == "uncond" else slice(0, batch)

    def install_processors(self, transformer: Any, recorder: Recorder) -> Callable[[], None]:
        """Capture processors on the recorder's layers, and forward hooks on the blocks of its
        hidden layers (no step counting); returns the undo."""
        attns = self.attention_layers(transformer)
        count = len(attns)
        check_layers(recorder.spec.all_layers, count, self.layer_description(count, transformer))
        for i in recorder.spec.layers:
            self.check_layer(i, attns[i])
        originals = {i: attns[i].processor for i in recorder.spec.layers}
        for i, proc in originals.items():
            attns[i].set_processor(self.capture_processor(recorder, i, proc))
        handles = []
        if recorder.spec.hidden_layers:
            blocks = self.blocks(transformer)
            for i in recorder.spec.hidden_layers:
                handles.append(blocks[i].register_forward_hook(self._hidden_hook(recorder, i)))

        def restore() -> None:
            for handle in handles:
                handle.remove()
            for i, proc in originals.items():
                attns[i].set_processor(proc)

        return restore

    def _hidden_hook(self, recorder: Recorder, layer: int) -> Callable[..., None]:
        def hook(module: Any, args: Any, output: Any) -> None:
            if recorder.wants_hidden(layer):
                recorder.record_hidden(layer, self.block_video_tokens(output))

        return hook

    def capture_transformer(
        self, transformer: Any, recorder: Recorder, schedule: Schedule, guidance: bool
    ) -> Callable[[], None]:
        """Capture processors on a transformer plus the step clock; returns the undo.

        Before every forward the recorder learns its step, timestep and conditional rows.
        The step: each forward starts a new one unless it is a further pass of the current
        step, which diffusers pipelines mark by running each pass inside
        ``transformer.cache_context(label)`` with a label not yet seen in the step ("cond"
        then "uncond" for Wan's and HunyuanVideo's two-pass CFG; one "cond_uncond" batched
        pass for CogVideoX). A bare forward (no label) is a step of its own.
        """
        restore = self.install_processors(transformer, recorder)
        state: dict[str, Any] = {"step": -1, "seen": set(), "label": None}
        shadowed = transformer.__dict__.get("cache_context")
        original_context = transformer.cache_context

        @contextlib.contextmanager
        def labelled_context(name: str, **kwargs: Any) -> Iterator[None]:
            previous = state["label"]
            state["label"] = name
            try:
                with original_context(name, **kwargs):
                    yield
            finally:
                state["label"] = previous

        # An instance attribute shadows the class's method; ``del`` restores it.
        transformer.cache_context = labelled_context

        def before_forward(module: Any, args: tuple, kwargs: dict) -> None:
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
            label = state["label"]
            if state["step"] < 0:
                steps = schedule() if callable(schedule) else schedule
                recorder.resolve_steps([int(t) for t in steps])
            if state["step"] < 0 or label is None or label in state["seen"]:
                state["step"] += 1
                state["seen"] = set()
            state["seen"].add(label)
            cond = self.conditional_rows(label, hidden.shape[0], guidance)
            recorder.begin_forward(state["step"], int(timestep.reshape(-1)[0]), cond)

        handle = transformer.register_forward_pre_hook(before_forward, with_kwargs=True)

        def remove() -> None:
            handle.remove()
            if shadowed is None:
                del transformer.cache_context
            else:
                transformer.cache_context = shadowed
            restore()

        return remove

    def install_capture(self, pipe: Any, recorder: Recorder, guidance: bool) -> Callable[[], None]:
        """Capture during ``pipe``'s generation; ``guidance``: whether the pipeline runs
        classifier-free guidance (``guidance_scale > 1``). Returns the undo."""
        return self.capture_transformer(
            pipe.transformer, recorder, lambda: pipe.scheduler.timesteps, guidance
        )

    # --- generation ---------------------------------------------------------------------------

    def takes_first_frame(self, pipe: Any) -> bool:
        """Whether the loaded pipeline generates from a given first frame (image-to-video)."""
        return False

    def pipeline_kwargs(
        self, pipe: Any, negs: list[str], gen: GenerationConfig, images: list[np.ndarray] | None
    ) -> dict[str, Any]:
        """The pipeline call's family-specific arguments (beyond prompt, size, steps,
        guidance, generators and text length)."""
        if images is not None:
            raise ValueError(f"first frames given to a text-to-video {self.title} pipeline")
        return {"negative_prompt": negs}

    def generate(
        self,
        pipe: Any,
        prompts: list[str],
        negative_prompts: list[str],
        seeds: list[int],
        gen: GenerationConfig,
        images: list[np.ndarray] | None = None,
    ) -> np.ndarray:
        """Generate videos: uint8 (B, T, H, W, 3) RGB, one seeded CPU generator per video (so
        a video does not depend on its batch-mates' seeds); ``images`` (uint8 (H, W, 3) each)
        are the first frames when :meth:`takes_first_frame`."""
        kwargs = self.pipeline_kwargs(pipe, negative_prompts, gen, images)
        generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        with torch.inference_mode():
            out = pipe(
                prompt=prompts,
                height=gen.height,
                width=gen.width,
                num_frames=gen.num_frames,
                num_inference_steps=gen.num_inference_steps,
                guidance_scale=gen.guidance_scale,
                generator=generators,
                output_type="np",
                max_sequence_length=gen.max_sequence_length,
                **kwargs,
            )
        frames = np.asarray(out.frames, dtype=np.float32)
        return np.clip(np.rint(frames * 255.0), 0, 255).astype(np.uint8)

    # --- the feature pass of given videos -----------------------------------------------------

    def inference_timesteps(self, pipe: Any, num_steps: int) -> list[float]:
        """The timesteps the pipeline's denoising loop runs for ``num_steps`` steps."""
        pipe.scheduler.set_timesteps(num_steps)
        return [float(t) for t in pipe.scheduler.timesteps]

    @abstractmethod
    def encode_video(self, pipe: Any, frames: np.ndarray) -> Tensor:
        """uint8 (B, T, H, W, 3) -> the clean latents the transformer denoises, in its own
        layout and normalisation (the VAE posterior mode)."""

    def encode_text(
        self, pipe: Any, prompts: list[str], gen: GenerationConfig
    ) -> dict[str, Tensor]:
        """The conditional text inputs of one transformer forward, as its keyword arguments,
        in the transformer's dtype. Default: the pipeline's single text encoder
        (``encode_prompt`` without guidance) as ``encoder_hidden_states``."""
        with torch.inference_mode():
            emb, _ = pipe.encode_prompt(
                prompts,
                do_classifier_free_guidance=False,
                max_sequence_length=gen.max_sequence_length,
                device=pipe.transformer.device,
            )
        return {"encoder_hidden_states": emb.to(pipe.transformer.dtype)}

    def add_noise(self, pipe: Any, clean: Tensor, noise: Tensor, timestep: float) -> Tensor:
        """``clean`` latents noised to ``timestep`` as the model's training noised them.
        Default: the rectified flow of flow-matching models (Wan, HunyuanVideo)."""
        return flow_matching_noise(pipe.scheduler, clean, noise, timestep)

    timestep_dtype: ClassVar[torch.dtype] = torch.float32
    """The dtype of the timestep tensor the pipeline hands its transformer."""

    def forward_inputs(self, pipe: Any, latents: Tensor, clean: Tensor | None) -> dict[str, Any]:
        """The transformer's video inputs for one forward on ``latents``: ``hidden_states``
        and whatever else the model needs from them. Default: the latents alone."""
        return {"hidden_states": latents}

    def denoiser_forward(
        self,
        pipe: Any,
        latents: Tensor,
        text: dict[str, Any],
        timestep: float,
        clean: Tensor | None = None,
    ) -> None:
        """One transformer forward at ``timestep`` (its output is not needed: the capture
        processors take what they record on the way); ``text`` from :meth:`encode_text`;
        ``clean``: the un-noised latents, for models conditioned on them (image-to-video)."""
        transformer = pipe.transformer
        inputs = self.forward_inputs(pipe, latents, clean)
        inputs["hidden_states"] = inputs["hidden_states"].to(transformer.dtype)
        t = torch.full(
            (latents.shape[0],), timestep, dtype=self.timestep_dtype, device=latents.device
        )
        with torch.inference_mode():
            transformer(**inputs, **text, timestep=t, return_dict=False)


class CaptureProcessor:
    """What every capture processor holds: the recorder, its layer, and the attention backend
    of the processor it replaces (diffusers' ``set_attention_backend`` and context-parallel
    setup write ``_attention_backend``/``_parallel_config`` on processors), so the same
    kernel runs."""

    _attention_backend: Any = None
    _parallel_config: Any = None

    def __init__(self, recorder: Recorder, layer: int, like: Any = None):
        self.recorder = recorder
        self.layer = layer
        if like is not None:
            self._attention_backend = getattr(like, "_attention_backend", None)
            self._parallel_config = getattr(like, "_parallel_config", None)

    def attend(self, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None) -> Tensor:
        """diffusers' dispatched attention on (B, S, heads, d) q/k/v with the replaced
        processor's backend; (B, S, heads*d) in the query's dtype."""
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        out = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=mask,
            dropout_p=0.0,
            is_causal=False,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        return out.flatten(2, 3).to(query.dtype)


def from_built(build: Callable[[], Any], load: Callable[..., Any], **kwargs: Any) -> Any:
    """A pipeline built in memory, saved to a temporary folder and loaded back with
    ``load(folder, **kwargs)`` (``from_pretrained``), so a tiny model takes the same loading
    path as a real checkpoint."""
    with tempfile.TemporaryDirectory(prefix="datagen-tiny-") as tmp:
        folder = str(Path(tmp) / "pipe")
        build().save_pretrained(folder)
        return load(folder, **kwargs)


def check_layers(layers: Sequence[int], count: int, description: str) -> None:
    """Refuse layer indices outside ``0..count-1``; ``description`` says how they are
    numbered."""
    bad = [i for i in layers if not 0 <= i < count]
    if bad:
        raise UserError(f"capture layers {bad} do not exist: {description}; fix capture.*_layers")


def flow_matching_noise(scheduler: Any, clean: Tensor, noise: Tensor, timestep: float) -> Tensor:
    """Rectified-flow noising (Wan, HunyuanVideo): ``x_t = (1 - s) x_0 + s eps`` with
    ``s = t / num_train_timesteps`` (the schedulers' timesteps are their sigmas x 1000)."""
    sigma = float(timestep) / float(scheduler.config.num_train_timesteps)
    return ((1.0 - sigma) * clean.float() + sigma * noise.float()).to(clean.dtype)


def vae_posterior_mode(vae: Any, frames: np.ndarray) -> Tensor:
    """uint8 (B, T, H, W, 3) frames through a video VAE's encoder: the posterior mode,
    (B, C, F, h, w), in the VAE's dtype."""
    x = torch.as_tensor(np.ascontiguousarray(frames)).permute(0, 4, 1, 2, 3)
    x = (x.float() / 127.5 - 1.0).to(device=vae.device, dtype=vae.dtype)
    with torch.inference_mode():
        return vae.encode(x).latent_dist.mode()


def resolve_device(name: str) -> torch.device:
    """``model.device`` as a torch device: auto = cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"model.device '{name}' is not a device; use auto, cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"model.device '{name}' asked for, but no CUDA device is available")
    return dev


@contextmanager
def offline_hint(model_id: str, example_folder: str) -> Iterator[None]:
    """Turn a failed ``from_pretrained`` into one line that names the offline route."""
    try:
        yield
    except (OSError, ValueError) as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        text = str(exc).strip()
        reason = text.splitlines()[0] if text else type(exc).__name__
        raise UserError(
            f"cannot load model '{model_id}' ({reason}); without internet, download it "
            f"elsewhere and pass its local folder with --set model.model_id={example_folder}"
            + ("" if offline else " (and set HF_HUB_OFFLINE=1)")
        ) from None


def local_folder(model_id: str) -> Path | None:
    """The folder a model id names on this machine (an existing directory), else None."""
    path = Path(model_id).expanduser()
    return path if path.is_dir() else None


def component_config(
    model: ModelConfig, component: str, name: str = "config.json"
) -> dict[str, Any] | None:
    """``COMPONENT/NAME`` (a JSON file) of a checkpoint, when it is on this machine: in its
    local folder, or in the Hugging Face cache for a hub id (never downloaded); else None.
    ``component`` "" reads the checkpoint's top folder (``model_index.json``)."""
    file = f"{component}/{name}" if component else name
    folder = local_folder(model.model_id)
    if folder is not None:
        path: Any = folder / file
    else:
        try:
            from huggingface_hub import try_to_load_from_cache

            path = try_to_load_from_cache(model.model_id, file, revision=model.revision)
        except Exception:  # a malformed id is not a cached checkpoint
            return None
        if not isinstance(path, str):
            return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
