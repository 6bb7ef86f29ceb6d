"""Prompts as an attacker sees them: token ids with open slots, the text encoder run with chosen input
vectors in those slots, and pictures drawn from a prompt embedding with the evaluation's sampler.

A slot prompt is a template such as "{} {} {} a photo of a poodle" (three open tokens, then the
prompt) or "a photo of a {}" (one new word). Its token ids are exactly what the pipeline's tokenizer
gives for the same text with a word in each slot (begin, words, end, padding to the encoder's
length); a forward hook on the encoder's input embedding table puts the attacker's vectors v_j at
the open positions, so the rest of the encoder (positions, layers) runs as for any prompt:

    c(v) = TextEncoder([e(bos), e(w_1), ..., v_1, ..., v_k, ..., e(eos), e(pad), ...])

With v_j = e(token_j) this is the pipeline's own encode_prompt of the text with those tokens
(tests/test_attacks.py). Pictures are drawn from c by sampling.denoise with the evaluation's
sampler, noise and seeds, so picture i of an attack and picture i of a plain prompt in `sculpt eval`
start from the same noise.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from sculpt.attacks.base import AttackError, Sampling, frozen
from sculpt.eval.sampling import PromptEmbeddings, denoise, initial_noise, picture_size
from sculpt.report.images import to_pil


@dataclass(frozen=True)
class SlotPrompt:
    ids: torch.Tensor  # [L] token ids, padded to the encoder's length; open slots hold a filler id
    slots: tuple[int, ...]  # the open positions, ascending
    length: int  # real tokens (begin and end included): the tokenizer's attention mask
    template: str

    @classmethod
    def build(cls, tokenizer, template: str) -> "SlotPrompt":
        """Token ids of `template` with one open position per "{}"."""
        special = tokenizer("").input_ids  # [bos, eos] for BERT ([CLS] [SEP]) and CLIP alike
        bos, eos = special[0], special[-1]
        filler = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else eos
        ids, slots = [bos], []
        pieces = template.split("{}")
        for i, piece in enumerate(pieces):
            if piece.strip():
                ids += tokenizer(piece.strip(), add_special_tokens=False).input_ids
            if i < len(pieces) - 1:
                slots.append(len(ids))
                ids.append(filler)
        ids.append(eos)
        max_length = tokenizer.model_max_length
        if len(ids) > max_length:
            raise AttackError(f"the prompt {template!r} needs {len(ids)} tokens with its {len(slots)} open slot(s); "
                              f"this text encoder reads {max_length}: use fewer tokens or a shorter prompt")
        length = len(ids)
        ids += [tokenizer.pad_token_id] * (max_length - length)
        return cls(torch.tensor(ids), tuple(slots), length, template)

    def filled(self, tokens: torch.Tensor) -> torch.Tensor:
        """[..., L] ids with the slots holding `tokens` ([..., k] ids)."""
        ids = self.ids.expand(*tokens.shape[:-1], -1).clone()
        ids[..., list(self.slots)] = tokens
        return ids

    def text(self, tokenizer, tokens: torch.Tensor) -> str:
        """The readable prompt with `tokens` ([k] ids) in the slots."""
        return tokenizer.decode(self.filled(tokens)[: self.length].tolist(), skip_special_tokens=True)


def allowed_tokens(tokenizer) -> torch.Tensor:
    """Vocabulary ids an attacker may put in a prompt: every token but the special ones (and BERT's
    reserved "[unused12]" slots, which no text contains)."""
    special = set(tokenizer.all_special_ids)
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return torch.tensor([i for i, tok in enumerate(tokens)
                         if i not in special and not (tok.startswith("[unused") and tok.endswith("]"))])


@contextmanager
def _slot_vectors(text_encoder, slots: torch.Tensor, vectors: torch.Tensor):
    """While active, the encoder's input embedding table answers `vectors` ([k, d] or [B, k, d]) at
    positions `slots` ([B, k], row by row), differentiably with respect to `vectors`."""

    def hook(module, inputs, output):
        output = output.clone()
        rows = torch.arange(output.shape[0], device=output.device)[:, None]
        output[rows, slots.to(output.device)] = vectors.to(output.dtype).expand(*slots.shape, -1)
        return output

    handle = text_encoder.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def encode(pipe, prompts: SlotPrompt | list[SlotPrompt], vectors: torch.Tensor | None = None,
           tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Prompt embeddings [B, L, D], as encode_prompt computes them, of slot prompts (each with the
    same number k of slots) with, in the slots, either input `vectors` ([k, d] for every prompt, or
    [B, k, d]) or real `tokens` ([k] or [B, k] ids; one prompt is repeated for every row)."""
    prompts = [prompts] if isinstance(prompts, SlotPrompt) else list(prompts)
    te = pipe.text_encoder
    if tokens is not None:
        tokens = tokens[None] if tokens.dim() == 1 else tokens
        prompts = prompts * len(tokens) if len(prompts) == 1 else prompts
        ids = torch.stack([p.filled(t) for p, t in zip(prompts, tokens)])
    else:
        ids = torch.stack([p.ids for p in prompts])
    ids = ids.to(te.device)
    mask = None
    if getattr(te.config, "use_attention_mask", False):  # as encode_prompt does: the tokenizer's mask
        lengths = torch.tensor([p.length for p in prompts], device=te.device)
        mask = (torch.arange(ids.shape[-1], device=te.device) < lengths[:, None]).long()
    if vectors is None:
        return te(ids, attention_mask=mask)[0].to(te.dtype)
    slots = torch.tensor([p.slots for p in prompts])
    with _slot_vectors(te, slots, vectors.to(te.device)):
        return te(ids, attention_mask=mask)[0].to(te.dtype)


def token_table(pipe) -> torch.Tensor:
    """The text encoder's input embedding table [V, d] (a detached view: attacks never change it)."""
    return pipe.text_encoder.get_input_embeddings().weight.detach()


def draw(pipe, cond: torch.Tensor, sampling: Sampling) -> list:
    """One picture per sampling seed from prompt embeddings `cond` [1, L, D]: the evaluation's loop
    (sampling.denoise), initial noise and unconditional prompt, in batches of sampling.batch_size."""
    settings = sampling.settings
    cond = cond.detach()
    guided = settings.guidance > 1
    size = picture_size(pipe, settings)
    pictures = []
    with frozen(pipe.text_encoder, pipe.unet, pipe.vae):
        uncond = PromptEmbeddings(pipe)([settings.negative_prompt]) if guided else None
        seeds = list(sampling.seeds)
        for start in range(0, len(seeds), sampling.batch_size):
            chunk = seeds[start:start + sampling.batch_size]
            latents = initial_noise(pipe, chunk, size)
            generators = [torch.Generator("cpu").manual_seed(s) for s in chunk] if settings.eta else None
            images = denoise(pipe, latents, cond.expand(len(chunk), -1, -1),
                             uncond.expand(len(chunk), -1, -1) if guided else None,
                             settings.guidance, settings, generator=generators)
            pictures += to_pil(images)
    return pictures
