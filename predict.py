"""Cog predictor: Stable Diffusion 1.5 sampled with FasterDiffusion: text-to-image, img2img
(an image) and inpainting (an image and a mask).

A thin shell: typed inputs -> fasterdiff.service.Generator, which validates them again
and does the work. Weights come from weights/ ($FASTERDIFF_WEIGHTS overrides); see
weights/README.md.

`cog build` reads this signature statically (cog 0.23): defaults, bounds, choices and
descriptions must stay plain literals, one string per description. They mirror
fasterdiff.service.BOUNDS and fasterdiff.SAMPLER_NAMES; tests check both.
"""

import logging
import pathlib
import shutil
import tempfile
from typing import Optional

from cog import BaseRunner, Input, Path

from fasterdiff import load_pipeline
from fasterdiff.service import Generator, Request, env_compile, env_flag, env_seconds
from fasterdiff.weights import ensure_weights, weights_dir

# the Cog image's weights: weights/ beside this file ($FASTERDIFF_WEIGHTS overrides)
WEIGHTS = pathlib.Path(__file__).resolve().with_name("weights")


class Predictor(BaseRunner):
    def setup(self) -> None:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        # FASTERDIFF_COMPILE=1 (or a torch.compile mode, e.g. reduce-overhead for CUDA graphs):
        # torch.compile the UNet (first calls compile; see docs/gpu.md).
        # FASTERDIFF_WARMUP: one thrown-away prediction here (default: on a GPU or when compiling).
        compile_unet = env_compile("FASTERDIFF_COMPILE")
        self.generator = Generator(load_pipeline(ensure_weights(weights_dir(WEIGHTS)), local_files_only=True), compile=compile_unet)
        # FASTERDIFF_CALIBRATE (default: on a GPU): where the weights have no plan for the default
        # sampler and steps, calibrate one now (quick search, at most FASTERDIFF_CALIBRATION_BUDGET
        # seconds, default 900; kept beside the weights or in $FASTERDIFF_CACHE); off: the paper's key steps.
        if env_flag("FASTERDIFF_CALIBRATE", self.generator.device.type == "cuda"):
            self.generator.calibrate(budget_s=env_seconds("FASTERDIFF_CALIBRATION_BUDGET", 900))
        if env_flag("FASTERDIFF_WARMUP", bool(compile_unet) or self.generator.device.type == "cuda"):
            seconds = self.generator.warm_up()
            logging.info("warm-up: %.1f s (compile: %s)", seconds, compile_unet)
        # One folder for outputs, emptied at the start of each prediction: cog has
        # read the previous prediction's files by then, and nothing piles up.
        self.out_dir = Path(tempfile.mkdtemp(prefix="fasterdiff-"))

    def run(
        self,
        prompt: str = Input(description="What to draw."),
        negative_prompt: str = Input(description="What to keep out of the image.", default=""),
        image: Optional[Path] = Input(
            description="Initial image for img2img (with mask: inpainting). The output takes its size, fitted within 1024 pixels and cut to multiples of 8; width and height are then not used. Transparent pixels count as white.",
            default=None,
        ),
        mask: Optional[Path] = Input(
            description="Inpainting mask, with image: white = repaint, black = keep; resized to the image's size where it differs.",
            default=None,
        ),
        prompt_strength: float = Input(
            description="With image: how far from it to go (1.0 = repaint entirely, lower keeps more of it); int(num_inference_steps x prompt_strength) steps run.",
            default=0.8,
            ge=0.0,
            le=1.0,
        ),
        width: int = Input(description="Width in pixels, a multiple of 8; at least 256 (half SD 1.5's native 512).", default=512, ge=256, le=1024),
        height: int = Input(description="Height in pixels, a multiple of 8; at least 256 (half SD 1.5's native 512).", default=512, ge=256, le=1024),
        num_outputs: int = Input(description="Number of images to generate.", default=1, ge=1, le=4),
        sampler: str = Input(
            description="Sampler (scheduler).",
            default="DDIM",
            choices=["DDIM", "DPM-Solver", "DPM-Solver++", "Euler", "Euler-Ancestral", "UniPC", "PNDM"],
        ),
        num_inference_steps: int = Input(description="Number of denoising steps.", default=50, ge=1, le=100),
        key_step_mode: str = Input(
            description="Which steps run the whole UNet: auto = the fastest plan calibrated on these weights whose images are at least as close to stock's as DeepCache interval 3's and within 35 dB pooled PSNR (the paper's key steps where none was calibrated), auto-fast = the same at DeepCache interval 5's level (faster, further from stock), non-uniform = the paper's key steps (DDIM-50: 0,1,2,3,5,10,15,25,35), uniform = every uniform_interval-th step, custom = custom_key_steps, off = every step (stock sampling).",
            default="auto",
            choices=["auto", "auto-fast", "non-uniform", "uniform", "custom", "off"],
        ),
        uniform_interval: int = Input(
            description="With key_step_mode=uniform: run the encoder every this many steps.", default=5, ge=2, le=10
        ),
        custom_key_steps: str = Input(
            description="With key_step_mode=custom: comma-separated, increasing 0-based UNet evaluation indices starting with 0, below num_inference_steps (PNDM: one more), e.g. 0,1,2,3,5,10,15,25,35.",
            default="",
        ),
        forecast: int = Input(
            description="How a non-key step gets the encoder's features: 0 = the last key step's (the paper), 1 = extrapolated linearly in the timestep from the last two key steps, 2 = quadratically from the last three. No extra UNet work; not with key_step_mode=auto or auto-fast (the plan file sets it).",
            default=0,
            ge=0,
            le=2,
        ),
        parallel: bool = Input(
            description="Run the decoders of adjacent non-key steps as one batch (faster, more memory).", default=True
        ),
        noise_injection_strength: float = Input(
            description="Prior noise injection: z_t += strength * z_T in the second half of sampling (0 = off; the paper uses 0.003; not with key_step_mode=off). Higher values cost fidelity (measured on a trained stand-in: prompt accuracy drops from 0.02 and collapses by 0.05).",
            default=0.003,
            ge=0.0,
            le=0.02,
        ),
        guidance_scale: float = Input(
            description="Classifier-free guidance scale (1 = no guidance).", default=7.5, ge=1.0, le=20.0
        ),
        seed: Optional[int] = Input(
            description="Random seed; leave empty for a random one (always logged).",
            default=None,
            ge=0,
            le=4294967295,
        ),
        output_format: str = Input(description="Image file format.", default="webp", choices=["webp", "jpg", "png"]),
        output_quality: int = Input(description="Quality for webp and jpg (ignored for png).", default=80, ge=1, le=100),
        disable_safety_checker: bool = Input(description="Skip the safety checker. With it, images it flags as NSFW are left out of the output (the logs say how many), and a prediction whose images are all flagged fails.", default=False),
        compare_with_baseline: bool = Input(
            description="Also sample stock Stable Diffusion 1.5 with the same seed; its images (files stock-<i>; the accelerated ones are out-<i>) follow the accelerated ones and the logs give both times and the speedup.",
            default=False,
        ),
    ) -> list[Path]:
        request = Request(
            prompt=prompt,
            negative_prompt=negative_prompt,
            width=width,
            height=height,
            num_outputs=num_outputs,
            sampler=sampler,
            num_inference_steps=num_inference_steps,
            key_step_mode=key_step_mode,
            uniform_interval=uniform_interval,
            custom_key_steps=custom_key_steps,
            forecast=forecast,
            parallel=parallel,
            noise_injection_strength=noise_injection_strength,
            guidance_scale=guidance_scale,
            seed=seed,
            output_format=output_format,
            output_quality=output_quality,
            disable_safety_checker=disable_safety_checker,
            compare_with_baseline=compare_with_baseline,
            image=image,
            mask=mask,
            prompt_strength=prompt_strength,
        )
        shutil.rmtree(self.out_dir, ignore_errors=True)
        result = self.generator(request, self.out_dir)
        for message in result.messages:
            print(message)
        return [Path(p) for p in result.paths]
