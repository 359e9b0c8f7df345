"""fasterdiff: FasterDiffusion (encoder propagation, parallel decoding, prior noise
injection) and other UNet reuse plans for Stable Diffusion-family diffusers pipelines.

    pipe = fasterdiff.load_pipeline("weights")
    fast = fasterdiff.accelerate(pipe)            # the paper's settings
    image = fast("a photo of a cat").images[0]
"""

from .pipeline import (
    FasterDiffusionOutput,
    FasterDiffusionPipeline,
    FasterDiffusionXLOutput,
    FasterDiffusionXLPipeline,
    Settings,
    accelerate,
)
from .plan import ReusePlan, deep_plan, encoder_plan
from .reuse import RunStats
from .samplers import SAMPLER_NAMES
from .schedule import KeySteps, paper_key_steps
from .weights import load_pipeline

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
