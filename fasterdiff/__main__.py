"""Command line: ``python -m fasterdiff {generate,download-weights,benchmark,analyze} ...``."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from .samplers import DETERMINISTIC_SAMPLERS, SAMPLER_NAMES
from .service import BOUNDS, KEY_STEP_MODES, OUTPUT_FORMATS, Request


def _bounded(name: str, kind=int):
    return _in_range(*BOUNDS[name], kind)


def _in_range(low, high, kind=int, multiple: int = 1):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high}], got {value}")
        if multiple > 1 and value % multiple:
            raise argparse.ArgumentTypeError(f"must be a multiple of {multiple}, got {value}")
        return value

    return parse


def _add_generate(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate images (the same code path as the Cog predictor)",
        description="Generate images with Stable Diffusion 1.5 and FasterDiffusion, on CUDA if present, else CPU.",
    )
    d = Request(prompt="")
    p.add_argument("prompt", help="what to draw")
    p.add_argument("-o", "--output", default="out.webp", help="output file; with several images, -N is added (N: the image's index; the baseline's: -stock-N) (default: out.webp)")
    p.add_argument(
        "--weights",
        help="SD 1.5-format folder or hub id (default: $FASTERDIFF_WEIGHTS or weights/, downloaded there if empty)",
    )
    p.add_argument("--negative-prompt", default=d.negative_prompt, help="what to keep out of the image")
    p.add_argument("--width", type=_bounded("width"), default=None, help="multiple of 8, 32-1024, at least half the model's native size (default: the native size: 512 for SD 1.5, 32 for the stand-in)")
    p.add_argument("--height", type=_bounded("height"), default=None, help="multiple of 8, 32-1024, at least half the model's native size (default: the native size: 512 for SD 1.5, 32 for the stand-in)")
    p.add_argument("--num-outputs", type=_bounded("num_outputs"), default=d.num_outputs, help="1-4 (default: 1)")
    p.add_argument("--sampler", choices=SAMPLER_NAMES, default=d.sampler, help="(default: DDIM)")
    p.add_argument("--steps", dest="num_inference_steps", type=_bounded("num_inference_steps"), default=d.num_inference_steps, help="1-100 (default: 50)")
    p.add_argument("--key-step-mode", choices=KEY_STEP_MODES, default=d.key_step_mode, help="auto (default) = the fastest plan calibrated on these weights that is at least as close to stock as DeepCache interval 3 and within 35 dB pooled PSNR (the paper's key steps where none was calibrated); auto-fast = the same at DeepCache interval 5's level; non-uniform = the paper's key steps")
    p.add_argument("--uniform-interval", type=_bounded("uniform_interval"), default=d.uniform_interval, help="2-10, with --key-step-mode uniform (default: 5)")
    p.add_argument("--custom-key-steps", default=d.custom_key_steps, help="e.g. '0,1,2,3,5,10,15,25,35', with --key-step-mode custom")
    p.add_argument("--forecast", type=_bounded("forecast"), default=d.forecast, help="0-2: how non-key steps get the encoder's features (default: 0, the paper's)")
    p.add_argument("--sequential", dest="parallel", action="store_false", help="decode non-key steps one by one (less memory)")
    p.add_argument("--noise-injection-strength", type=_bounded("noise_injection_strength", float), default=d.noise_injection_strength, help="0-0.02 (default: 0.003, the paper's)")
    p.add_argument("--guidance-scale", type=_bounded("guidance_scale", float), default=d.guidance_scale, help="1-20 (default: 7.5)")
    p.add_argument("--seed", type=_bounded("seed"), default=None, help="random if absent; always printed")
    p.add_argument("--output-quality", type=_bounded("output_quality"), default=d.output_quality, help="webp/jpg quality 1-100 (default: 80)")
    p.add_argument("--disable-safety-checker", action="store_true", help="skip the safety checker (otherwise images it flags are left out)")
    p.add_argument("--image", default=None, help="init image: img2img (with --mask: inpainting); the output takes its size (fitted within 1024, multiples of 8)")
    p.add_argument("--mask", default=None, help="inpainting mask for --image: white = repaint, black = keep")
    p.add_argument("--prompt-strength", type=_bounded("prompt_strength", float), default=d.prompt_strength, help="with --image: how far from it, 0-1 (default: 0.8)")
    p.add_argument("--compare-with-baseline", action="store_true", help="also run stock SD 1.5 with the same seed and print the speedup; its images are written as NAME-stock-<i>")


def _generate(args) -> int:
    import shutil

    from .service import Generator
    from .weights import ensure_weights, load_pipeline

    out = Path(args.output)
    fmt = out.suffix.lstrip(".").lower().replace("jpeg", "jpg")
    if fmt not in OUTPUT_FORMATS:
        print(f"error: --output must end in .webp, .jpg or .png, got {out.name!r}", file=sys.stderr)
        return 2
    fields = {k: v for k, v in vars(args).items() if k in Request.__dataclass_fields__}
    request = Request(**fields, output_format=fmt)
    request.validate()
    generator = Generator(load_pipeline(args.weights or ensure_weights()))
    with tempfile.TemporaryDirectory() as tmp:
        result = generator(request, tmp)
        for message in result.messages:
            print(message)
        single = request.num_outputs == 1 and not request.compare_with_baseline
        for path in result.paths:  # out-<i> / stock-<i>: -o's name, or -o's stem with -<i> / -stock-<i>
            kind, index = Path(path).stem.rsplit("-", 1)
            suffix = f"-{index}" if kind == "out" else f"-stock-{index}"
            dest = out if single else out.with_name(f"{out.stem}{suffix}{out.suffix}")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)
            print(f"wrote {dest}")
    return 0


def _download(args) -> int:
    from .weights import download_weights

    print(f"downloaded to {download_weights(args.dest)}")
    return 0


def _add_benchmark(sub) -> None:
    p = sub.add_parser("benchmark", help="benchmarks (see docs/benchmarks.md)")
    bsub = p.add_subparsers(dest="benchmark", required=True)
    s = bsub.add_parser("speed", help="time fasterdiff against stock diffusers, interleaved, in one process")
    s.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    s.add_argument("--size", type=_in_range(32, 1024, multiple=8), default=None, help="image size, 32-1024, a multiple of 8 (default: 256 on CPU, 512 on CUDA)")
    s.add_argument("--steps", type=_in_range(2, 100), default=50, help="2-100 (default: 50)")
    s.add_argument("--sampler", choices=SAMPLER_NAMES, default="DDIM")
    s.add_argument("--rounds", type=_in_range(1, 20), default=3, help="timed rounds after the warm-up, 1-20 (default: 3)")
    s.add_argument("--max-batch", type=_in_range(1, 64), default=2, help="max_batch of the memory-bounded parallel method, 1-64 (default: 2)")
    s.add_argument("--quick", action="store_true", help="a tiny random model, seconds: only shows that the benchmark runs")
    s.add_argument(
        "--out",
        help="output path prefix (default: benchmarks/results/speed-<device>-<sampler>-<steps>; "
        "with --quick, benchmarks/results/tmp/..., which git ignores)",
    )
    _add_fidelity(bsub)


def _add_fidelity(bsub) -> None:
    f = bsub.add_parser(
        "fidelity",
        help="image quality of every method and of the controls, on the trained stand-in",
        description="Speed and fidelity of every method against stock sampling and the controls "
        "(fewer steps at equal cost, whole noise-prediction reuse) on the stand-in model (standin/).",
    )
    f.add_argument("--sampler", choices=DETERMINISTIC_SAMPLERS, default="DDIM", help="deterministic samplers only (default: DDIM)")
    f.add_argument("--steps", type=_in_range(2, 100), default=50, help="2-100 (default: 50)")
    f.add_argument("--seeds", type=_in_range(1, 20), default=3, help="seeds per prompt, 180 prompts (default: 3)")
    f.add_argument("--prompts", type=_in_range(1, 180), default=None, help="only the first N prompts (quick runs)")
    f.add_argument("--guidance-scale", type=_bounded("guidance_scale", float), default=7.5, help="1-20 (default: 7.5)")
    f.add_argument("--standin", default=None, help="stand-in folder (default: standin/)")
    f.add_argument("--out", help="output path prefix (default: benchmarks/results/fidelity-<sampler>-<steps>)")


def _fidelity(args, argv) -> int:
    from .tools.bench import fidelity, fidelity_report

    cfg = fidelity.Config(
        sampler=args.sampler,
        steps=args.steps,
        seeds=args.seeds,
        prompts=args.prompts,
        guidance_scale=args.guidance_scale,
        **({"standin": args.standin} if args.standin else {}),
    )
    prefix = args.out or f"benchmarks/results/fidelity-{args.sampler}-{args.steps}"
    return _report(fidelity.run(cfg), prefix, argv, fidelity_report.write, fidelity_report.markdown_table)


def _report(result: dict, prefix: str, argv, write, table) -> int:
    """Write a result's files, stamped with the command; print the model, its table and the paths."""
    paths = write(result, Path(prefix), command="python -m fasterdiff " + " ".join(argv))
    if "model" in result:
        print(f"model: {result['model']}")
    print(table(result))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _add_analyze(sub) -> None:
    p = sub.add_parser("analyze", help="analyses of a pipeline's UNet")
    asub = p.add_subparsers(dest="analysis", required=True)
    f = asub.add_parser(
        "features",
        help="per-step change of encoder, bottleneck and decoder features (the paper's Fig. 2a)",
        description="Sample with the stock sampler and record how much each UNet block's output "
        "changes from one step to the next; writes a PNG plot, a markdown table and JSON.",
    )
    f.add_argument("--weights", default=None, help="SD-format folder (default: the stand-in, standin/pipeline)")
    f.add_argument("--sampler", choices=DETERMINISTIC_SAMPLERS, default="DDIM", help="deterministic samplers only (default: DDIM)")
    f.add_argument("--steps", type=_in_range(2, 100), default=50, help="2-100 (default: 50)")
    f.add_argument("--prompt", action="append", help="repeatable (default: 8 stand-in prompts)")
    f.add_argument("--guidance-scale", type=_bounded("guidance_scale", float), default=7.5, help="1-20 (default: 7.5)")
    f.add_argument("--out", help="output path prefix (default: benchmarks/results/features-<model>-<sampler>-<steps>)")


def _analyze(args, argv) -> int:
    import torch

    from .tools import features
    from .tools.standin import STANDIN_DIR, data, is_standin, require
    from .weights import load_pipeline

    weights = Path(args.weights) if args.weights else require(STANDIN_DIR) / "pipeline"
    prompts = args.prompt or [data.Attributes(d, d % len(data.COLORS), d % 3).prompt for d in range(8)]
    pipe = load_pipeline(weights, device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    result = features.analyze(pipe, prompts, sampler=args.sampler, steps=args.steps, guidance_scale=args.guidance_scale)
    model = "standin" if is_standin(weights) else weights.name
    prefix = args.out or f"benchmarks/results/features-{model}-{args.sampler}-{args.steps}"
    return _report(result, prefix, argv, features.write, features.markdown_table)


def _benchmark(args, argv) -> int:
    from .tools.bench import speed

    if args.benchmark == "fidelity":
        return _fidelity(args, argv)

    size = args.size or (512 if args.device == "cuda" else 256)
    cfg = speed.Config(
        device=args.device,
        size=size,
        steps=args.steps,
        sampler=args.sampler,
        rounds=args.rounds,
        quick=args.quick,
        max_batch=args.max_batch,
    )
    # --quick only shows that the benchmark runs: its files go where git ignores them
    folder = "benchmarks/results/tmp" if args.quick else "benchmarks/results"
    prefix = args.out or f"{folder}/speed-{args.device}-{args.sampler}-{args.steps}" + ("-quick" if args.quick else "")
    return _report(speed.run(cfg), prefix, argv, speed.write, speed.markdown_table)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fasterdiff",
        description="Stable Diffusion 1.5 sampled faster with FasterDiffusion (encoder propagation, "
        "parallel decoding, prior noise injection).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    dl = sub.add_parser("download-weights", help="download SD 1.5 (fp16, with safety checker) into weights/")
    dl.add_argument("--dest", help="folder (default: $FASTERDIFF_WEIGHTS or weights/)")
    _add_benchmark(sub)
    _add_analyze(sub)
    _add_calibrate(sub)
    return parser


def _add_calibrate(sub) -> None:
    c = sub.add_parser(
        "calibrate",
        help="measure reuse plans against stock on a model; write the plan file key_step_mode=auto reads",
        description="Sample calibration prompts with stock and with every candidate plan from the same noise; "
        "write each plan's PSNR against stock and its cost into the plan file (default: beside the weights).",
    )
    c.add_argument("--weights", help="SD-format folder (default: $FASTERDIFF_WEIGHTS or weights/)")
    c.add_argument("--sampler", choices=DETERMINISTIC_SAMPLERS, default="DDIM", help="(default: DDIM)")
    c.add_argument("--steps", type=_in_range(2, 100), default=50, help="2-100 (default: 50)")
    c.add_argument("--pairs", type=_in_range(2, 64), default=None, help="prompt x seed pairs (default: 24 for the stand-in, 32 otherwise)")
    c.add_argument("--guidance-scale", type=_bounded("guidance_scale", float), default=7.5)
    c.add_argument("--noise-injection", type=_bounded("noise_injection_strength", float), default=None,
                   help="the noise injection the plans are measured with, 0-0.02 as the predictor takes (default: the library's, 0.003)")
    c.add_argument("--size", type=_in_range(32, 1024, multiple=8), default=None, help="image size, 32-1024, a multiple of 8 (default: the model's native size)")
    c.add_argument("--batch", type=_in_range(1, 64), default=None, help="pairs per sampling call (default: all on CPU, 4 on CUDA)")
    c.add_argument("--quick", action="store_true",
                   help="race the candidates, fastest first, on up to 24 pairs (hardest first), dropping each as soon as it "
                        "falls behind, then screen key-step removals from each pick: 1/7 to 1/8.5 of the full search's sampling "
                        "(benchmarks/results/quick-calibration-standin.md); what calibration on the spot runs")
    c.add_argument("--out", help="plan file (default: WEIGHTS/fasterdiff_plans.json); a .md table and a .png plot go beside it")


def _calibrate(args) -> int:
    from . import calibrate
    from .tools import calibration_report
    from .tools.standin import is_standin
    from .weights import load_pipeline, weights_dir

    folder = Path(args.weights or weights_dir())
    pipe = load_pipeline(folder, local_files_only=True)
    standin = is_standin(folder)
    count = args.pairs or (24 if standin else 32)
    prompts, seeds = calibrate.pairs_for(folder, count)  # the stand-in keeps its own prompts beside its weights
    size = args.size or pipe.unet.config.sample_size * pipe.vae_scale_factor
    batch = args.batch or (len(prompts) if pipe.device.type == "cpu" else 4)
    setting = calibrate.Setting(
        args.sampler, args.steps, args.guidance_scale, size, size, prompts, seeds, batch, args.noise_injection
    )
    entry = calibrate.calibrate(pipe, setting, weights=str(folder), mode="quick" if args.quick else "full")
    out = Path(args.out) if args.out else folder / calibrate.PLANS_FILE_NAME
    calibrate.write_entry(out, entry)
    stem = out.with_suffix("")
    table = calibration_report.markdown(entry)
    Path(f"{stem}-{args.sampler}-{args.steps}.md").write_text(table)
    drawn = calibration_report.plot(entry, f"{stem}-{args.sampler}-{args.steps}.png")
    print(table)
    print(f"wrote {out} and {stem}-{args.sampler}-{args.steps}.{{md,png}}" if drawn else f"wrote {out} and {stem}-{args.sampler}-{args.steps}.md")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "download-weights":
            return _download(args)
        if args.command == "analyze":
            return _analyze(args, argv)
        if args.command == "calibrate":
            return _calibrate(args)
        return _benchmark(args, argv)
    except (ValueError, RuntimeError, ArithmeticError, OSError) as err:  # ours name the input; NaN; files
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
