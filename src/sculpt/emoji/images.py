"""One conversion for every picture the emoji evaluators read: whatever a pipeline or the dataset gives
(PIL pictures, a numpy batch from output_type="np", a tensor from output_type="pt") becomes a float
Tensor[B, 3, 32, 32] in [0, 1]."""

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGE_SIZE = 32


def to_image_batch(images, size: int = IMAGE_SIZE) -> torch.Tensor:
    """PIL picture(s) | ndarray [B,H,W,3] or [H,W,3] in [0,1] | Tensor [B,3,H,W] or [3,H,W] in [0,1]
    -> float Tensor[B, 3, size, size] in [0, 1] (resized with antialiasing if needed)."""
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, (list, tuple)):
        if all(isinstance(im, torch.Tensor) for im in images):
            batch = torch.stack(list(images))
        else:
            arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]
            batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    elif isinstance(images, np.ndarray):
        batch = torch.from_numpy(np.asarray(images, dtype=np.float32))
        batch = batch.unsqueeze(0) if batch.ndim == 3 else batch
        batch = batch.permute(0, 3, 1, 2)
    elif isinstance(images, torch.Tensor):
        batch = images.unsqueeze(0) if images.ndim == 3 else images
    else:
        raise TypeError(f"cannot read pictures from a {type(images).__name__}")
    if batch.ndim != 4 or batch.shape[1] != 3:
        raise ValueError(f"expected RGB pictures, got a batch of shape {tuple(batch.shape)}")
    batch = batch.float()
    if batch.shape[-2:] != (size, size):
        batch = F.interpolate(batch, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return batch.clamp(0, 1).contiguous()
