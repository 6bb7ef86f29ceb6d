"""Picture helpers: tensors to PIL, labelled grids (prompt rows x model columns)."""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw, ImageFont


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [0, 1] -> PIL images."""
    arr = (images.clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in arr]


def label_font(size: int = 14) -> ImageFont.ImageFont:
    """Pillow's bundled TrueType font at a legible size (its 10-pixel default squeezes a space to
    two pixels: "a photo of a fish" read as "a photoofa fish")."""
    return ImageFont.load_default(size=size)


def fit_text(draw: ImageDraw.ImageDraw, text: str, width: int, font) -> str:
    """`text`, shortened with an ellipsis until it fits in `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def image_grid(
    rows: list[list[Image.Image]],
    row_labels: list[str] | None = None,
    col_labels: list[str] | None = None,
    cell: int = 96,
    label_width: int = 220,
    font_size: int = 14,
) -> Image.Image:
    """A grid of equally sized cells, with optional labels on the left and on top."""
    font = label_font(font_size)
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    left = label_width if row_labels else 0
    top = font_size + 10 if col_labels else 0
    grid = Image.new("RGB", (left + n_cols * cell, top + n_rows * cell), "white")
    draw = ImageDraw.Draw(grid)
    for j, label in enumerate(col_labels or []):
        draw.text((left + j * cell + 4, 4), fit_text(draw, label, cell - 8, font), fill="black", font=font)
    for i, row in enumerate(rows):
        if row_labels:
            draw.text((6, top + i * cell + cell // 2), fit_text(draw, row_labels[i], label_width - 12, font),
                      fill="black", font=font, anchor="lm")
        for j, img in enumerate(row):
            grid.paste(img.convert("RGB").resize((cell, cell), Image.NEAREST), (left + j * cell, top + i * cell))
    return grid


def strip(images: list[Image.Image]) -> Image.Image:
    """Equally sized square pictures side by side, unlabelled: the storage form of one grid row."""
    side = images[0].height
    out = Image.new("RGB", (side * len(images), side), "white")
    for j, img in enumerate(images):
        out.paste(img.convert("RGB").resize((side, side), Image.NEAREST), (j * side, 0))
    return out


def split_strip(image: Image.Image) -> list[Image.Image]:
    """The pictures of a strip() again."""
    side = image.height
    return [image.crop((j * side, 0, (j + 1) * side, side)) for j in range(image.width // side)]
