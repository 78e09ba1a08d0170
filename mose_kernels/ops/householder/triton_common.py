"""Choices shared by the Triton kernels of the Householder apply: tile of the reflector axis,
``tl.dot`` precision per weight dtype, and the autotune config lists.

Importing this module imports ``triton``; ``wy_triton`` turns an ``ImportError`` into "backend
absent".
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# True when kernels run in the Triton interpreter (CPU tensors): autotune then gets a single
# config, because the interpreter would otherwise "benchmark" every config on the CPU.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
INTERPRET_RTNE_FIX = tl.constexpr(INTERPRET)

# Largest reflector tile one program keeps in registers (the fused forward keeps X and P,
# each BK x BM fp32). Larger k goes through the split path (project / update kernels).
MAX_FUSED_BK = 128

# tl.dot input precision by the dtype of W. Half-precision values are exact in tf32 (bf16 has
# 8, fp16 11 significant bits, tf32 11), so only V and P are rounded to tf32 (2^-11 relative),
# below the 2^-9 / 2^-11 rounding of the stored result. float32 W keeps fp32 accuracy with
# "tf32x3" (three tf32 MMAs, ~fp32 error) rather than "ieee" (CUDA-core FMA, 7x slower on H200:
# 227 us vs the 110 us memory floor at k = 64, MOSE_NOTES section 3). The interpreter ignores it.
_DOT_PRECISION = {torch.float32: "tf32x3", torch.float16: "tf32", torch.bfloat16: "tf32"}


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision for operands derived from a weight of this dtype."""
    return _DOT_PRECISION[dtype]


def block_k(k: int, cap: int = MAX_FUSED_BK) -> int:
    """Tile of the reflector axis: ``k`` padded to a power of two >= 16 (tl.dot minimum), at most ``cap``."""
    return min(max(16, triton.next_power_of_2(k)), cap)


def configs(blocks: list[dict[str, int]], warps_stages: list[tuple[int, int]]) -> list[triton.Config]:
    """Cartesian product of tile dicts and (num_warps, num_stages); one config in the interpreter."""
    out = [triton.Config(dict(b), num_warps=w, num_stages=s) for b in blocks for w, s in warps_stages]
    return out[:1] if INTERPRET else out


def prune_by_registers(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop configs whose fp32 tiles (``BK x BM``, ``BK x BN``, two ``BN x BM``) would need more
    than ~96 registers a thread, a spill guess (not measured) that matters for ``BK = 128``; keeps
    the smallest config if none fits."""
    bk = kwargs.get("BK", named_args.get("BK", 16))

    def tile_elems(c: triton.Config) -> int:
        bm, bn = c.kwargs.get("BM", 64), c.kwargs.get("BN", 64)
        return bk * bm + bk * bn + 2 * bn * bm

    fits = [c for c in configs if tile_elems(c) <= 96 * 32 * c.num_warps]
    return fits or [min(configs, key=lambda c: tile_elems(c) / c.num_warps)]


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (132 on an H200); a nominal 132 off-GPU, so the
    interpreter takes the same path decisions as the GPU would."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


@triton.jit
def round_to(b_x, DTYPE: tl.constexpr):
    """``b_x`` (fp32) rounded to nearest-even in ``DTYPE``.

    The interpreter truncates fp32 -> bf16 (twice the rounding error, whatever
    ``fp_downcast_rounding`` says), so there bf16 is rounded on the bits first; compiled code uses
    the hardware conversion, which is round-to-nearest-even.
    """
    if INTERPRET_RTNE_FIX and tl.bfloat16 == DTYPE:
        b_bits = b_x.to(tl.uint32, bitcast=True)
        b_bits = (b_bits + 0x7FFF + ((b_bits >> 16) & 1)) & 0xFFFF0000
        b_x = b_bits.to(tl.float32, bitcast=True)
    return b_x.to(DTYPE)
