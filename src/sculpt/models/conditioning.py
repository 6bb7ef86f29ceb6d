"""How a pipeline's UNet reads a prompt: the one place where Stable Diffusion and SDXL differ.

SD 1.x / 2.x: one text encoder; the UNet reads its token states c [L, D] through cross-attention:

    eps_theta(x_t, t; c) = UNet(x_t, t, encoder_hidden_states=c)

SDXL: two text encoders. Cross-attention reads their (penultimate-layer) token states side by side,
c = [c_1 | c_2] [L, D_1 + D_2]; the time embedding also reads the second encoder's pooled embedding
p [D_p] and six "time ids" (original size, crop corner, target size: the pipeline's defaults are the
picture's own size and no crop, so they follow from the latent's size):

    eps_theta(x_t, t; c, p) = UNet(x_t, t, encoder_hidden_states=c,
                                   added_cond_kwargs={"text_embeds": p, "time_ids": (H, W, 0, 0, H, W)})

A prompt embedding is one tensor per prompt in both families, so every method, batch and cache
handles it as before: [L, D] for SD, and for SDXL [L + 1, D] with the pooled embedding as one extra
row after the tokens (zero-padded from D_p to D). `unet_inputs` splits it just before the UNet;
`tokens` gives the rows cross-attention's keys and values read (what closed-form edits work on).
`conditioning(pipe)` picks the family once, from the UNet's configuration.
"""

from __future__ import annotations

import torch


class UnsupportedPipelineError(ValueError):
    """The pipeline's UNet is conditioned in a way this library does not handle."""


class TokenConditioning:
    """SD 1.x / 2.x (and the emoji world): the token states are the whole condition."""

    family = "sd"

    def encode(self, pipe, prompts: list[str]) -> torch.Tensor:
        """[P, L, D], exactly as the pipeline encodes a prompt at generation time."""
        embeds, _ = pipe.encode_prompt(prompts, pipe.device, 1, False)
        return embeds

    def encode_negative(self, pipe, prompts: list[str]) -> torch.Tensor:
        """The unconditional side of classifier-free guidance: SD encodes the negative prompt ("" when none)."""
        return self.encode(pipe, prompts)

    def tokens(self, embeds: torch.Tensor) -> torch.Tensor:
        return embeds

    def unet_inputs(self, embeds: torch.Tensor, latents: torch.Tensor) -> dict:
        return {"encoder_hidden_states": embeds}


class SDXLConditioning:
    """SDXL base: token states of both encoders, plus the pooled embedding and the time ids."""

    family = "sdxl"

    def __init__(self, pipe):
        unet = pipe.unet
        self.pooled_dim = unet.add_embedding.linear_1.in_features - 6 * unet.config.addition_time_embed_dim
        self.token_dim = unet.config.cross_attention_dim
        self.vae_scale_factor = pipe.vae_scale_factor
        # The pipeline's default negative: zeros instead of the encoded "" (SDXL base was trained so).
        self.zeros_for_empty = bool(getattr(pipe.config, "force_zeros_for_empty_prompt", False))
        if getattr(pipe, "text_encoder_2", None) is None or getattr(pipe.config, "requires_aesthetics_score", False):
            raise UnsupportedPipelineError(
                "SDXL refiner-shaped pipelines (one text encoder, aesthetic-score time ids) are not supported; "
                "use an SDXL base text-to-image pipeline")
        if not 0 < self.pooled_dim <= self.token_dim:
            raise UnsupportedPipelineError(
                f"SDXL UNet with a pooled text embedding of {self.pooled_dim} values and token states of "
                f"{self.token_dim}: expected 0 < pooled <= tokens (six time ids of "
                f"{unet.config.addition_time_embed_dim} values each)")

    def encode(self, pipe, prompts: list[str]) -> torch.Tensor:
        """[P, L + 1, D]: the token states of both encoders, then the pooled embedding as one row."""
        tokens, _, pooled, _ = pipe.encode_prompt(prompts, device=pipe.device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        return self.pack(tokens, pooled)

    def encode_negative(self, pipe, prompts: list[str]) -> torch.Tensor:
        """The unconditional side as `pipe(prompt)` makes it: "" (no negative prompt) is all zeros when
        the pipeline's force_zeros_for_empty_prompt is set; any other negative prompt is encoded."""
        embeds = self.encode(pipe, prompts)
        if self.zeros_for_empty:
            embeds[[i for i, p in enumerate(prompts) if p == ""]] = 0
        return embeds

    def pack(self, tokens: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        row = torch.nn.functional.pad(pooled, (0, self.token_dim - self.pooled_dim))
        return torch.cat([tokens, row[:, None, :].to(tokens.dtype)], dim=1)

    def tokens(self, embeds: torch.Tensor) -> torch.Tensor:
        return embeds[..., :-1, :]

    def unet_inputs(self, embeds: torch.Tensor, latents: torch.Tensor) -> dict:
        h, w = (s * self.vae_scale_factor for s in latents.shape[-2:])
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=embeds.dtype, device=embeds.device)
        return {"encoder_hidden_states": embeds[:, :-1],
                "added_cond_kwargs": {"text_embeds": embeds[:, -1, : self.pooled_dim],
                                      "time_ids": time_ids.expand(len(embeds), -1)}}


def conditioning(pipe) -> TokenConditioning | SDXLConditioning:
    """The pipeline's conditioning, from what its UNet expects besides the token states."""
    kind = pipe.unet.config.addition_embed_type
    if kind is None:
        return TokenConditioning()
    if kind == "text_time":
        return SDXLConditioning(pipe)
    raise UnsupportedPipelineError(
        f"a UNet with addition_embed_type={kind!r} is not supported (Stable Diffusion 1.x / 2.x and SDXL are)")
