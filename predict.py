"""Cog predictor: Stable Diffusion 1.5 sampled with FasterDiffusion.

A thin shell: typed inputs -> fasterdiff.service.Generator. Weights come from
weights/ ($FASTERDIFF_WEIGHTS overrides); see weights/README.md.
"""

import logging
import shutil
import tempfile
from typing import Optional

from cog import BaseRunner, Input, Path

from fasterdiff import SAMPLER_NAMES, load_pipeline
from fasterdiff.service import BOUNDS, KEY_STEP_MODES, OUTPUT_FORMATS, Generator, Request
from fasterdiff.weights import DOWNLOAD_COMMAND, WeightsUnavailable, download_weights, has_weights, weights_dir


class Predictor(BaseRunner):
    def setup(self) -> None:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        folder = weights_dir()
        if not has_weights(folder):
            print(f"no weights in {folder}; downloading Stable Diffusion 1.5 (about 2 GB)")
            try:
                download_weights(folder)
            except WeightsUnavailable as err:
                raise RuntimeError(
                    f"Stable Diffusion 1.5 weights are missing from {folder} and could not be downloaded "
                    f"({err.__cause__ or err}). Fetch them with: {DOWNLOAD_COMMAND}"
                ) from None
        self.generator = Generator(load_pipeline(folder, local_files_only=True))
        # One folder for outputs, emptied at the start of each prediction: cog has
        # read the previous prediction's files by then, and nothing piles up.
        self.out_dir = Path(tempfile.mkdtemp(prefix="fasterdiff-"))

    def run(
        self,
        prompt: str = Input(description="What to draw."),
        negative_prompt: str = Input(description="What to keep out of the image.", default=""),
        width: int = Input(
            description="Width in pixels, a multiple of 8.",
            default=512,
            ge=BOUNDS["width"][0],
            le=BOUNDS["width"][1],
        ),
        height: int = Input(
            description="Height in pixels, a multiple of 8.",
            default=512,
            ge=BOUNDS["height"][0],
            le=BOUNDS["height"][1],
        ),
        num_outputs: int = Input(
            description="Number of images to generate.",
            default=1,
            ge=BOUNDS["num_outputs"][0],
            le=BOUNDS["num_outputs"][1],
        ),
        sampler: str = Input(description="Sampler (scheduler).", default="DDIM", choices=list(SAMPLER_NAMES)),
        num_inference_steps: int = Input(
            description="Number of denoising steps.",
            default=50,
            ge=BOUNDS["num_inference_steps"][0],
            le=BOUNDS["num_inference_steps"][1],
        ),
        key_step_mode: str = Input(
            description=(
                "Which steps run the UNet encoder: 'non-uniform' = the paper's key steps "
                "(DDIM-50: 0,1,2,3,5,10,15,25,35), 'uniform' = every uniform_interval-th step, "
                "'custom' = custom_key_steps, 'off' = every step (stock sampling)."
            ),
            default="non-uniform",
            choices=list(KEY_STEP_MODES),
        ),
        uniform_interval: int = Input(
            description="With key_step_mode='uniform': run the encoder every this many steps.",
            default=5,
            ge=BOUNDS["uniform_interval"][0],
            le=BOUNDS["uniform_interval"][1],
        ),
        custom_key_steps: str = Input(
            description=(
                "With key_step_mode='custom': comma-separated, increasing 0-based step indices "
                "below num_inference_steps, starting with 0, e.g. '0,1,2,3,5,10,15,25,35'."
            ),
            default="",
        ),
        parallel: bool = Input(
            description="Run the decoders of adjacent non-key steps as one batch (faster, more memory).",
            default=True,
        ),
        noise_injection_strength: float = Input(
            description="Prior noise injection: z_t += strength * z_T in the second half of sampling (0 = off).",
            default=0.003,
            ge=BOUNDS["noise_injection_strength"][0],
            le=BOUNDS["noise_injection_strength"][1],
        ),
        guidance_scale: float = Input(
            description="Classifier-free guidance scale (1 = no guidance).",
            default=7.5,
            ge=BOUNDS["guidance_scale"][0],
            le=BOUNDS["guidance_scale"][1],
        ),
        seed: Optional[int] = Input(
            description="Random seed; leave empty for a random one (always logged).",
            default=None,
            ge=BOUNDS["seed"][0],
            le=BOUNDS["seed"][1],
        ),
        output_format: str = Input(description="Image file format.", default="webp", choices=list(OUTPUT_FORMATS)),
        output_quality: int = Input(
            description="Quality for webp and jpg (ignored for png).",
            default=80,
            ge=BOUNDS["output_quality"][0],
            le=BOUNDS["output_quality"][1],
        ),
        disable_safety_checker: bool = Input(
            description="Skip the safety checker that blanks NSFW images.",
            default=False,
        ),
        compare_with_baseline: bool = Input(
            description=(
                "Also sample stock Stable Diffusion 1.5 with the same seed; its images follow the "
                "accelerated ones and the logs give both times and the speedup."
            ),
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
            parallel=parallel,
            noise_injection_strength=noise_injection_strength,
            guidance_scale=guidance_scale,
            seed=seed,
            output_format=output_format,
            output_quality=output_quality,
            disable_safety_checker=disable_safety_checker,
            compare_with_baseline=compare_with_baseline,
        )
        shutil.rmtree(self.out_dir, ignore_errors=True)
        result = self.generator(request, self.out_dir)
        for message in result.messages:
            print(message)
        return [Path(p) for p in result.paths]
