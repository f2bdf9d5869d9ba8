"""5-point face alignment to the ArcFace 112x112 template (numpy + PIL only).

Owns: the ArcFace landmark template, the Umeyama similarity estimate, and the
affine warp that turns an image plus 5 landmarks into an aligned crop.
Does not own: detecting faces or landmarks, or embedding crops
(`cig_jax.faces.identity`).

Landmark order everywhere in cig_jax (insightface's order): left eye centre,
right eye centre, nose tip, left mouth corner, right mouth corner, where
"left" means smaller x in the image. Coordinates are (x, y) image pixels with
pixel centres at integers, the convention of `cv2.warpAffine`, so a crop made
here matches insightface's `norm_crop` up to bilinear rounding.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# [5, 2] ArcFace landmark positions in a 112x112 crop (x, y).
ARCFACE_TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)


def arcface_template(crop_size: int = 112) -> np.ndarray:
    """[5, 2] ArcFace template for a square crop of `crop_size` (a multiple of 112 or 128)."""
    if crop_size % 112 == 0:
        return ARCFACE_TEMPLATE_112 * (crop_size / 112.0)
    if crop_size % 128 == 0:
        ratio = crop_size / 128.0
        template = ARCFACE_TEMPLATE_112 * ratio
        template[:, 0] += 8.0 * ratio
        return template
    raise ValueError(f"ArcFace crop_size must be a multiple of 112 or 128, got {crop_size}")


def umeyama_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping src -> dst.

    Umeyama (1991), no reflection. src, dst: [N, 2] with N >= 2.
    Returns the [2, 3] matrix M with dst ~= src @ M[:, :2].T + M[:, 2].
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2:
        raise ValueError(f"need two [N>=2, 2] point sets, got {src.shape} and {dst.shape}")
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / len(src)  # [2, 2]
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[-1] = -1.0  # closest proper rotation
    rotation = u @ np.diag(d) @ vt
    src_var = (src_c**2).sum() / len(src)
    if src_var == 0:
        raise ValueError("degenerate landmarks: all source points coincide")
    scale = (s * d).sum() / src_var
    translation = dst_mean - scale * rotation @ src_mean
    return np.concatenate([scale * rotation, translation[:, None]], axis=1)


def warp_affine(image: np.ndarray, matrix: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear warp of `image` [H, W, C] uint8 by the forward [2, 3] `matrix` into (width, height).

    Same geometry as `cv2.warpAffine(image, matrix, size)` with a black border.
    """
    forward = np.vstack([np.asarray(matrix, dtype=np.float64), [0.0, 0.0, 1.0]])
    a, b, c, d, e, f = np.linalg.inv(forward)[:2].ravel()
    # PIL samples output pixel (x, y) at inverse(x + .5, y + .5) - .5; shift the
    # offsets so that it samples at inverse(x, y) like cv2.
    c = c - (a + b) / 2 + 0.5
    f = f - (d + e) / 2 + 0.5
    warped = Image.fromarray(np.ascontiguousarray(image)).transform(
        tuple(size), Image.Transform.AFFINE, (a, b, c, d, e, f), resample=Image.Resampling.BILINEAR
    )
    return np.asarray(warped)


def align_face(image: np.ndarray, landmarks: np.ndarray, crop_size: int = 112) -> tuple[np.ndarray, np.ndarray]:
    """ArcFace-aligned crop of one face.

    image: [H, W, 3] uint8; landmarks: [5, 2] in the order of this module's docstring.
    Returns (crop [crop_size, crop_size, 3] uint8, matrix [2, 3] image -> crop).
    """
    matrix = umeyama_similarity(landmarks, arcface_template(crop_size))
    return warp_affine(image, matrix, (crop_size, crop_size)), matrix
