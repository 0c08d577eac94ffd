"""Reading images the way a user expects, and preprocessing them the way each model was trained."""
from __future__ import annotations

import hashlib
import importlib.resources
import io
import math
import os
import warnings
from pathlib import Path
from typing import Iterable, Iterator, List, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from timm.data import create_transform

__all__ = ['ImageError', 'MAX_PIXELS', 'load_image', 'image_hash', 'find_images', 'preprocess', 'preprocess_batch',
           'denormalize', 'decoded_bytes', 'preprocess_bytes', 'IMAGE_EXTENSIONS', 'SAMPLE_PHOTOS', 'sample_photo']

MAX_PIXELS = 64_000_000  # larger images are refused as possible decompression bombs
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.webp', '.bmp', '.gif', '.tif', '.tiff')
SAMPLE_PHOTOS = {'chelsea (cat)': 'chelsea.png', 'coffee': 'coffee.png', 'astronaut': 'astronaut.png',
                 'rocket': 'rocket.jpg'}  # label -> a photograph's file in scikit-image's package data


class ImageError(ValueError):
    """An image that cannot be used; the message names the file and the reason."""


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB with transparency composited on white, 16-bit/float rescaled (not clipped), CMYK converted."""
    if image.mode in ('I;16', 'I;16B', 'I;16L', 'I', 'F'):
        array = np.asarray(image, dtype=np.float64)
        low, high = np.nanmin(array), np.nanmax(array)
        scaled = (array - low) / (high - low) * 255 if high > low else np.zeros_like(array)
        image = Image.fromarray(np.nan_to_num(scaled).round().astype(np.uint8), 'L')
    if image.mode == 'P':
        image = image.convert('RGBA')
    if image.mode in ('RGBA', 'LA', 'PA', 'La', 'RGBa'):
        rgba = image.convert('RGBA')
        background = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert('RGB')


def load_image(source: Union[str, os.PathLike, bytes], name: str | None = None,
               max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open any image Pillow reads (first frame of animations), EXIF-rotated, as RGB.

    ``source`` is a path or the file's bytes (``name`` then labels errors). Raises ImageError.
    """
    label = name or (os.fspath(source) if not isinstance(source, bytes) else 'uploaded image')
    data = io.BytesIO(source) if isinstance(source, bytes) else source
    previous_limit = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = max_pixels
        with warnings.catch_warnings():
            warnings.simplefilter('error', Image.DecompressionBombWarning)
            with Image.open(data) as image:
                if image.width * image.height > max_pixels:
                    raise ImageError(f'{label}: {image.width}x{image.height} pixels is over the limit of '
                                     f'{max_pixels:,} (possible decompression bomb)')
                image.seek(0)
                image.load()
                image = ImageOps.exif_transpose(image)
                return _to_rgb(image)
    except ImageError:
        raise
    except FileNotFoundError as e:
        raise ImageError(f'{label}: no such file') from e
    except IsADirectoryError as e:
        raise ImageError(f'{label}: is a folder, not an image') from e
    except UnidentifiedImageError as e:
        raise ImageError(f'{label}: not an image Pillow can read') from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f'{label}: too many pixels, over the limit of {max_pixels:,} '
                         '(possible decompression bomb)') from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f'{label}: corrupt or truncated image ({e})') from e
    finally:
        Image.MAX_IMAGE_PIXELS = previous_limit


def sample_photo(label: str) -> Tuple[str, bytes]:
    """(file name, bytes) of a sample photograph, read from scikit-image's package data.

    Read as a file (not with ``skimage.data``, whose first call imports its image I/O stack: 0.4 s), so a
    sample goes through :func:`load_image` like an upload.
    """
    filename = SAMPLE_PHOTOS[label]
    return filename, importlib.resources.files('skimage.data').joinpath(filename).read_bytes()


def image_hash(image: Image.Image) -> str:
    """Content hash of the decoded pixels, for caching results per image."""
    digest = hashlib.sha1(image.tobytes())
    digest.update(repr(image.size).encode())
    return digest.hexdigest()[:16]


def find_images(paths: Iterable[Union[str, os.PathLike]]) -> Iterator[Path]:
    """Files named directly, and image files found recursively in folders (sorted)."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            yield from sorted(p for p in path.rglob('*') if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        else:
            yield path


def _eval_transform(data_config: dict):
    """The model's own resize, crop, mean and std, as timm builds them for evaluation."""
    return create_transform(**{k: v for k, v in data_config.items()
                               if k in ('input_size', 'interpolation', 'mean', 'std', 'crop_pct', 'crop_mode')})


def preprocess(image: Image.Image, data_config: dict) -> torch.Tensor:
    """(1, 3, H, W) tensor with the model's own resize, crop, mean and std."""
    return _eval_transform(data_config)(image).unsqueeze(0)


def preprocess_batch(images: List[Image.Image], data_config: dict) -> torch.Tensor:
    """(B, 3, H, W); the transform is built once for the batch."""
    transform = _eval_transform(data_config)
    return torch.stack([transform(image) for image in images])


def denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> Image.Image:
    """A preprocessed (3, H, W) tensor back to the RGB image the model saw: resized, cropped, H x W pixels."""
    image = x.float().cpu() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    array = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)


def decoded_bytes(image: Image.Image) -> int:
    """Bytes Pillow holds for a decoded image: 4 per pixel for RGB (Pillow stores RGB pixels in 32 bits)."""
    per_pixel = {'1': 1, 'L': 1, 'P': 1, 'I;16': 2, 'I;16B': 2, 'I;16L': 2}.get(image.mode, 4)
    return image.width * image.height * per_pixel


def preprocess_bytes(image: Image.Image, data_config: dict) -> int:
    """What resizing ``image`` for this model allocates beyond the input tensors (which memory estimates count):
    Pillow's resize of 32-bit pixels, one direction at a time, holds the half-resized image and the result.

    An upper bound for every crop mode: the shorter side goes to ``input size / crop_pct`` (timm's centre
    crop, the largest of its resizes). ``benchmarks/upload_memory`` and a test hold it against peak RSS.
    """
    height, width = data_config['input_size'][-2:]
    crop_pct = data_config.get('crop_pct') or 0.875
    scale = max(math.floor(height / crop_pct), math.floor(width / crop_pct)) / min(image.width, image.height)
    out_w, out_h = math.ceil(image.width * scale), math.ceil(image.height * scale)
    return 4 * (max(out_w * image.height, image.width * out_h) + out_w * out_h)
