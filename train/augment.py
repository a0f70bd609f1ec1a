"""Vision augmentation for the published recipes, in one place.

Per example, on the host (numpy / PIL, inside the grain pipeline, with the example's own `np.random.Generator`):
`random_resized_crop`, `center_crop`, `random_flip`, `rand_augment`. Per batch, on the device (jax, so that a global
batch is mixed the same way however it is split over processes): `mixup_cutmix`, and `smooth_labels`.
Images are uint8 `[H, W, C]` on the host; the device side works on float `[B, H, W, C]` and soft targets `[B, K]`.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageEnhance, ImageOps

_RESAMPLE = Image.BICUBIC
_FILL = (128, 128, 128)


def _pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def _array(image: Image.Image, channels: int) -> np.ndarray:
    out = np.asarray(image, dtype=np.uint8)
    return out[..., None] if out.ndim == 2 and channels == 1 else out


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """Grayscale -> RGB by repetition (and RGBA -> RGB), so small gray datasets feed RGB models unchanged."""
    image = image[..., None] if image.ndim == 2 else image
    if image.shape[-1] == channels:
        return image
    if image.shape[-1] == 1:
        return np.repeat(image, channels, axis=-1)
    return image[..., :channels]


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, size: int, *, scale=(0.08, 1.0),
                        ratio=(3 / 4, 4 / 3)) -> np.ndarray:
    """Crop of random area fraction in `scale` and aspect ratio in `ratio` (log-uniform), resized to `size`^2
    (Szegedy et al. 2015). Falls back to the largest central crop of valid ratio after 10 tries."""
    h, w = image.shape[:2]
    area = h * w
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            break
    else:
        aspect = w / h
        cw, ch = (w, int(round(w / min(ratio)))) if aspect < min(ratio) else \
            ((int(round(h * max(ratio))), h) if aspect > max(ratio) else (w, h))
        cw, ch = min(cw, w), min(ch, h)
        top, left = (h - ch) // 2, (w - cw) // 2
    crop = _pil(image).crop((left, top, left + cw, top + ch)).resize((size, size), _RESAMPLE)
    return _array(crop, image.shape[-1])


def center_crop(image: np.ndarray, size: int, *, crop_pct: float = 0.875) -> np.ndarray:
    """Resize the shorter side to `size / crop_pct`, then take the central `size`^2 (the usual evaluation)."""
    h, w = image.shape[:2]
    short = size / crop_pct
    nh, nw = max(size, int(round(h * short / min(h, w)))), max(size, int(round(w * short / min(h, w))))
    resized = _pil(image).resize((nw, nh), _RESAMPLE)
    top, left = (nh - size) // 2, (nw - size) // 2
    return _array(resized.crop((left, top, left + size, top + size)), image.shape[-1])


def random_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return image[:, ::-1] if rng.random() < 0.5 else image


# RandAugment (Cubuk et al. 2020): each op takes a PIL image, a magnitude in [0, 1] (level / 10, the scale of the
# reference implementation; levels above 10 extrapolate) and a random sign.
def _affine(img, matrix):
    return img.transform(img.size, Image.AFFINE, matrix, resample=Image.BILINEAR, fillcolor=_FILL)


_OPS = {
    "AutoContrast": lambda img, m, s: ImageOps.autocontrast(img),
    "Equalize": lambda img, m, s: ImageOps.equalize(img),
    "Invert": lambda img, m, s: ImageOps.invert(img),
    "Rotate": lambda img, m, s: img.rotate(s * 30.0 * m, resample=Image.BILINEAR, fillcolor=_FILL),
    "Posterize": lambda img, m, s: ImageOps.posterize(img, int(np.clip(8 - round(4 * m), 1, 8))),
    "Solarize": lambda img, m, s: ImageOps.solarize(img, int(np.clip(256 - 256 * m, 0, 256))),
    "SolarizeAdd": lambda img, m, s: Image.fromarray(np.where(
        np.asarray(img) < 128, np.minimum(np.asarray(img).astype(np.int32) + int(110 * m), 255),
        np.asarray(img)).astype(np.uint8)),
    "Color": lambda img, m, s: ImageEnhance.Color(img).enhance(max(0.0, 1 + s * 0.9 * m)),
    "Contrast": lambda img, m, s: ImageEnhance.Contrast(img).enhance(max(0.0, 1 + s * 0.9 * m)),
    "Brightness": lambda img, m, s: ImageEnhance.Brightness(img).enhance(max(0.0, 1 + s * 0.9 * m)),
    "Sharpness": lambda img, m, s: ImageEnhance.Sharpness(img).enhance(max(0.0, 1 + s * 0.9 * m)),
    "ShearX": lambda img, m, s: _affine(img, (1, s * 0.3 * m, 0, 0, 1, 0)),
    "ShearY": lambda img, m, s: _affine(img, (1, 0, 0, s * 0.3 * m, 1, 0)),
    "TranslateX": lambda img, m, s: _affine(img, (1, 0, s * 0.45 * m * img.size[0], 0, 1, 0)),
    "TranslateY": lambda img, m, s: _affine(img, (1, 0, 0, 0, 1, s * 0.45 * m * img.size[1])),
}
RAND_AUGMENT_OPS = tuple(_OPS)


def rand_augment(image: np.ndarray, rng: np.random.Generator, *, num_ops: int = 2, magnitude: float = 9.0,
                 ops=RAND_AUGMENT_OPS) -> np.ndarray:
    """Applies `num_ops` operations drawn uniformly (with replacement) from `ops`, each at `magnitude` (0-10 scale,
    as in the paper's `RandAugment(N, M)`). RGB uint8 in and out."""
    if num_ops <= 0:
        return image
    img = _pil(to_channels(image, 3))
    for name in rng.choice(np.asarray(ops), size=num_ops):
        img = _OPS[str(name)](img, magnitude / 10.0, 1.0 if rng.random() < 0.5 else -1.0)
    return _array(img, 3)


def smooth_labels(labels: jax.Array, num_classes: int, smoothing: float = 0.0) -> jax.Array:
    """One-hot targets `[B, K]` with `smoothing` mass spread uniformly over all classes."""
    one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    return one_hot * (1.0 - smoothing) + smoothing / num_classes


def mixup_cutmix(key: jax.Array, images: jax.Array, targets: jax.Array, *, mixup_alpha: float = 0.0,
                 cutmix_alpha: float = 0.0, switch_prob: float = 0.5, prob: float = 1.0):
    """Mixes each example with the batch reversed (Zhang et al. 2018; Yun et al. 2019), one draw per batch.

    With both alphas > 0, CutMix is chosen with `switch_prob`. CutMix pastes a box of area `1 - lam` and corrects
    `lam` to the box actually pasted after clipping at the borders. With probability `1 - prob` nothing is mixed.
    Returns `(images, targets)`.
    """
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return images, targets
    k_apply, k_switch, k_mix, k_cut, k_y, k_x = jax.random.split(key, 6)
    h, w = images.shape[1:3]
    use_cutmix = (cutmix_alpha > 0) & ((mixup_alpha <= 0) | (jax.random.uniform(k_switch) < switch_prob))
    lam_mix = jax.random.beta(k_mix, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else jnp.float32(1.0)
    lam_cut = jax.random.beta(k_cut, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0 else jnp.float32(1.0)
    cut = jnp.sqrt(1.0 - lam_cut)
    ch, cw = (h * cut).astype(jnp.int32), (w * cut).astype(jnp.int32)
    cy, cx = jax.random.randint(k_y, (), 0, h), jax.random.randint(k_x, (), 0, w)
    y0, y1 = jnp.clip(cy - ch // 2, 0, h), jnp.clip(cy + ch // 2, 0, h)
    x0, x1 = jnp.clip(cx - cw // 2, 0, w), jnp.clip(cx + cw // 2, 0, w)
    rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
    box = ((rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1))[None, :, :, None]
    lam_box = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
    apply = jax.random.uniform(k_apply) < prob
    lam = jnp.where(apply, jnp.where(use_cutmix, lam_box, lam_mix), 1.0).astype(jnp.float32)
    flipped = images[::-1]
    mixed_cut = jnp.where(box, flipped, images)
    mixed_up = lam * images + (1.0 - lam) * flipped
    images = jnp.where(apply & use_cutmix, mixed_cut, jnp.where(apply, mixed_up, images)).astype(images.dtype)
    return images, lam * targets + (1.0 - lam) * targets[::-1]
