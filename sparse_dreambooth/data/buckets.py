"""Aspect-ratio buckets: the crop sizes SDXL was trained at, so a portrait photo trains as a portrait.

SDXL's multi-aspect training (Podell et al. 2023, appendix "Multi-aspect training") used 40
(height, width) sizes near 1024^2 pixels, in multiples of 64. At another `resolution` each side is
scaled by resolution / 1024 and rounded to the grid (64 px at 1024, resolution / 16 in general, but
never below 8 px, the VAE's factor, so a latent keeps whole pixels); sizes that round together are
kept once. Each image goes to the bucket nearest its aspect ratio (measured as |log(h/w) - log(H/W)|,
so 2:1 and 1:2 are equally far from 1:1; a tie goes to the earlier bucket in the list).

Torch-free.
"""

import math

# (height, width) of SDXL's buckets at 1024^2, portrait-widest first as the paper lists them.
SDXL_BUCKETS_1024 = (
    (512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728), (576, 1664), (640, 1600),
    (640, 1536), (704, 1472), (704, 1408), (704, 1344), (768, 1344), (768, 1280), (832, 1216), (832, 1152),
    (896, 1152), (896, 1088), (960, 1088), (960, 1024), (1024, 1024), (1024, 960), (1088, 960), (1088, 896),
    (1152, 896), (1152, 832), (1216, 832), (1280, 768), (1344, 768), (1408, 704), (1472, 704), (1536, 640),
    (1600, 640), (1664, 576), (1728, 576), (1792, 576), (1856, 512), (1920, 512), (1984, 512), (2048, 512),
)  # fmt: skip
SDXL_RESOLUTION = 1024
VAE_FACTOR = 8  # SDXL's VAE (and the tiny model's) downsamples by 8: a bucket side is a multiple of it


def bucket_grid(resolution: int) -> int:
    """The multiple of pixels a bucket side is rounded to: 64 at 1024, scaled, at least the VAE factor."""
    return max(VAE_FACTOR, resolution // 16 // VAE_FACTOR * VAE_FACTOR)


def bucket_sizes(resolution: int) -> tuple[tuple[int, int], ...]:
    """SDXL's (height, width) buckets at `resolution`^2 pixels: its list at 1024, scaled to the grid."""
    grid, scale = bucket_grid(resolution), resolution / SDXL_RESOLUTION
    sizes = {}
    for height, width in SDXL_BUCKETS_1024:
        # Half rounds up (not Python's to-even), so a scaled size is easy to work out by hand.
        size = tuple(max(grid, math.floor(side * scale / grid + 0.5) * grid) for side in (height, width))
        sizes.setdefault(size, None)
    return tuple(sizes)


def nearest_bucket(height: int, width: int, buckets) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest `height / width` on a log scale; ties go to the first."""
    aspect = math.log(height / width)
    return min(buckets, key=lambda bucket: abs(math.log(bucket[0] / bucket[1]) - aspect))
