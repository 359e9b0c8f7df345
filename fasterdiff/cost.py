"""What a reuse plan costs: UNet FLOPs (counted by torch on the model at hand) and a
GPU-time model built from measured timings.

GPU-time model. Measured on an NVIDIA H200 (SD 1.5's UNet, fp16, 512x512, guidance 7.5,
DDIM-50; ../shared/measurements/gpu-h200-2026-11-26, the timing script's medians),
one and four images per prompt. A sampling run is a sequence of UNet calls; a call costs

- ``full``: a whole UNet evaluation (stock: 1.393 s / 50 at one image, 1.962 s / 50 at four);
- ``decoder``: a step whose encoder replays, on its own (paper sequential: 1.097 s =
  9 full + 41 decoder at one image; 1.136 s at four);
- ``shallow``: a DeepCache step, only the shallow path (interval 5: 0.390 s = 10 full + 40
  shallow; 0.604 s at four);
- ``per_batched_step``: each further step batched into one call (paper parallel: 0.389 s
  = 9 calls + 41 batched steps; 0.965 s at four).

One image is bound by kernel launches (a batched step costs a tenth of a call); four are
bound by arithmetic. Checked on rows it was not fitted on: DeepCache interval 3, model
0.57 s vs 0.576 s measured (four images: 0.84 vs 0.773 s); uniform-5 parallel, model
0.41 s vs 0.361 s (four images: 0.99 vs 0.949 s). It ranks plans; it is not a timing.
"""

from __future__ import annotations

import contextlib

import torch
from diffusers.models.attention_processor import AttnProcessor
from torch.utils.flop_counter import FlopCounterMode

from .plan import ReusePlan

_FULL_1, _FULL_4 = 1.393 / 50, 1.962 / 50
GPU_SECONDS = {
    1: {
        "full": _FULL_1,
        "decoder": (1.097 - 9 * _FULL_1) / 41,
        "shallow": (0.390 - 10 * _FULL_1) / 40,
        "per_batched_step": (0.389 - 9 * _FULL_1) / 41,
    },
    4: {
        "full": _FULL_4,
        "decoder": (1.136 - 9 * _FULL_4) / 41,
        "shallow": (0.604 - 10 * _FULL_4) / 40,
        "per_batched_step": (0.965 - 9 * _FULL_4) / 41,
    },
}
GPU_MODEL_SOURCE = "H200, SD 1.5 UNet fp16 512px (shared/measurements/gpu-h200-2026-11-26)"


def unet_calls(plan: ReusePlan, parallel: bool) -> list[tuple[int, int]]:
    """The UNet calls a run makes: (first step, steps answered) each; parallel runs answer a
    whole group per call (max_batch=None: the model ignores memory-bounded chunking)."""
    if not parallel:
        return [(i, 1) for i in range(plan.num_steps)]
    return [(group.start, len(group)) for group in plan.groups]


def gpu_seconds(plan: ReusePlan, parallel: bool, images: int = 1, deep: bool = False) -> float:
    """Modelled seconds of one sampling run on the measured GPU (see the module doc)."""
    c = GPU_SECONDS[images]
    total = 0.0
    for first, steps in unet_calls(plan, parallel):
        if not plan.replay[first]:
            total += c["full"]
        else:
            total += c["shallow"] if deep else c["decoder"]
        total += (steps - 1) * c["per_batched_step"]
    return total


@torch.no_grad()
def step_flops(unet, replay: frozenset[str], sample: torch.Tensor, timestep, encoder_hidden_states) -> int:
    """FLOPs of one UNet evaluation that replays ``replay`` (empty: a whole evaluation)."""
    from .reuse import ReuseExecutor, Run, UNetView

    replay = frozenset(replay)
    plan = ReusePlan((frozenset(), replay))
    timesteps = torch.tensor([timestep, timestep])
    executor = ReuseExecutor()
    view = UNetView(unet, executor)
    with countable_attention(unet), executor.running(unet, Run(plan, False, None, lambda: timesteps)):
        view(sample, timesteps[0], encoder_hidden_states=encoder_hidden_states)
        with FlopCounterMode(display=False) as counter:
            view(sample, timesteps[0], encoder_hidden_states=encoder_hidden_states)
    return counter.get_total_flops()


@contextlib.contextmanager
def countable_attention(unet):
    """Attention through plain matmuls, which torch's FLOP counter sees (it skips fused SDPA on CPU)."""
    saved = unet.attn_processors
    unet.set_attn_processor(AttnProcessor())
    try:
        yield
    finally:
        unet.set_attn_processor(saved)


def flops_fraction(plan: ReusePlan, full: int, per_replay: dict[frozenset, int]) -> float:
    """The plan's UNet FLOPs relative to stock, from FLOPs per kind of step."""
    total = sum(full if not r else per_replay[r] for r in plan.replay)
    return total / (full * plan.num_steps)
