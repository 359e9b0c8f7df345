"""Every default and bound, in one place: the library (:class:`fasterdiff.Settings`,
:func:`fasterdiff.accelerate`), the service's :class:`~fasterdiff.service.Request` and the
command line read them from here. ``predict.py`` repeats them as plain literals (cog reads
its signature statically); a test ties those literals to this module.
"""

from __future__ import annotations

# -- the library: how to accelerate ------------------------------------------------------
KEY_STEPS = "auto"  # the calibrated plan; the paper's key steps where none was calibrated
REUSE = "encoder"  # FasterDiffusion's encoder propagation ("deep": DeepCache-style)
PARALLEL = None  # batch a group's decoders whenever the plan allows it
MAX_BATCH = "auto"  # steps per batched call chosen by memory (see fasterdiff.reuse)
NOISE_INJECTION = 0.003  # the paper's alpha
NOISE_INJECTION_START = 500  # inject below this timestep (of 1000): the second half
BRANCH = 0  # DeepCache's cache_branch_id
FORECAST = 0  # replay the last computed features (the paper)

# -- the service (Cog predictor and CLI) ---------------------------------------------------
SAMPLER = "DDIM"
NUM_INFERENCE_STEPS = 50
KEY_STEP_MODE = "auto"
KEY_STEP_MODES = ("auto", "auto-fast", "non-uniform", "uniform", "custom", "off")
UNIFORM_INTERVAL = 5
GUIDANCE_SCALE = 7.5
NUM_OUTPUTS = 1
OUTPUT_FORMAT = "webp"
OUTPUT_FORMATS = ("webp", "jpg", "png")
OUTPUT_QUALITY = 80
PROMPT_STRENGTH = 0.8  # img2img / inpainting: how far from the init image (1 = all the way to noise)
MAX_SEED = 2**32 - 1
MAX_PROMPT_CHARS = 10_000  # far beyond 77 tokens; longer text is refused, not tokenized
MAX_INPUT_IMAGE_PIXELS = 2048 * 2048  # an init image or mask larger than this is refused

# Numeric inputs of a request: name -> (min, max). Sizes must also be multiples of 8 and at
# least half the model's native size (service.Generator.min_size); predict.py's sizes start
# at 256, half SD 1.5's 512.
BOUNDS = {
    "width": (32, 1024),
    "height": (32, 1024),
    "num_outputs": (1, 4),
    "num_inference_steps": (1, 100),
    "uniform_interval": (2, 10),
    "forecast": (0, 2),
    # the paper's 0.003 and up to ~7x it: on the stand-in (paper key steps, DDIM-50) prompt accuracy
    # is 0.600 at 0.003, 0.494 at 0.02, 0.194 at 0.05, 0.050 at 0.1 (docs/noise-injection.md)
    "noise_injection_strength": (0.0, 0.02),
    "prompt_strength": (0.0, 1.0),
    "guidance_scale": (1.0, 20.0),
    "seed": (0, MAX_SEED),
    "output_quality": (1, 100),
}
