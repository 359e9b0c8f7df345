"""A request's input images (img2img's init image, inpainting's mask): opened, checked
and sized, with errors that name the input.

- ``image``: any RGB-convertible picture (RGB, RGBA, greyscale, palette, CMYK). The
  output takes its size, scaled down to fit the largest size the service allows (aspect
  kept) and cut to multiples of 8; ``width`` and ``height`` are not used with it. A side
  below the model's smallest size is refused.
- ``mask``: white = repaint, black = keep (greys in between), as Replicate's Stable
  Diffusion inpainting takes it; converted to greyscale and resized to the image's size
  where it differs.
"""

from __future__ import annotations

import os
import warnings

from PIL import Image, UnidentifiedImageError

from .defaults import MAX_INPUT_IMAGE_PIXELS

# modes PIL converts to RGB (or greyscale) without guessing a value range
READABLE_MODES = ("RGB", "RGBA", "L", "LA", "P", "PA", "CMYK", "YCbCr", "1", "RGBX")


def open_image(path: str | os.PathLike, name: str, mode: str = "RGB") -> Image.Image:
    """The picture at ``path`` in ``mode``; ValueError naming the input ``name`` if it is not
    a readable picture, too large or of a mode without a plain colour meaning."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
            width, height = image.size
            if width * height > MAX_INPUT_IMAGE_PIXELS:
                raise ValueError(
                    f"{name}: {width}x{height} is larger than {MAX_INPUT_IMAGE_PIXELS} pixels; send a smaller picture"
                )
            image.load()
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ValueError(f"{name}: not a picture PIL can read ({type(err).__name__}: {err})") from None
    except OSError as err:
        raise ValueError(f"{name}: the file could not be read as a picture ({err})") from None
    if image.mode not in READABLE_MODES:
        raise ValueError(
            f"{name}: mode {image.mode} (e.g. 16-bit or floating-point pixels) is not supported; "
            f"send an 8-bit RGB, RGBA or greyscale picture"
        )
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))  # transparency over white
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert(mode)


def output_size(image: Image.Image, min_size: int, max_size: int, multiple: int = 8) -> tuple[int, int]:
    """(width, height) of the output for an init image: scaled down to fit ``max_size``,
    cut to multiples of ``multiple``; ValueError if a side ends below ``min_size``."""
    width, height = image.size
    scale = min(1.0, max_size / max(width, height))
    w, h = (int(side * scale) // multiple * multiple for side in (width, height))
    if min(w, h) < min_size:
        raise ValueError(
            f"image: {width}x{height} is too small for this model (each side at least {min_size} pixels "
            f"after fitting within {max_size}); send a larger picture"
        )
    return w, h


def init_and_mask(
    image_path, mask_path, min_size: int, max_size: int
) -> tuple[Image.Image, Image.Image | None, list[str]]:
    """The init image at the output size, the mask at the same size (or None), and notes for the logs."""
    notes = []
    image = open_image(image_path, "image")
    size = output_size(image, min_size, max_size)
    if size != image.size:
        notes.append(f"image: {image.size[0]}x{image.size[1]} resized to {size[0]}x{size[1]} (fits {max_size}, multiples of 8)")
        image = image.resize(size, Image.LANCZOS)
    mask = None
    if mask_path is not None:
        mask = open_image(mask_path, "mask", mode="L")
        if mask.size != size:
            notes.append(f"mask: {mask.size[0]}x{mask.size[1]} resized to the image's {size[0]}x{size[1]}")
            mask = mask.resize(size, Image.NEAREST)
    return image, mask, notes
