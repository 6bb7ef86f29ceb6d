"""Cross-attention probes: which tokens of a prompt are a concept's words, and how much attention
the image pays to them in every cross-attention (`attn2`) layer.

    A_l = softmax(Q_l K_l^T / sqrt(d))      [batch * heads, pixels, tokens]   in layer l
    kept: A_l on the marked tokens only      (with gradient: a method can minimise it)
    mass  = mean over layers, heads, pixels of sum over marked tokens of A_l    (in [0, 1])

Forget-Me-Not minimises ||A on the concept tokens||; MACE trains its LoRAs against the same maps;
tests and reports measure the mass before and after an erasure.
"""

from __future__ import annotations

import torch
from torch import nn


KEY_VALUE = ("attn2.to_k.weight", "attn2.to_v.weight")


def key_value_params(unet: nn.Module) -> dict[str, nn.Parameter]:
    """Every cross-attention key and value projection (what UCE, AC and MACE edit): the only
    weights that read the text embeddings."""
    return {n: p for n, p in unet.named_parameters() if n.endswith(KEY_VALUE)}


# -- token positions -------------------------------------------------------------------------------


def _token_ids(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Token ids exactly as the pipeline's encode_prompt makes them (padded, truncated)."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True).input_ids


def word_token_mask(tokenizer, prompts: list[str], words: list[str], end_token: bool = False) -> torch.Tensor:
    """[P, L] bool: the positions of any of `words` inside each prompt (every occurrence).

    end_token=True also marks the end-of-text token that closes the prompt ("use_pooler" in FMN
    and MACE: in CLIP it summarises the whole prompt). Only the first one: SD 1.x pads with the
    same token, and marking the padding too would steer attention off most of the context."""
    ids = _token_ids(tokenizer, prompts)
    word_ids = [tokenizer(w, add_special_tokens=False).input_ids for w in words]
    end_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    mask = torch.zeros(len(ids), len(ids[0]), dtype=torch.bool)
    for p, row in enumerate(ids):
        for w in word_ids:
            for i in range(len(row) - len(w) + 1):
                if w and row[i : i + len(w)] == w:
                    mask[p, i : i + len(w)] = True
        if end_token and end_id in row:
            mask[p, row.index(end_id)] = True
    return mask


def last_word_position(tokenizer, prompts: list[str]) -> torch.Tensor:
    """[P] index of each prompt's last word token (the token before end-of-text; 0 for "")."""
    attention = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").attention_mask
    return (attention.sum(-1) - 2).clamp(min=0)


# -- recording the maps -------------------------------------------------------------------------------


class _RecordingProcessor:
    """Plain cross-attention with the probabilities computed explicitly (diffusers' `AttnProcessor`
    path), handing them to the recorder. Output identical to the default processor."""

    def __init__(self, recorder: "AttentionRecorder"):
        self.recorder = recorder

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if hidden_states.ndim != 3 or attn.spatial_norm is not None or attn.group_norm is not None:
            raise ValueError("the attention recorder supports transformer cross-attention (3-D inputs) only")
        residual = hidden_states
        batch, tokens = encoder_hidden_states.shape[:2]
        attention_mask = attn.prepare_attention_mask(attention_mask, tokens, batch)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        v = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(q, k, attention_mask)  # softmax(Q K^T / sqrt(d))
        self.recorder.record(probs.view(batch, attn.heads, probs.shape[1], tokens))
        out = attn.to_out[1](attn.to_out[0](attn.batch_to_head_dim(torch.bmm(probs, v))))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class AttentionRecorder:
    """Context manager: records, in every attn2 layer of `unet`, the attention probabilities on the
    tokens marked in `token_mask` ([B, L] bool, the batch of the next forward passes).

        with AttentionRecorder(unet, mask) as rec:
            unet(x_t, t, encoder_hidden_states=emb)
            rec.mass()          # [B]
    """

    def __init__(self, unet: nn.Module, token_mask: torch.Tensor | None = None):
        self.unet = unet
        self.token_mask = token_mask
        self.maps: list[torch.Tensor] = []  # per layer call: [B, heads, pixels, L], zero off the mask
        self._saved: dict[str, object] = {}

    def __enter__(self) -> "AttentionRecorder":
        for name, module in self.unet.named_modules():
            if name.endswith("attn2"):
                self._saved[name] = module.processor
                module.set_processor(_RecordingProcessor(self))
        if not self._saved:
            raise ValueError("the UNet has no cross-attention (attn2) layers")
        return self

    def __exit__(self, *exc) -> None:
        modules = dict(self.unet.named_modules())
        for name, processor in self._saved.items():
            modules[name].set_processor(processor)
        self._saved.clear()

    def record(self, probs: torch.Tensor) -> None:
        if self.token_mask is None:
            return
        mask = self.token_mask.to(probs.device)
        if mask.shape[0] != probs.shape[0]:
            raise ValueError(f"token mask is for a batch of {mask.shape[0]}, the forward pass has {probs.shape[0]}")
        self.maps.append(probs * mask[:, None, None, :].to(probs.dtype))

    def clear(self) -> None:
        self.maps = []

    def mass(self) -> torch.Tensor:
        """[B]: mean over layers, heads and pixels of the probability summed over marked tokens."""
        return torch.stack([m.sum(-1).mean(dim=(1, 2)) for m in self.maps]).mean(0)
