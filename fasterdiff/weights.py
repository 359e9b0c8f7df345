"""Where Stable Diffusion 1.5 lives: download into ``weights/``, load offline."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

SD15_REPO_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
WEIGHTS_ENV = "FASTERDIFF_WEIGHTS"
# Configs, tokenizer and the fp16 safetensors of every component (about 2 GB).
DOWNLOAD_PATTERNS = ["model_index.json", "*/*.json", "*/*.txt", "*/*.fp16.safetensors"]
DOWNLOAD_COMMAND = "python -m fasterdiff download-weights"


class WeightsUnavailable(RuntimeError):
    """The weights are neither on disk nor downloadable."""


def weights_dir() -> Path:
    """``$FASTERDIFF_WEIGHTS`` if set, else ``weights/`` beside the package."""
    return Path(os.environ.get(WEIGHTS_ENV) or DEFAULT_WEIGHTS_DIR)


def has_weights(folder: str | os.PathLike) -> bool:
    return (Path(folder) / "model_index.json").is_file()


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
    folder = Path(path_or_repo_id)
    if folder.is_dir():
        if not has_weights(folder):
            raise WeightsUnavailable(f"{folder} holds no model_index.json; fetch the weights with: {DOWNLOAD_COMMAND}")
        if _only_fp16_files(folder):
            kwargs["variant"] = "fp16"
    pipe = StableDiffusionPipeline.from_pretrained(str(path_or_repo_id), **kwargs)
    return pipe.to(device)


def _only_fp16_files(folder: Path) -> bool:
    unet = folder / "unet"
    return any(unet.glob("*.fp16.safetensors")) and not any(
        p for p in unet.glob("*.safetensors") if ".fp16." not in p.name
    )


def download_weights(dest: str | os.PathLike | None = None, repo_id: str = SD15_REPO_ID) -> Path:
    """Download SD 1.5 (fp16 files, safety checker included) into ``dest``.

    huggingface_hub shows a progress bar per file. Raises :class:`WeightsUnavailable`
    with the command to retry if the download fails.
    """
    from huggingface_hub import snapshot_download

    dest = Path(dest) if dest is not None else weights_dir()
    try:
        snapshot_download(repo_id, local_dir=str(dest), allow_patterns=DOWNLOAD_PATTERNS)
    except Exception as err:  # network, auth, disk: all end the same way for the user
        raise WeightsUnavailable(
            f"could not download {repo_id} into {dest}: {type(err).__name__}: {err}. "
            f"Fetch the weights on a machine with internet access with: {DOWNLOAD_COMMAND} --dest {dest}"
        ) from err
    return dest


def ensure_weights(folder: str | os.PathLike | None = None) -> Path:
    """``folder`` (default :func:`weights_dir`), downloading SD 1.5 into it if it is empty."""
    folder = Path(folder) if folder is not None else weights_dir()
    if not has_weights(folder):
        print(f"no weights in {folder}; downloading {SD15_REPO_ID} (about 2 GB)", flush=True)
        try:
            download_weights(folder)
        except WeightsUnavailable as err:
            raise WeightsUnavailable(f"Stable Diffusion 1.5 weights are missing from {folder}, and {err}") from None
    return folder
