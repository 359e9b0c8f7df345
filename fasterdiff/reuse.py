"""Carry out a reuse plan while diffusers' own ``unet(...)`` runs.

Two pieces, both installed for one pipeline call and removed after it:

- a wrapper on the ``forward`` of every module the plan replays: it computes and
  keeps the output, or returns the kept one, as the current evaluation asks;
- a view of the UNet that the pipeline calls instead of the UNet itself. It counts
  evaluations and, where the plan allows it, answers a key step and the non-key
  steps after it with ONE batched ``unet(...)`` call: the latent repeated once per
  step, each copy with its own timestep. Inside that call the replayed modules
  compute on the key step's rows only and hand every step the same output. The
  later steps of the group are then answered from that batch without computing:
  their noise prediction does not depend on their own latent.

Everything that computes goes through the real ``unet(...)``, so forward hooks,
``torch.compile``, model offloading and adapters on the UNet see every evaluation
that does any work.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass

import torch
from diffusers.utils import BaseOutput

from . import unet as unet_layout
from .plan import ReusePlan, forecast_weights

log = logging.getLogger("fasterdiff")


@dataclass
class RunStats:
    """What one sampling run did, counted in UNet evaluations (one per step the pipeline
    takes; PNDM makes one more than num_inference_steps; img2img and inpainting only the
    steps their strength leaves)."""

    num_steps: int  # UNet evaluations the plan covers
    key_steps: tuple[int, ...]
    full_evaluations: int = 0  # evaluations that computed every module of the UNet (the key steps)
    unet_calls: int = 0  # unet(...) calls that computed something (a batched call counts once)
    steps_per_call: list[int] = field(default_factory=list)  # evaluations each of those calls answered
    controlnet_evaluations: int = 0  # ControlNet forwards that computed (per net), where the pipeline has one
    out_of_memory_retries: int = 0
    denoise_seconds: float = 0.0
    seconds: float = 0.0
    plan: str = ""  # with key_steps="auto": which plan ran and why
    decoded_in_float32: bool = False  # the VAE overflowed in half precision and decoded again

    @property
    def reused_evaluations(self) -> int:
        """Evaluations that replayed (or forecast) some modules instead of computing them."""
        return self.num_steps - self.full_evaluations

    # the names of the previous release, which said "encoder" and "decoder" for every plan
    encoder_calls = property(lambda self: _renamed("encoder_calls", "full_evaluations", self.full_evaluations))
    encoder_calls_saved = property(lambda self: _renamed("encoder_calls_saved", "reused_evaluations", self.reused_evaluations))
    decoder_calls = property(lambda self: _renamed("decoder_calls", "unet_calls", self.unet_calls))
    decoder_steps_per_call = property(lambda self: _renamed("decoder_steps_per_call", "steps_per_call", self.steps_per_call))

    def as_dict(self) -> dict:
        return {
            "num_steps": self.num_steps,
            "key_steps": list(self.key_steps),
            "full_evaluations": self.full_evaluations,
            "reused_evaluations": self.reused_evaluations,
            "unet_calls": self.unet_calls,
            "steps_per_call": list(self.steps_per_call),
            "controlnet_evaluations": self.controlnet_evaluations,
            "out_of_memory_retries": self.out_of_memory_retries,
            "denoise_seconds": round(self.denoise_seconds, 4),
            "seconds": round(self.seconds, 4),
            "plan": self.plan,
            "decoded_in_float32": self.decoded_in_float32,
        }


def _renamed(old: str, new: str, value):
    warnings.warn(f"RunStats.{old} is now RunStats.{new}; the old name goes in the next release", DeprecationWarning, stacklevel=3)
    return value


def is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError):
        return True
    msg = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


@dataclass(frozen=True)
class _Evaluation:
    """What the current ``unet(...)`` call is: ``steps`` steps of ``rows`` rows each."""

    replay: frozenset[str]  # modules the call's non-key steps take from the cache
    first: int  # the call's first step
    real: int  # steps the call answers
    steps: int  # steps in the batch: ``real``, or more when padded to a fixed size
    rows: int
    fresh: bool  # the first ``rows`` rows are a key step: replayed modules compute there


@dataclass
class Run:
    """The state of one accelerated pipeline call (nothing survives it)."""

    plan: ReusePlan
    parallel: bool
    steps_per_call: int | str | None  # None: a whole group per call; "auto": by memory
    timesteps: Callable[[], torch.Tensor]  # the scheduler's, read at the first evaluation
    pad_sizes: tuple[int, ...] | None = None  # batch only these step counts (compiled UNets)
    keep_copies: bool = False  # keep copies of outputs (a compiled UNet's CUDA graphs reuse their output memory)
    stats: RunStats = None
    next_step: int = 0
    stash: dict = field(default_factory=dict)  # step -> (timestep, noise prediction)
    cache: dict = field(default_factory=dict)  # module name -> [(timestep, output)] of its last computations
    control: dict = field(default_factory=dict)  # ControlNet index -> (scale, down residuals, mid residual)
    control_blocks: dict = field(default_factory=dict)  # (ControlNet index, block name) -> its last output
    deltas: dict = field(default_factory=dict)  # module name -> previous minus last kept output (linear forecasts)
    live: dict = field(default_factory=dict)  # replayed set -> those of its modules whose outputs are read

    def __post_init__(self):
        if self.parallel and not self.plan.batchable:
            raise ValueError("parallel=True needs a plan whose non-key steps read no latent of their own")
        self.stats = RunStats(num_steps=self.plan.num_steps, key_steps=self.plan.key_steps)


class ReuseExecutor:
    """Wrappers for one UNet; :meth:`running` activates them for one :class:`Run`.

    The wrapper functions are made once per executor and reinstalled as the same
    objects each call, so a compiled UNet sees the same code every time.
    """

    def __init__(self):
        self.run: Run | None = None
        self.evaluation: _Evaluation | None = None
        # max_batch="auto": steps per call by the sample's shape, device and dtype, measured on the
        # first call of each (once: a CUDA graph's replay allocates nothing new, so a later measurement
        # would not see it), lowered when a batch of that size ran out of memory
        self.auto_steps: dict[tuple, int] = {}
        self.shape: tuple | None = None  # the current run's sample (shape, device, dtype)
        self.device: torch.device | None = None
        self._wrappers: dict[tuple[int, str], Callable] = {}
        self._memo: dict = {}
        self.base = None  # the UNet of the current run (under torch.compile's wrapper)

    # -- installing -----------------------------------------------------------------

    def running(self, unet, run: Run) -> _Installed:
        return _Installed(self, unet, run)

    def _wrapper(self, base, name: str, original: Callable) -> Callable:
        key = (id(base), name)
        entry = self._wrappers.get(key)
        if entry is not None and entry[0] is original:
            return entry[1]

        # The choice (compute, compute on the key rows, replay) is made here in Python,
        # outside any compiled graph: under torch.compile each module's own forward is
        # compiled on its own, so graphs depend on shapes, not on the plan.
        @torch.compiler.disable(recursive=False)
        def forward(*args, **kwargs):
            ev = self.evaluation
            if ev is None or name not in ev.replay:
                out = original(*args, **kwargs)
                if ev is not None and ev.steps == 1:
                    self._keep(name, out)
                return out
            if ev.fresh:
                args, kwargs = _take_rows((args, kwargs), ev.rows * ev.steps, ev.rows)
                self._keep(name, original(*args, **kwargs))
            return self._replayed(name, ev)

        self._wrappers[key] = (original, forward)
        return forward

    @torch.compiler.disable
    def _keep(self, name: str, out) -> None:
        """Record a computation of one step (the call's first) for later replays."""
        run, ev = self.run, self.evaluation
        history = run.cache.setdefault(name, [])
        if run.keep_copies:
            out = _map_tensors(out, torch.clone)
        if "time" not in self._memo:  # one read of the timestep per evaluation, not per module
            self._memo["time"] = float(run.timesteps()[ev.first])
        history.append((self._memo["time"], out))
        del history[: -run.plan.history]
        run.deltas.pop(name, None)

    @torch.compiler.disable
    def _replayed(self, name: str, ev: _Evaluation):
        """The module's output for every step of the call, from its kept computations."""
        run = self.run
        history = run.cache.get(name)
        if not history:
            raise RuntimeError(f"reuse plan replays {name!r} before any step computed it")
        weights, last_only = self._weights(tuple(t for t, _ in history))
        if last_only or name not in self._live(ev.replay):  # no module that computes reads a dead one's output
            return _repeat_rows(history[-1][1], ev.steps)
        if len(history) == 2 and len(weights) == 1:  # one step, linear: last + w * (previous - last)
            delta = run.deltas.get(name)
            if delta is None:
                delta = run.deltas[name] = _zip_map(_difference, [history[0][1], history[1][1]])
            return _zip_map(lambda last, d: last if d is None else torch.add(last, d, alpha=weights[0][0]), [history[1][1], delta])
        return _weighted_rows([out for _, out in history], weights)

    def _live(self, replay: frozenset[str]) -> frozenset[str]:
        """The replayed modules whose outputs a computing module reads (:func:`fasterdiff.unet.live_outputs`), once per run and set."""
        live = self.run.live.get(replay)
        if live is None:
            live = self.run.live[replay] = unet_layout.live_outputs(self.base, replay)
        return live

    def _weights(self, times: tuple[float, ...]) -> tuple[list[list[float]], bool]:
        """Each row's forecast weights over kept computations at ``times`` (the same for every
        module of the evaluation: worked out once), and whether all take the last one as it is."""
        memo = self._memo.get(times)
        if memo is not None:
            return memo
        run, ev = self.run, self.evaluation
        timesteps = run.timesteps()
        last = [0.0] * (len(times) - 1) + [1.0]
        weights = []
        for step in range(ev.first, ev.first + ev.real):
            if ev.fresh and step == ev.first:  # the key step's own rows: what it just computed
                weights.append(last)
            else:
                order, damping = run.plan.forecast[step], run.plan.damping[step]
                weights.append(forecast_weights(times, float(timesteps[step]), order, damping))
        weights += [weights[-1]] * (ev.steps - ev.real)  # padding rows: discarded
        memo = self._memo[times] = (weights, all(w == last for w in weights))
        return memo

    # -- the UNet view's call -------------------------------------------------------

    def evaluate(self, unet, args: tuple, kwargs: dict):
        run = self.run
        i = run.next_step
        if i >= run.plan.num_steps:
            raise RuntimeError(f"the pipeline made more UNet evaluations than the {run.plan.num_steps} planned")
        sample, timestep = _argument(args, kwargs, 0, "sample"), _argument(args, kwargs, 1, "timestep")
        return_dict = kwargs.get("return_dict", True)
        if i in run.stash:
            expected, eps = run.stash.pop(i)
            if _same_timestep(expected, timestep) and eps.shape[0] == sample.shape[0]:
                run.next_step += 1
                return _as_unet_output(eps, return_dict)
            log.warning("step %d: the pipeline's timestep differs from the scheduler's; computing it on its own", i)
            run.stash.clear()
            run.parallel = False
        if self.shape is None:
            self.shape, self.device = (tuple(sample.shape), str(sample.device), sample.dtype), sample.device
        steps = self._steps_for(i, timestep)
        rows = sample.shape[0]
        while True:
            try:
                eps = self._compute(unet, args, kwargs, i, steps, rows)
                break
            except RuntimeError as err:  # torch.OutOfMemoryError is a RuntimeError
                if steps == 1 or not is_out_of_memory(err):
                    raise
            # retried outside the except block, once the failed attempt's tensors are freed
            run.stats.out_of_memory_retries += 1
            log.warning("a batch of %d steps ran out of memory; retrying with %d", steps, steps // 2)
            steps //= 2
            # the size that failed is not tried again: in this run, nor by max_batch="auto" for this shape
            run.steps_per_call = steps
            if self.auto_steps.get(self.shape, 0) > steps:
                self.auto_steps[self.shape] = steps
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        chunks = eps.chunk(steps) if steps > 1 else (eps,)
        timesteps = run.timesteps()
        for j in range(1, steps):
            run.stash[i + j] = (timesteps[i + j], chunks[j])
        run.next_step += 1
        return _as_unet_output(chunks[0], return_dict)

    def _steps_for(self, i: int, timestep) -> int:
        """How many steps from ``i`` on one call answers."""
        run = self.run
        if not run.parallel:
            return 1
        timesteps = run.timesteps()
        if len(timesteps) < run.plan.num_steps or not _same_timestep(timesteps[i], timestep):
            log.warning("the pipeline's timesteps differ from the scheduler's; decoding steps one by one")
            run.parallel = False
            return 1
        group = next(g for g in run.plan.groups if i in g)
        steps = group.stop - i
        if run.steps_per_call == "auto":
            if not _memory_known(self):
                return 1  # the first call runs alone and measures what one step needs
            run.steps_per_call = self.auto_steps[self.shape]
        if run.pad_sizes:
            steps = min(steps, max(run.pad_sizes))
        return steps if run.steps_per_call is None else min(steps, run.steps_per_call)

    def _compute(self, unet, args, kwargs, i, steps, rows):
        run = self.run
        plan = run.plan
        fresh = not plan.replay[i]
        replay = plan.replay[i + 1] if fresh and steps > 1 else plan.replay[i]
        padded = steps
        if steps > 1 and run.pad_sizes:
            padded = min(s for s in run.pad_sizes if s >= steps)
        self.evaluation = _Evaluation(replay=replay, first=i, real=steps, steps=padded, rows=rows, fresh=fresh)
        self._memo = {}  # what every replayed module of this evaluation shares (see _weights, _keep)
        measure = run.steps_per_call == "auto" and not _memory_known(self)
        if measure:
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            if padded == 1:
                out = unet(*args, **kwargs)
            else:
                timesteps = run.timesteps()[i : i + steps]
                timesteps = torch.cat([timesteps, timesteps[-1:].repeat(padded - steps)])
                per_sample = timesteps.to(_argument(args, kwargs, 0, "sample").device).repeat_interleave(rows)
                args, kwargs = _batched_arguments(args, kwargs, rows, padded, per_sample)
                out = unet(*args, **kwargs)
        finally:
            self.evaluation = None
        if measure:
            self.auto_steps[self.shape] = steps_within_memory(
                before, torch.cuda.max_memory_allocated(self.device) - before, torch.cuda.mem_get_info(self.device)[0]
            )
            log.info("max_batch='auto': %d steps per call", self.auto_steps[self.shape])
        run.stats.unet_calls += 1
        run.stats.steps_per_call.append(steps)
        run.stats.full_evaluations += int(fresh)
        eps = out[0] if isinstance(out, tuple) else out.sample
        return eps[: rows * steps]


# max_batch="auto": steps per batched call, from these sizes, so that the peak memory stays
# within AUTO_PEAK_FACTOR x stock's (and within free CUDA memory); on the CPU by the call's latent pixels (cpu_steps).
AUTO_CHUNK_SIZES = (1, 2, 4, 8, 16)
AUTO_PEAK_FACTOR = 1.5
# On the CPU (no allocator counters to read): as many steps per call as keep a call's latent
# pixels (rows x height x width) within four guided steps of SD 1.5 at 512 px: 4 steps there, 16
# at 256 px and below, where calls are bound by reading the weights and fewer calls win
# (measured: benchmarks/results/auto-batching-cpu.md).
CPU_AUTO_LATENT_PIXELS = 4 * 2 * 64 * 64


def cpu_steps(sample_shape: tuple) -> int:
    """max_batch="auto"'s steps per call for a sample of this shape on the CPU."""
    rows, pixels = sample_shape[0], math.prod(sample_shape[2:])
    fits = [m for m in AUTO_CHUNK_SIZES if m * rows * pixels <= CPU_AUTO_LATENT_PIXELS]
    return max(fits, default=1)


def steps_within_memory(resident: int, per_step: int, free: int | None = None) -> int:
    """The largest chunk size whose batched call keeps the peak within the bound.

    ``resident``: bytes held before a UNet call (weights, latents); ``per_step``: what one
    step's call adds at its peak. Stock peaks at ``resident + per_step``; a call of ``m``
    steps at about ``resident + m * per_step`` (the encoder runs on one step's rows only,
    so this overestimates).
    """
    if free is None and torch.cuda.is_available():
        free = torch.cuda.mem_get_info()[0]
    limit = AUTO_PEAK_FACTOR * (resident + per_step) - resident
    if free is not None:
        limit = min(limit, free + per_step)
    fits = [m for m in AUTO_CHUNK_SIZES if m * max(per_step, 1) <= limit]
    return max(fits, default=1)


def _memory_known(executor: ReuseExecutor) -> bool:
    if executor.shape not in executor.auto_steps and not _cuda_memory(executor.device):
        executor.auto_steps[executor.shape] = cpu_steps(executor.shape[0])
    return executor.shape in executor.auto_steps


def _cuda_memory(device: torch.device) -> bool:
    """Whether ``max_batch="auto"`` can measure on ``device`` (CUDA's allocator counters)."""
    return device.type == "cuda"


class _Installed:
    """Context manager: wrappers on the plan's modules and ``run`` active, then removed."""

    def __init__(self, executor: ReuseExecutor, unet, run: Run):
        self.executor, self.run = executor, run
        self.base = getattr(unet, "_orig_mod", unet)  # under torch.compile's wrapper
        self.saved: list[tuple[torch.nn.Module, object]] = []

    def __enter__(self):
        ex = self.executor
        try:
            for name in sorted(self.run.plan.cached_modules):
                module = unet_layout.get_module(self.base, name)
                had_own = "forward" in module.__dict__
                original = module.forward
                self.saved.append((module, original if had_own else None))
                module.forward = ex._wrapper(self.base, name, original)
        except BaseException:
            self._restore()
            raise
        ex.run, ex.base = self.run, self.base
        ex.shape = ex.device = None  # read at the first evaluation
        return self.run

    def __exit__(self, *exc):
        ex = self.executor
        ex.run = None
        ex.evaluation = None
        self.run.stash.clear()
        self.run.cache.clear()  # cached features never outlive a call
        self.run.control.clear()
        self.run.control_blocks.clear()
        self.run.deltas.clear()
        self._restore()
        return False

    def _restore(self):
        restore_forwards(self.saved)


def restore_forwards(saved: list[tuple[torch.nn.Module, Callable | None]]) -> None:
    """Undo forward wrappers, last first: ``(module, its own instance forward or None)``; empties ``saved``."""
    for module, own in reversed(saved):
        if own is None:
            del module.forward
        else:
            module.forward = own
    saved.clear()


class UNetView:
    """What the accelerated pipeline calls as ``self.unet`` during a run.

    Attribute reads go to the UNet; calls go through the executor, which calls the
    UNet (or answers from a batch it already computed).
    """

    def __init__(self, unet, executor: ReuseExecutor):
        object.__setattr__(self, "_unet", unet)
        object.__setattr__(self, "_executor", executor)

    def __getattr__(self, name):
        return getattr(self._unet, name)

    def __call__(self, *args, **kwargs):
        return self._executor.evaluate(self._unet, args, kwargs)


# -- batch plumbing --------------------------------------------------------------------


def _argument(args, kwargs, position: int, name: str):
    return args[position] if len(args) > position else kwargs[name]


def _same_timestep(a, b) -> bool:
    return float(torch.as_tensor(a).flatten()[0]) == float(torch.as_tensor(b).flatten()[0])


def _as_unet_output(eps: torch.Tensor, return_dict: bool):
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    return UNet2DConditionOutput(sample=eps) if return_dict else (eps,)


def _map_tensors(obj, fn):
    """Apply ``fn`` to every tensor in nested tuples, lists, dicts and model outputs."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, BaseOutput) and is_dataclass(obj):
        return type(obj)(**{f.name: _map_tensors(getattr(obj, f.name), fn) for f in fields(obj)})
    if isinstance(obj, tuple):
        return tuple(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, list):
        return [_map_tensors(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


@torch.compiler.disable
def _take_rows(obj, total: int, rows: int):
    """The first ``rows`` rows of every per-sample tensor (batch dimension ``total``)."""
    return _map_tensors(obj, lambda t: t[:rows] if t.dim() and t.shape[0] == total else t)


@torch.compiler.disable
def _repeat_rows(obj, times: int):
    if times == 1:
        return obj
    return _map_tensors(obj, lambda t: t.repeat(times, *([1] * (t.dim() - 1))) if t.dim() else t)


def _difference(previous, last):
    """``previous - last`` of a tensor leaf; None for what a forecast passes through (non-tensors, scalars)."""
    if not isinstance(last, torch.Tensor) or not last.dim():
        return None
    return previous - last


def _weighted_rows(outputs: list, weights: list[list[float]]):
    """Per step ``s``: sum over ``m`` of ``weights[s][m] * outputs[m]``, steps stacked on rows."""

    def combine(*tensors):
        if not isinstance(tensors[0], torch.Tensor) or not tensors[0].dim():
            return tensors[-1]
        rows = []
        for w in weights:
            acc = None
            for wm, tm in zip(w, tensors):
                if wm:
                    acc = tm * wm if acc is None else acc + tm * wm
            rows.append(acc if acc is not None else torch.zeros_like(tensors[-1]))
        return torch.cat(rows) if len(rows) > 1 else rows[0]

    return _zip_map(combine, outputs)


def _zip_map(fn, structures: list):
    """``fn`` over the leaves of equally shaped nested tuples/lists/dicts/model outputs."""
    first = structures[0]
    if isinstance(first, BaseOutput) and is_dataclass(first):
        return type(first)(**{f.name: _zip_map(fn, [getattr(s, f.name) for s in structures]) for f in fields(first)})
    if isinstance(first, (tuple, list)):
        return type(first)(_zip_map(fn, [s[i] for s in structures]) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: _zip_map(fn, [s[k] for s in structures]) for k in first}
    return fn(*structures)


def _batched_arguments(args, kwargs, rows: int, steps: int, timesteps: torch.Tensor):
    """The UNet's arguments for ``steps`` copies of the call, each with its own timestep."""

    def tile(t):
        return t.repeat(steps, *([1] * (t.dim() - 1))) if t.dim() and t.shape[0] == rows else t

    args, kwargs = list(args), dict(kwargs)
    if len(args) > 1:
        args[1] = timesteps
    else:
        kwargs["timestep"] = timesteps
    batched_args = [a if i == 1 else _map_tensors(a, tile) for i, a in enumerate(args)]
    batched_kwargs = {k: v if k in ("timestep", "return_dict") else _map_tensors(v, tile) for k, v in kwargs.items()}
    return tuple(batched_args), batched_kwargs
