"""A small CNN that names the class of an emoji-world picture: the detector behind forgetting and
preservation accuracy (the role ResNet-50 plays for Imagenette in the paper), and, through its
penultimate features, the feature space of an FID analogue.

    clf = load_classifier()
    logits = clf.predict(images)   # images: PIL list, numpy or Tensor[B, 3, 32, 32] in [0, 1]
    feats = clf.features(images)   # [B, 128]
"""

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from sculpt.emoji.images import to_image_batch
from sculpt.emoji.taxonomy import load_taxonomy

WEIGHTS_PATH = Path(__file__).resolve().parent / "weights" / "classifier.safetensors"


def conv_stage(c_in: int, c_out: int) -> nn.Sequential:
    """Two 3x3 convolutions, then halve the resolution."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class EmojiClassifier(nn.Module):
    def __init__(self, num_classes: int, width: int = 32):
        super().__init__()
        self.config = {"num_classes": num_classes, "width": width}
        # 32 -> 16 -> 8 -> 4, then global average pooling.
        self.body = nn.Sequential(conv_stage(3, width), conv_stage(width, 2 * width), conv_stage(2 * width, 4 * width))
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(4 * width, num_classes)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images * 2 - 1).mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_classes] for a Tensor[B, 3, 32, 32] in [0, 1] (training path, keeps gradients)."""
        return self.head(self.dropout(self.forward_features(images)))

    @torch.no_grad()
    def predict(self, images) -> torch.Tensor:
        """Logits [B, num_classes] for any batch of pictures (see sculpt.emoji.images.to_image_batch)."""
        self.eval()
        return self(to_image_batch(images).to(self.head.weight.device))

    @torch.no_grad()
    def features(self, images) -> torch.Tensor:
        """Penultimate features [B, 4 * width] (128 by default), for Frechet distances."""
        self.eval()
        return self.forward_features(to_image_batch(images).to(self.head.weight.device))


def save_classifier(model: EmojiClassifier, path: str | Path = WEIGHTS_PATH) -> None:
    metadata = {"config": json.dumps(model.config), "classes": json.dumps(load_taxonomy().names)}
    state = {k: v.detach().half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata=metadata)


def load_classifier(path: str | Path | None = None, device: str | torch.device = "cpu") -> EmojiClassifier:
    path = Path(path) if path is not None else WEIGHTS_PATH
    if not path.exists():
        raise FileNotFoundError(f"no emoji classifier at {path}; train it with scripts/emoji_train.sh")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    if json.loads(metadata["classes"]) != load_taxonomy().names:
        raise ValueError(f"{path} was trained on other classes than assets/taxonomy.json lists; retrain it")
    model = EmojiClassifier(**json.loads(metadata["config"]))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()})
    return model.eval().to(device)
