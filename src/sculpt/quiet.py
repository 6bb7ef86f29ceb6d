"""Keep third-party chatter that a user cannot act on off the terminal.

- transformers warns, on first use, that CLIPImageProcessor / SiglipImageProcessor fall back to their
  PIL versions because torchvision is absent. sculpt does not install torchvision on purpose (PyPI's
  build breaks beside the CPU torch, README), and never uses those processors' torchvision path, so
  the notice is dropped; every other transformers message passes.
- quiet_loading(): progress bars and notices while a model's weights load (the emoji world's BertModel
  in a StableDiffusionPipeline is expected, not a problem to report).
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager


class _NoTorchvisionFallbackNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


def install_filters() -> None:
    """Idempotent: attach the filter to the logger that emits the notice (no transformers import)."""
    logger = logging.getLogger("transformers.utils.import_utils")
    if not any(isinstance(f, _NoTorchvisionFallbackNotice) for f in logger.filters):
        logger.addFilter(_NoTorchvisionFallbackNotice())


@contextmanager
def quiet_loading():
    """Silence loading chatter: diffusers' and transformers' progress bars and warnings. Restores the
    caller's settings afterwards."""
    from diffusers.utils import logging as dlogging
    from transformers.utils import logging as tlogging

    bars = dlogging.is_progress_bar_enabled(), tlogging.is_progress_bar_enabled()
    levels = dlogging.get_verbosity(), tlogging.get_verbosity()
    dlogging.disable_progress_bar(), tlogging.disable_progress_bar()
    dlogging.set_verbosity_error(), tlogging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        dlogging.set_verbosity(levels[0]), tlogging.set_verbosity(levels[1])
        if bars[0]:
            dlogging.enable_progress_bar()
        if bars[1]:
            tlogging.enable_progress_bar()
