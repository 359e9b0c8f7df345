"""fasterdiff: FasterDiffusion (encoder propagation, parallel decoding, prior noise
injection) for Stable Diffusion 1.5-family diffusers pipelines.

    pipe = fasterdiff.load_pipeline("weights")
    fast = fasterdiff.accelerate(pipe)            # the paper's settings
    image = fast("a photo of a cat").images[0]
"""

from .pipeline import FasterDiffusionOutput, FasterDiffusionPipeline, Settings, accelerate
from .samplers import SAMPLER_NAMES
from .schedule import KeySteps, paper_key_steps
from .weights import load_pipeline

__all__ = [
    "FasterDiffusionOutput",
    "FasterDiffusionPipeline",
    "KeySteps",
    "SAMPLER_NAMES",
    "Settings",
    "accelerate",
    "load_pipeline",
    "paper_key_steps",
]
