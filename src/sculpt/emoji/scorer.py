"""An image-text scorer for the emoji world, the CLIP-score analogue: a small image encoder trained
contrastively against the frozen text encoder's sentence embeddings (the text side is locked, as in
LiT), so any prompt the text encoder can read, including words never seen in training, gets a score.

    scorer = load_scorer()
    scorer.score(images, ["a photo of a poodle"] * len(images))  # [B], 100 * cosine, paired
    scorer.similarity(images, texts)                              # [B, T], every picture against every text
"""

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from sculpt.emoji.images import to_image_batch
from sculpt.emoji.text_encoder import load_text_encoder, load_tokenizer, sentence_embeddings

WEIGHTS_PATH = Path(__file__).resolve().parent / "weights" / "scorer.safetensors"
EMBED_DIM = 384  # the sentence embedding size of all-MiniLM-L6-v2


def conv_stage(c_in: int, c_out: int) -> nn.Sequential:
    """Two 3x3 convolutions, then halve the resolution."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.SiLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.SiLU(),
        nn.AvgPool2d(2),
    )


class ImageEncoder(nn.Module):
    """Tensor[B, 3, 32, 32] in [0, 1] -> unit vectors [B, 384] in the text encoder's sentence space."""

    def __init__(self, width: int = 48):
        super().__init__()
        self.config = {"width": width}
        self.body = nn.Sequential(conv_stage(3, width), conv_stage(width, 2 * width), conv_stage(2 * width, 4 * width))
        self.proj = nn.Linear(4 * width, EMBED_DIM)
        # CLIP's learned temperature, initialised at 1 / 0.07.
        self.logit_scale = nn.Parameter(torch.tensor(2.6593))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(self.body(images * 2 - 1).mean(dim=(2, 3))), dim=-1)


class EmojiScorer:
    """The trained image encoder plus the frozen text encoder; scores are 100 * cosine, like CLIP score."""

    def __init__(self, image_encoder: ImageEncoder, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.image_encoder = image_encoder.eval().to(self.device)
        self.text_encoder = load_text_encoder(self.device)
        self.tokenizer = load_tokenizer()

    @torch.no_grad()
    def embed_images(self, images) -> torch.Tensor:
        return self.image_encoder(to_image_batch(images).to(self.device))

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        return sentence_embeddings(list(texts), self.text_encoder, self.tokenizer)

    def similarity(self, images, texts: list[str]) -> torch.Tensor:
        """[B, T]: 100 * cosine of every picture against every text."""
        return 100 * self.embed_images(images) @ self.embed_texts(texts).T

    def score(self, images, texts: str | list[str]) -> torch.Tensor:
        """[B]: 100 * cosine of picture i with text i (one text is used for every picture)."""
        image_emb = self.embed_images(images)
        texts = [texts] * len(image_emb) if isinstance(texts, str) else list(texts)
        if len(texts) != len(image_emb):
            raise ValueError(f"{len(image_emb)} pictures but {len(texts)} texts")
        return 100 * (image_emb * self.embed_texts(texts)).sum(-1)


def save_scorer(image_encoder: ImageEncoder, path: str | Path = WEIGHTS_PATH) -> None:
    state = {k: v.detach().half() for k, v in image_encoder.state_dict().items()}
    save_file(state, str(path), metadata={"config": json.dumps(image_encoder.config)})


def load_scorer(path: str | Path | None = None, device: str | torch.device = "cpu") -> EmojiScorer:
    path = Path(path) if path is not None else WEIGHTS_PATH
    if not path.exists():
        raise FileNotFoundError(f"no emoji scorer at {path}; train it with scripts/emoji_train.sh")
    with safe_open(str(path), framework="pt") as f:
        config = json.loads(f.metadata()["config"])
    encoder = ImageEncoder(**config)
    encoder.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return EmojiScorer(encoder, device)
