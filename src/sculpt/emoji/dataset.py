"""Pictures and captions of the emoji world, rendered on the fly from the committed sprite atlas.

Every sample is a pure function of (seed, index): the same pair always gives the same picture and
caption, so training resumes exactly and evaluation sets are reproducible without storing images.
Index i shows class `classes[i % len(classes)]`, so any run of consecutive indices is class-balanced.

    ds = EmojiDataset(seed=0)
    ds[7]  # {"pixel_values": Tensor[3, 32, 32] in [0, 1], "class_id": 7, "caption": "a photo of a radio", ...}
    render(class_id=0, seed=3)  # one 32x32 RGB PIL picture of a tropical fish
"""

from functools import cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sculpt.emoji.taxonomy import EmojiClass, load_taxonomy

ATLAS_PATH = Path(__file__).resolve().parent / "assets" / "atlas.png"
IMAGE_SIZE = 32
# Augmentations are drawn on a 64 px canvas and downsampled, which antialiases rotated edges.
CANVAS_SIZE = 64

TEMPLATES = ["{}", "a photo of {}", "an emoji of {}", "a drawing of {}", "a picture of {}"]
# Plural or uncountable caption words take no article: "a photo of grapes", not "a photo of a grapes".
NO_ARTICLE = {"grapes", "crossed swords", "swords", "two swords", "archery", "skydiving", "golf", "tennis"}
EMPTY_CAPTION_PROB = 0.1  # unconditional samples, for classifier-free guidance
SUPERCLASS_CAPTION_PROB = 0.2
SYNONYM_CAPTION_PROB = 0.3


def with_article(word: str) -> str:
    if word in NO_ARTICLE:
        return word
    vowel = word[0] in "aeiou" and not word.startswith("eu")
    return ("an " if vowel else "a ") + word


def caption_words(emoji_class: EmojiClass) -> list[tuple[str, str]]:
    """Every word a caption may use for this class, with its level: ("class" | "superclass")."""
    words = [(emoji_class.name, "class")] + [(s, "class") for s in emoji_class.synonyms]
    return words + [(emoji_class.superclass, "superclass")]


def fill_template(template: str, word: str) -> str:
    # The bare template gives the bare word ("poodle"); the others read as phrases ("a photo of a poodle").
    return word if template == "{}" else template.format(with_article(word))


def class_prompt(name: str) -> str:
    """The canonical prompt for a class, "a photo of a poodle": what evaluation asks the model to draw."""
    return fill_template("a photo of {}", name)


def all_captions() -> list[str]:
    """Every caption the dataset can produce, including the empty one (for caching text embeddings)."""
    captions = {""}
    for c in load_taxonomy().classes:
        for word, _ in caption_words(c):
            captions.update(fill_template(t, word) for t in TEMPLATES)
            captions.add(with_article(word))
    return sorted(captions)


def sample_caption(emoji_class: EmojiClass, rng: np.random.Generator,
                   empty_prob: float = EMPTY_CAPTION_PROB) -> tuple[str, str]:
    """A random caption for a picture of this class, and its level ("class" | "superclass" | "empty")."""
    u = rng.random()
    if u < empty_prob:
        return "", "empty"
    if u < empty_prob + SUPERCLASS_CAPTION_PROB:
        word, level = emoji_class.superclass, "superclass"
    elif u < empty_prob + SUPERCLASS_CAPTION_PROB + SYNONYM_CAPTION_PROB:
        word, level = emoji_class.synonyms[rng.integers(len(emoji_class.synonyms))], "class"
    else:
        word, level = emoji_class.name, "class"
    # Half of the bare captions keep their article ("a poodle"), the way people write short prompts.
    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    if template == "{}" and rng.random() < 0.5:
        return with_article(word), level
    return fill_template(template, word), level


@cache
def load_sprites(path: Path = ATLAS_PATH) -> tuple[Image.Image, ...]:
    atlas = Image.open(path).convert("RGBA")
    taxonomy = load_taxonomy()
    cols, size = atlas.width // CANVAS_SIZE, CANVAS_SIZE
    return tuple(
        atlas.crop(((i % cols) * size, (i // cols) * size, (i % cols + 1) * size, (i // cols + 1) * size))
        for i in range(len(taxonomy))
    )


def render_with_rng(class_id: int, rng: np.random.Generator) -> Image.Image:
    """Composite one augmented sprite on a coloured background: scale, rotation, shift, colour."""
    sprite = load_sprites()[class_id]
    side = int(round(CANVAS_SIZE * rng.uniform(0.6, 0.95)))
    sprite = sprite.resize((side, side), Image.LANCZOS)
    sprite = sprite.rotate(rng.uniform(-15, 15), resample=Image.BICUBIC, expand=True)
    # Half of the backgrounds are light (the usual emoji look), half any colour, so the model learns that
    # the background is not part of the concept.
    if rng.random() < 0.5:
        background = tuple(int(v) for v in rng.integers(200, 256, size=3))
    else:
        background = tuple(int(v) for v in rng.integers(0, 256, size=3))
    canvas = Image.new("RGBA", (CANVAS_SIZE, CANVAS_SIZE), background + (255,))
    # Centre, then jitter by up to 6 px; rotation with expand may make the sprite larger than the canvas.
    x = (CANVAS_SIZE - sprite.width) // 2 + int(rng.integers(-6, 7))
    y = (CANVAS_SIZE - sprite.height) // 2 + int(rng.integers(-6, 7))
    canvas.paste(sprite, (x, y), sprite)
    return canvas.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.LANCZOS)


def sample_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, index])


def render(class_id: int, seed: int) -> Image.Image:
    """One 32x32 RGB picture of class `class_id`; the same seed always gives the same picture."""
    return render_with_rng(class_id, sample_rng(seed, class_id))


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL picture -> float Tensor[3, H, W] in [0, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def render_batch(class_ids: list[int], seed: int) -> torch.Tensor:
    """Tensor[B, 3, 32, 32] in [0, 1]: picture i shows class_ids[i], augmented by (seed, i).

    The augmentation follows the position in the batch, as in the dataset stream, so repeating a class in
    one batch gives different pictures of it (render(k, seed) is augmented by (seed, k) instead)."""
    return torch.stack([pil_to_tensor(render_with_rng(k, sample_rng(seed, i))) for i, k in enumerate(class_ids)])


class EmojiDataset(torch.utils.data.Dataset):
    """Augmented pictures of the emoji world with varied captions; sample i is a function of (seed, i)."""

    def __init__(self, seed: int = 0, length: int = 10**9, classes: list[int] | None = None,
                 empty_caption_prob: float = EMPTY_CAPTION_PROB):
        self.seed = seed
        self.length = length
        self.taxonomy = load_taxonomy()
        self.classes = list(range(len(self.taxonomy))) if classes is None else list(classes)
        self.empty_caption_prob = empty_caption_prob

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        rng = sample_rng(self.seed, index)
        class_id = self.classes[index % len(self.classes)]
        image = render_with_rng(class_id, rng)
        caption, level = sample_caption(self.taxonomy[class_id], rng, self.empty_caption_prob)
        return {"pixel_values": pil_to_tensor(image), "class_id": class_id, "caption": caption, "caption_level": level}

    def batch(self, start: int, size: int) -> dict:
        """Samples start .. start+size-1, collated: how the training loops read the stream."""
        return torch.utils.data.default_collate([self[i] for i in range(start, start + size)])
