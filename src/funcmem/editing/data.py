"""Photos for the editing task family: loaded from installed wheels, split by photo, cropped.

    load_photos() / load_folder(path)  -> [Photo]            image (3, H, W) in [0, 1]
    split_photos(photos)               -> train, test        by source photo, seeded
    random_crops(photo, n, size, rng)  -> (n, 3, size, size)

The default photos ship inside scikit-image, scikit-learn, matplotlib and sporco. They are read
from each installed package's own folder (found with ``importlib.util.find_spec``, without
importing the package), never copied into this repository; ``manifest`` records their licences.
Of scikit-image's stereo motorcycle pair only the left view is used, as the two views show
nearly the same scene.
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .images import ImageError, read_rgb

_SPORCO = "public domain or freely redistributable per sporco's data/README.rst: "
PHOTO_SOURCES: dict[str, tuple[str, str, str]] = {  # name -> (package, file inside it, licence)
    "astronaut": ("skimage", "data/astronaut.png", "public domain (NASA; no known copyright restrictions)"),
    "chelsea": ("skimage", "data/chelsea.png", "CC0 (photographer Stefan van der Walt)"),
    "coffee": ("skimage", "data/coffee.png", "CC0 (photographer Rachel Michetti)"),
    "rocket": ("skimage", "data/rocket.jpg", "public domain (SpaceX)"),
    "stereo_motorcycle": ("skimage", "data/motorcycle_left.png",
                          "not stated (Middlebury 2014 stereo benchmark, Scharstein et al.; "
                          "redistributed by scikit-image)"),
    "retina": ("skimage", "data/retina.jpg", "CC0 1.0 (Mikael Häggström, Wikimedia Commons)"),
    "immunohistochemistry": ("skimage", "data/ihc.png", "no known copyright restrictions (CMMI)"),
    "hubble_deep_field": ("skimage", "data/hubble_deep_field.jpg", "public domain (NASA)"),
    "china": ("sklearn", "datasets/images/china.jpg", "CC-BY 2.0 (flickr.com/photos/danielbuechele)"),
    "flower": ("sklearn", "datasets/images/flower.jpg", "CC-BY 2.0 (flickr.com/photos/vultilion)"),
    "grace_hopper": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg", "public domain (U.S. Navy photograph)"),
    "barbara": ("sporco", "data/barbara.png", _SPORCO + "attributed to Allen Gersho"),
    "kodim23": ("sporco", "data/kodim23.png", _SPORCO + "Kodak test image, released for unrestricted use"),
    "monarch": ("sporco", "data/monarch.png", _SPORCO + "Waterloo BragZone, free of copyright restrictions"),
    "sail": ("sporco", "data/sail.png", _SPORCO + "Waterloo BragZone, free of copyright restrictions"),
    "tulips": ("sporco", "data/tulips.png", _SPORCO + "Waterloo BragZone, free of copyright restrictions"),
}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
MIN_PHOTOS = 4


@dataclass(eq=False)
class Photo:
    """One source photo.

    Args:
        name: unique name; the unit of the train/test split.
        source_package: the package it ships in, or the folder it was read from.
        licence: its licence, as its source states it.
        image: (3, H, W) float32 in [0, 1], at the original size.
    """

    name: str
    source_package: str
    licence: str
    image: Tensor = field(repr=False)


def _read_rgb(path: Path) -> Tensor:
    """An image file as (3, H, W) float32 in [0, 1] (``funcmem.editing.images.read_rgb``: EXIF rotation
    applied, transparency composited on white; a bad file is an ``ImageError`` naming it)."""
    return read_rgb(path)


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {package!r} is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def load_photos(names: Sequence[str] | None = None) -> list[Photo]:
    """The colour photos that ship in installed wheels (``PHOTO_SOURCES``), loaded offline.

    A photo that fails to load is skipped with a warning.

    Args:
        names: which photos; all of ``PHOTO_SOURCES`` by default.
    Raises:
        ValueError: an unknown name, or fewer than min(4, len(names)) photos loaded.
    """
    names = list(PHOTO_SOURCES) if names is None else list(names)
    unknown = [n for n in names if n not in PHOTO_SOURCES]
    if unknown:
        raise ValueError(f"unknown photos {unknown}; known: {sorted(PHOTO_SOURCES)}")
    photos, failures = [], []
    for name in names:
        package, file, licence = PHOTO_SOURCES[name]
        try:
            image = _read_rgb(_package_dir(package) / file)
        except (OSError, ModuleNotFoundError, ImageError) as e:
            failures.append(f"{name} ({package}/{file}): {e}")
            warnings.warn(f"skipping photo {name!r}: cannot read {package}/{file}: {e}", stacklevel=2)
            continue
        photos.append(Photo(name, package, licence, image))
    need = min(MIN_PHOTOS, len(names))
    if len(photos) < need:
        raise ValueError(f"only {len(photos)} of {len(names)} photos loaded, need {need}; failures: {failures}")
    return photos


def load_folder(path: str | Path) -> list[Photo]:
    """User photos: every JPEG or PNG at the top level of a folder, sorted by file name, as RGB.

    Raises:
        NotADirectoryError: path is not a folder.
        ValueError: the folder holds no JPEG/PNG, or a file cannot be decoded (named in the message).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise NotADirectoryError(f"not a folder: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {folder}")
    photos = []
    for file in files:
        image = _read_rgb(file)  # ImageError (a ValueError) names the file and the reason
        photos.append(Photo(file.name, str(folder), "user-supplied", image))
    return photos


def manifest(photos: Sequence[Photo]) -> list[dict]:
    """What a run used: name, source_package, licence and original size [H, W] of each photo."""
    return [{"name": p.name, "source_package": p.source_package, "licence": p.licence,
             "size": list(p.image.shape[-2:])} for p in photos]


def split_photos(photos: Sequence[Photo], test_fraction: float = 0.25,
                 seed: int = 0) -> tuple[list[Photo], list[Photo]]:
    """Split by source photo: no photo's pixels end up on both sides.

    Args:
        test_fraction: share of photos held out, rounded, at least 1 and at most len - 1.
        seed: the shuffle's seed; the same photos and seed give the same split.
    Returns:
        (train, test), each in the input order.
    """
    names = [p.name for p in photos]
    if len(set(names)) != len(names):
        raise ValueError(f"photo names must be unique to split by photo, got {names}")
    if len(photos) < 2:
        raise ValueError(f"need at least 2 photos to split, got {len(photos)}")
    n_test = min(max(round(test_fraction * len(photos)), 1), len(photos) - 1)
    order = torch.randperm(len(photos), generator=torch.Generator().manual_seed(seed)).tolist()
    test_idx = set(order[:n_test])
    train = [p for i, p in enumerate(photos) if i not in test_idx]
    test = [p for i, p in enumerate(photos) if i in test_idx]
    return train, test


def fit_scale(image: Tensor, size: int, max_scale: float = 4.0) -> Tensor:
    """Resize so the short side lies in [size, max_scale * size] (unchanged if it already does).

    Small photos are upscaled so a crop fits; large ones are downscaled (antialiased) so a crop
    shows a part of the scene, not a flat patch of a 1400 px photo.

    Shape:
        image: (3, H, W) -> (3, H', W').
    """
    short = min(image.shape[-2:])
    target = min(max(short, size), max_scale * size)
    if target == short:
        return image
    h, w = (max(size, round(d * target / short)) for d in image.shape[-2:])
    return F.interpolate(image[None], size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)


def random_crops(photo: Photo | Tensor, n: int, size: int, rng: torch.Generator,
                 max_scale: float = 4.0) -> Tensor:
    """n random square crops of one photo, after ``fit_scale``.

    Shape:
        photo image (3, H, W) -> (n, 3, size, size).
    """
    image = fit_scale(photo.image if isinstance(photo, Photo) else photo, size, max_scale)
    h, w = image.shape[-2:]
    tops = torch.randint(h - size + 1, (n,), generator=rng).tolist()
    lefts = torch.randint(w - size + 1, (n,), generator=rng).tolist()
    if n == 0:
        return image.new_empty(0, 3, size, size)
    return torch.stack([image[:, t:t + size, l:l + size] for t, l in zip(tops, lefts)])
