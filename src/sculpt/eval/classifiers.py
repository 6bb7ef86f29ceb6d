"""The classifier interface the evaluation reads pictures through, and its implementations.

A Classifier maps pictures to logits over its own labels (predict) and to a feature vector
(features, for Frechet / kernel distances). The emoji world's CNN is the default; any
transformers image-classification model (an ImageNet ResNet-50 for the paper's Imagenette numbers)
fits the same interface. Nothing here downloads weights: a transformers model is read from a local
folder or the local Hugging Face cache.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from PIL import Image


class Classifier(ABC):
    """Pictures in, logits over `labels` out. Subclasses implement logits() and features()."""

    name: str = "classifier"
    labels: list[str] = []

    @abstractmethod
    def logits(self, images: list[Image.Image]) -> torch.Tensor:
        """[B, len(labels)]."""

    @abstractmethod
    def features(self, images: list[Image.Image]) -> torch.Tensor:
        """[B, D]: the feature space of FID / KID."""

    def predict(self, images: list[Image.Image], batch_size: int = 256) -> torch.Tensor:
        """Top-1 labels [B] (ids into `labels`)."""
        out = [self.logits(images[i:i + batch_size]).argmax(-1).cpu() for i in range(0, len(images), batch_size)]
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)

    def logits_and_features(self, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """Both at once; a classifier whose logits are a head on its features overrides this with one pass."""
        return self.logits(images), self.features(images)

    def predict_and_embed(self, images: list[Image.Image], batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-1 labels [B] and features [B, D] of the same pictures."""
        labels, feats = [], []
        for i in range(0, len(images), batch_size):
            logits, f = self.logits_and_features(images[i:i + batch_size])
            labels.append(logits.argmax(-1).cpu())
            feats.append(f.float().cpu())
        if not labels:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, 0)
        return torch.cat(labels), torch.cat(feats)

    def embed(self, images: list[Image.Image], batch_size: int = 256) -> torch.Tensor:
        out = [self.features(images[i:i + batch_size]).float().cpu() for i in range(0, len(images), batch_size)]
        return torch.cat(out) if out else torch.zeros(0, 0)

    def label_id(self, name: str) -> int:
        try:
            return self.labels.index(name)
        except ValueError:
            raise KeyError(f"{self.name} has no label {name!r}") from None


class EmojiWorldClassifier(Classifier):
    """The emoji world's committed CNN (sculpt.emoji.classifier): 62 classes, 128-d features."""

    name = "emoji-classifier"

    def __init__(self, path=None, device: str | torch.device = "cpu"):
        from sculpt.emoji.classifier import WEIGHTS_PATH, load_classifier
        from sculpt.emoji.taxonomy import load_taxonomy

        self.model = load_classifier(path, device=device)
        self.labels = load_taxonomy().names
        self.path = str(path or WEIGHTS_PATH)

    def logits(self, images):
        return self.model.predict(images)

    def features(self, images):
        return self.model.features(images)

    def logits_and_features(self, images):
        feats = self.model.features(images)  # the head reads these features: one pass for both
        with torch.no_grad():
            return self.model.head(feats), feats


class TransformersClassifier(Classifier):
    """Any transformers image-classification model from a local folder or the local HF cache, e.g.
    microsoft/resnet-50 (ImageNet labels; see benchmark.IMAGENETTE). Features: the last hidden
    state, average-pooled (CNNs) or its first token (ViTs)."""

    def __init__(self, model: str, device: str | torch.device = "cpu", local_files_only: bool = True):
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        self.name = model
        self.device = torch.device(device)
        self.processor = AutoImageProcessor.from_pretrained(model, local_files_only=local_files_only)
        self.model = AutoModelForImageClassification.from_pretrained(model, local_files_only=local_files_only)
        self.model.eval().to(self.device)
        id2label = self.model.config.id2label
        self.labels = [id2label[i] for i in range(len(id2label))]

    @torch.no_grad()
    def _forward(self, images):
        inputs = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt").to(self.device)
        return self.model(**inputs, output_hidden_states=True)

    def logits(self, images):
        return self._forward(images).logits

    def features(self, images):
        hidden = self._forward(images).hidden_states[-1]
        return hidden.mean(dim=(2, 3)) if hidden.ndim == 4 else hidden[:, 0]


class TransformersCLIPScorer:
    """CLIP score for real models: a transformers CLIPModel from a local folder or the local HF cache
    (the literature uses openai/clip-vit-base-patch32). similarity() -> [B, T], 100 * cosine."""

    def __init__(self, model: str, device: str | torch.device = "cpu", local_files_only: bool = True):
        from transformers import CLIPModel, CLIPProcessor

        self.name = model
        self.device = torch.device(device)
        self.processor = CLIPProcessor.from_pretrained(model, local_files_only=local_files_only)
        self.model = CLIPModel.from_pretrained(model, local_files_only=local_files_only).eval().to(self.device)

    @torch.no_grad()
    def similarity(self, images, texts: list[str]) -> torch.Tensor:
        inputs = self.processor(text=list(texts), images=[im.convert("RGB") for im in images],
                                return_tensors="pt", padding=True, truncation=True).to(self.device)
        out = self.model(**inputs)
        img = torch.nn.functional.normalize(out.image_embeds, dim=-1)
        txt = torch.nn.functional.normalize(out.text_embeds, dim=-1)
        return 100 * img @ txt.T
