"""An ImageNet-like folder of JPEGs for scale benchmarks: mixed sizes and aspect ratios, derived from the
bundled real photographs (flipped, rotated, cropped and resized), in 1000 class folders like ImageNet's.

    python -m benchmarks.imagenet_like FOLDER [--images 2000] [--seed 0]
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

from PIL import Image
from skimage import data

_SOURCES = (data.astronaut, data.coffee, data.chelsea, data.rocket, data.camera, data.immunohistochemistry)


def write_folder(folder: Path, count: int, seed: int = 0) -> list:
    """``count`` JPEGs under ``folder``/nXXXXXXXX/, sides 200 to 800 pixels (ImageNet's median is ~400x350)."""
    rng = random.Random(seed)
    photos = [Image.fromarray(load()).convert('RGB') for load in _SOURCES]
    paths = []
    for i in range(count):
        photo = photos[i % len(photos)]
        if rng.random() < 0.5:
            photo = photo.transpose(Image.FLIP_LEFT_RIGHT)
        photo = photo.rotate(rng.uniform(-15, 15), expand=False)
        width, height = photo.size
        left, top = rng.randrange(width // 4), rng.randrange(height // 4)
        photo = photo.crop((left, top, width - rng.randrange(width // 4), height - rng.randrange(height // 4)))
        side = rng.randrange(200, 801)
        scale = side / max(photo.size)
        photo = photo.resize((max(16, round(photo.width * scale)), max(16, round(photo.height * scale))))
        path = folder / f'n{i % 1000:08d}' / f'ILSVRC2012_val_{i + 1:08d}.JPEG'
        path.parent.mkdir(parents=True, exist_ok=True)
        photo.save(path, quality=90)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('folder', type=Path)
    parser.add_argument('--images', type=int, default=2000)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    paths = write_folder(args.folder, args.images, args.seed)
    print(f'{len(paths)} JPEGs in {args.folder}')


if __name__ == '__main__':
    main()
