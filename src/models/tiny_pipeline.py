"""A tiny random `diffusers.FluxPipeline` built offline (no downloads), for tests of export and data preparation.

Every component is real and of the classes FLUX uses (CLIP-L + T5 text encoders with their tokenizers, a 16-channel
AutoencoderKL, FlowMatchEulerDiscreteScheduler with FLUX's dynamic shift), just a few thousand parameters each.
Tokenizers get character-level vocabularies, so any prompt tokenizes without vocabulary files.
"""

from __future__ import annotations

import string
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from tokenizers import pre_tokenizers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

TEXT_LEN = 32
"""Token length of both text encoders (CLIP's model_max_length; pass max_sequence_length=TEXT_LEN for T5)."""
CLIP_WIDTH = 16
"""CLIP hidden width = the transformer's pooled_projection_dim."""
T5_WIDTH = 32
"""T5 d_model = the transformer's joint_attention_dim."""


def tiny_transformer_config(guidance_embeds: bool = False) -> dict[str, Any]:
    """FluxTransformer2DModel kwargs matching the tiny pipeline (64 = 16 latent channels × 2×2 packing)."""
    return {
        "patch_size": 1,
        "in_channels": 64,
        "num_layers": 2,
        "num_single_layers": 2,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": T5_WIDTH,
        "pooled_projection_dim": CLIP_WIDTH,
        "guidance_embeds": guidance_embeds,
        "axes_dims_rope": (4, 6, 6),
    }


def tiny_clip_tokenizer() -> CLIPTokenizer:
    """Byte-level BPE without merges: one token per byte (word-final bytes get CLIP's "</w>" variant)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = ["<|startoftext|>", "<|endoftext|>", *alphabet, *(c + "</w>" for c in alphabet)]
    vocab = {token: i for i, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=TEXT_LEN)


def tiny_t5_tokenizer() -> T5TokenizerFast:
    """Unigram over single printable characters (pad 0, eos 1, unk 2, as in T5)."""
    chars = [c for c in string.printable if not c.isspace()]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0), *((c, -2.0) for c in chars)]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=TEXT_LEN)


def build_tiny_pipeline(
    transformer: FluxTransformer2DModel | None = None, guidance_embeds: bool = False, seed: int = 0
) -> FluxPipeline:
    """A FluxPipeline of tiny random components; `transformer` replaces the tiny dense one (e.g. a converted MoE).

    Images must be multiples of 4 pixels (VAE factor 2, then 2×2 packing); call it with max_sequence_length=TEXT_LEN.
    """
    torch.manual_seed(seed)
    clip_tokenizer = tiny_clip_tokenizer()
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_tokenizer),
            hidden_size=CLIP_WIDTH,
            intermediate_size=2 * CLIP_WIDTH,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=TEXT_LEN,
            bos_token_id=clip_tokenizer.bos_token_id,
            eos_token_id=clip_tokenizer.eos_token_id,
            pad_token_id=clip_tokenizer.pad_token_id,
        )
    )
    t5_tokenizer = tiny_t5_tokenizer()
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tokenizer),
            d_model=T5_WIDTH,
            d_kv=8,
            d_ff=2 * T5_WIDTH,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=1.5035,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    # FLUX.1-dev's scheduler config: resolution-dependent shift between 0.5 and 1.15.
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    if transformer is None:
        transformer = FluxTransformer2DModel(**tiny_transformer_config(guidance_embeds))
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=clip.eval(),
        tokenizer=clip_tokenizer,
        text_encoder_2=t5.eval(),
        tokenizer_2=t5_tokenizer,
        transformer=transformer.eval(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


__all__ = ["TEXT_LEN", "tiny_transformer_config", "tiny_clip_tokenizer", "tiny_t5_tokenizer", "build_tiny_pipeline"]
