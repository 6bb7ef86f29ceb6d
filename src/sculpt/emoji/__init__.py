"""The emoji world: a small latent text-to-image model with Stable Diffusion's component classes,
trained by this package on colour emoji, plus the classifier and image-text scorer that evaluate it.

The default model of the project ("emoji") is loaded with `sculpt.emoji.pipeline.load_emoji_pipeline`.
"""
