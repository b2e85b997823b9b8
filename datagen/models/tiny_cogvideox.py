"""The embedded default: a tiny random-weight CogVideoX pipeline built from configs, offline.

Same diffusers classes as the real model (CogVideoXPipeline, CogVideoXTransformer3DModel,
AutoencoderKLCogVideoX, T5EncoderModel, CogVideoXDDIMScheduler); only the sizes differ. Weights
come from a fixed torch seed, so every machine with the same software builds the same model.
The tokenizer is a unigram vocabulary made here (whole words for common prompt words, single
characters for everything else), so no tokenizer download is needed.
"""

from __future__ import annotations

from pathlib import Path

import torch

WEIGHT_SEED = 20250617

_WORDS = """a an the of on in at to from with and into onto over under across along through
toward towards past around behind between above below left right up down forward backward
slowly quickly gently steadily camera pans pan tilts zooms dolly orbit tracking shot close-up
wide aerial drone view dog cat horse bird fish bear deer fox rabbit cow sheep duck eagle
person man woman child girl boy people runner dancer cyclist skater walks runs jumps flies
swims rolls rides drives turns spins rotates falls climbs moves glides slides bounces sways
car bus truck train bicycle motorcycle boat ship plane helicopter ball box cup bottle leaf
tree trees flower grass water river lake sea ocean wave waves beach sand snow rock mountain
hill forest field road street city building bridge sky cloud clouds sun light shadow red
orange yellow green blue purple pink brown black white gray grey golden silver wooden stone
brick metal glass textured striped spotted small large tall long old young bright dark
morning evening sunset night autumn winter summer spring while its his her their is are""".split()
_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:'!?-()/&%"


def tiny_tokenizer():
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -6.0)]
    vocab += [("\u2581" + w, -4.0 - 0.001 * i) for i, w in enumerate(dict.fromkeys(_WORDS))]
    vocab += [(c, -9.0) for c in _CHARS]
    vocab += [("\u2581" + c, -9.5) for c in _CHARS]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def tiny_text_encoder(vocab_size: int):
    """The tiny random-weight T5 encoder (d_model 32), drawn from the current torch RNG."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=vocab_size,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
        )
    )


def build_tiny_pipeline(
    height: int = 64,
    width: int = 96,
    num_frames: int = 9,
    max_text_len: int = 32,
    **transformer_overrides: object,
):
    """A CogVideoXPipeline with random weights small enough to run in well under a second.

    ``height``/``width``/``num_frames`` only set the transformer's positional-embedding
    table size (sample_height/width/frames); generation may use other sizes.
    ``transformer_overrides`` switch variants on, e.g. ``use_rotary_positional_embeddings=True``
    (CogVideoX 1.0 5B) or that plus ``patch_size_t=2`` (CogVideoX 1.5).
    """
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )

    tokenizer = tiny_tokenizer()
    devnull_state = torch.random.get_rng_state()
    torch.manual_seed(WEIGHT_SEED)
    try:
        text_encoder = tiny_text_encoder(len(tokenizer))
        transformer = CogVideoXTransformer3DModel(
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=4,
            out_channels=4,
            time_embed_dim=32,
            text_embed_dim=32,
            num_layers=2,
            sample_width=width // 8,
            sample_height=height // 8,
            sample_frames=num_frames,
            patch_size=2,
            max_text_seq_length=max_text_len,
            **transformer_overrides,
        )
        vae = AutoencoderKLCogVideoX(
            block_out_channels=(8, 8, 16, 16),
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=4,
            sample_height=height,
            sample_width=width,
        )
    finally:
        torch.random.set_rng_state(devnull_state)
    scheduler = CogVideoXDDIMScheduler()
    return CogVideoXPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder.eval(),
        vae=vae.eval(),
        transformer=transformer.eval(),
        scheduler=scheduler,
    )


def save_tiny_pipeline(folder: Path, **sizes: int) -> Path:
    """Write the tiny pipeline as a diffusers folder that ``from_pretrained`` loads."""
    build_tiny_pipeline(**sizes).save_pretrained(str(folder))
    return folder
