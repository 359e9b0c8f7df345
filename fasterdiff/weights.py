"""Where Stable Diffusion 1.5 lives: download into ``weights/``, load offline."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

SD15_REPO_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
WEIGHTS_ENV = "FASTERDIFF_WEIGHTS"
# Configs, tokenizer and the fp16 safetensors of every component (about 2 GB).
DOWNLOAD_PATTERNS = ["model_index.json", "*/*.json", "*/*.txt", "*/*.fp16.safetensors"]
DOWNLOAD_COMMAND = "python -m fasterdiff download-weights"
# What each component of an SD-format folder needs on disk: its config, and weights for
# the torch modules. A component model_index.json lists but this table does not know
# needs a non-empty folder.
_WEIGHTS = ("*.safetensors", "*.bin")
COMPONENT_FILES = {
    "unet": ("config.json", _WEIGHTS),
    "vae": ("config.json", _WEIGHTS),
    "text_encoder": ("config.json", _WEIGHTS),
    "safety_checker": ("config.json", _WEIGHTS),
    "tokenizer": ("tokenizer_config.json",),
    "scheduler": ("scheduler_config.json",),
    "feature_extractor": ("preprocessor_config.json",),
}


class WeightsUnavailable(RuntimeError):
    """The weights are neither on disk nor downloadable."""


def weights_dir(default: str | os.PathLike = "weights") -> Path:
    """``$FASTERDIFF_WEIGHTS`` if set, else ``default`` (``weights/`` in the working directory;
    the Cog predictor passes the ``weights/`` beside predict.py)."""
    return Path(os.environ.get(WEIGHTS_ENV) or default).resolve()


def missing_files(folder: str | os.PathLike) -> list[str]:
    """What an SD-format folder lacks to load as a pipeline (``[]`` when complete).

    Reads ``model_index.json`` and checks every component it lists for its config and,
    for torch modules, a weights file.
    """
    folder = Path(folder)
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        return ["model_index.json"]
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError):
        return ["model_index.json (unreadable)"]
    missing = []
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or None in spec:
            continue  # settings, and components the pipeline does not have
        sub = folder / name
        needs = COMPONENT_FILES.get(name)
        if needs is None:
            if not (sub.is_dir() and any(sub.iterdir())):
                missing.append(f"{name}/")
            continue
        for need in needs:
            patterns = need if isinstance(need, tuple) else (need,)
            if not any(any(sub.glob(pattern)) for pattern in patterns):
                missing.append(f"{name}/{' or '.join(patterns)}")
    return missing


def has_weights(folder: str | os.PathLike) -> bool:
    """``folder`` holds a complete SD-format pipeline."""
    return not missing_files(folder)


def _unavailable(folder: Path, missing: list[str], cause: str) -> WeightsUnavailable:
    """The one message for weights that are not there: what is missing, why, what to run."""
    return WeightsUnavailable(
        f"no complete Stable Diffusion 1.5 weights in {folder} (missing: {', '.join(missing)}); {cause}. "
        f"Fetch them on a machine with internet access with: {DOWNLOAD_COMMAND} --dest {folder} "
        f"(or point ${WEIGHTS_ENV} at a folder that holds them)"
    )


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_pipeline(
    path_or_repo_id: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    local_files_only: bool = False,
) -> StableDiffusionPipeline:
    """Load an SD 1.5-format pipeline (with its safety checker, if it has one).

    fp16 on CUDA, fp32 on CPU unless ``dtype`` says otherwise. A folder holding only
    the fp16 files (as :func:`download_weights` writes them) is loaded as such.
    """
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    kwargs = {"dtype": dtype, "local_files_only": local_files_only}
    folder = Path(path_or_repo_id).expanduser()
    if not folder.is_dir() and _is_local_path(path_or_repo_id):
        raise FileNotFoundError(f"no pipeline folder at {folder} (a local path, so not looked up on the Hub)")
    if folder.is_dir():
        missing = missing_files(folder)
        if missing:
            raise _unavailable(folder, missing, "the folder is incomplete")
        if _only_fp16_files(folder):
            kwargs["variant"] = "fp16"
    pipe = StableDiffusionPipeline.from_pretrained(str(folder if folder.is_dir() else path_or_repo_id), **kwargs)
    return pipe.to(device)


def _is_local_path(path_or_repo_id) -> bool:
    """Whether this names a path rather than a Hub repo id ("owner/name": no leading ".", "/"
    or "~", at most one "/"; and an "owner" that is a folder here means a path: weights/sd15)."""
    if isinstance(path_or_repo_id, os.PathLike):
        return True
    text = str(path_or_repo_id)
    if text.startswith((".", "/", "~")) or "\\" in text or text.count("/") > 1 or Path(text).exists():
        return True
    return "/" in text and Path(text.split("/", 1)[0]).is_dir()


def _only_fp16_files(folder: Path) -> bool:
    unet = folder / "unet"
    return any(unet.glob("*.fp16.safetensors")) and not any(
        p for p in unet.glob("*.safetensors") if ".fp16." not in p.name
    )


def download_weights(dest: str | os.PathLike | None = None, repo_id: str = SD15_REPO_ID) -> Path:
    """Download SD 1.5 (fp16 files, safety checker included) into ``dest``.

    huggingface_hub shows a progress bar per file. Without network access it may return
    ``dest`` as it was, so the result is checked: raises :class:`WeightsUnavailable`
    saying what is missing and the command to retry unless every file the pipeline needs
    is there.
    """
    from huggingface_hub import snapshot_download

    dest = Path(dest) if dest is not None else weights_dir()
    try:
        snapshot_download(repo_id, local_dir=str(dest), allow_patterns=DOWNLOAD_PATTERNS)
    except Exception as err:  # network, auth, disk: all end the same way for the user
        raise _unavailable(
            dest, missing_files(dest), f"could not download {repo_id}: {type(err).__name__}: {str(err).rstrip('.')}"
        ) from err
    missing = missing_files(dest)
    if missing:
        raise _unavailable(dest, missing, f"downloading {repo_id} did not complete (no network access?)")
    return dest


def ensure_weights(folder: str | os.PathLike | None = None) -> Path:
    """``folder`` (default :func:`weights_dir`), downloading SD 1.5 into it unless it is complete."""
    folder = Path(folder) if folder is not None else weights_dir()
    if not has_weights(folder):
        print(f"no complete weights in {folder}; downloading {SD15_REPO_ID} (about 2 GB)", flush=True)
        download_weights(folder)
    return folder
