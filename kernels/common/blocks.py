"""Block-size selection shared by every kernel: fit a preferred tile to a length under a platform's rules.

Rules per target (what each compiler accepts for the dimensions a tile is made of):
  'tpu'       -> multiples of `align` (8 sublanes for rows, 128 lanes for the minor dimension), or the whole
                 (padded) length when it is shorter;
  'triton'    -> powers of two, at least 16 (the smallest `tl.dot` operand);
  'interpret' -> anything; powers of two keep the tests close to the GPU shapes.
"""
from __future__ import annotations

import math


def round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def next_power_of_2(x: int) -> int:
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


def fit_block(length: int, preferred: int, target: str, *, align: int = 8, minimum: int = 16) -> int:
    """The tile size used for an axis of `length`: `preferred`, shrunk for short axes, legal for `target`."""
    if target == "tpu":
        return min(preferred, round_up(max(length, 1), align))
    block = min(preferred, next_power_of_2(max(length, 1)))
    return max(block, minimum) if target == "triton" else block


def padded_length(length: int, block: int) -> int:
    """`length` rounded up to a whole number of blocks (kernels pad, then mask or drop the tail)."""
    return max(block, round_up(length, block))


def num_blocks(length: int, block: int) -> int:
    return math.ceil(length / block)


def feature_dim(dim: int, target: str) -> int:
    """Head/feature dimension as the kernel sees it: Triton tiles need a power of two (zero padding is exact)."""
    return max(16, next_power_of_2(dim)) if target == "triton" else dim
