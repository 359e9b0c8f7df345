"""fasterdiff: FasterDiffusion (encoder propagation, parallel decoding, prior noise
injection) and other UNet reuse plans for Stable Diffusion-family diffusers pipelines.

    pipe = fasterdiff.load_pipeline("weights")
    fast = fasterdiff.accelerate(pipe)            # the paper's settings
    image = fast("a photo of a cat").images[0]
"""

import logging as _logging


def _not_torchvision_fallback(record: _logging.LogRecord) -> bool:
    # Without torchvision, transformers 5 announces on import that CLIP's image processor
    # (the safety checker's feature extractor) falls back to its PIL version: the one SD
    # pipelines used before transformers 5, so the notice is only noise on every run.
    return "requires torchvision (not installed)" not in record.getMessage()


_logging.getLogger("transformers.utils.import_utils").addFilter(_not_torchvision_fallback)

from .pipeline import (  # noqa: E402
    FasterDiffusionOutput,
    FasterDiffusionPipeline,
    FasterDiffusionXLOutput,
    FasterDiffusionXLPipeline,
    Settings,
    accelerate,
)
from . import on_the_spot  # noqa: E402, F401  (calibrate=True: it hooks itself into the pipeline)
from .plan import ReusePlan, deep_plan, encoder_plan  # noqa: E402
from .reuse import RunStats  # noqa: E402
from .samplers import SAMPLER_NAMES  # noqa: E402
from .schedule import KeySteps, paper_key_steps  # noqa: E402
from .weights import load_pipeline  # noqa: E402

__all__ = [
    "FasterDiffusionOutput",
    "FasterDiffusionPipeline",
    "FasterDiffusionXLOutput",
    "FasterDiffusionXLPipeline",
    "KeySteps",
    "ReusePlan",
    "RunStats",
    "SAMPLER_NAMES",
    "Settings",
    "accelerate",
    "deep_plan",
    "encoder_plan",
    "load_pipeline",
    "paper_key_steps",
]
