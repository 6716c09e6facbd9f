"""GroupNorm, with the scale-shift and SiLU that follow it in the U-Net, as two Triton kernels over a channels-last
(N, H·W, C) tensor: per-channel moments, then one fused y = act(x·A + B) with A, B per (image, channel).

An experiment (docs/gpu/triton_norm_h200.txt): in isolation, at the preset's sampling shapes on an H200, the two
kernels ran 25-55% faster than Inductor's kernels for the same ops; in the compiled sampling step they were slower
overall (107.7 against 103.2 ms), because Inductor then materialises each norm's input (residual sums, convolution
outputs plus bias, concatenations) instead of fusing those ops into its own statistics and apply kernels.

Only the inference forward (no autograd): `cfg.nets.unet.GroupNorm` calls `group_norm_act` where torch.compile
traces a channels-last CUDA tensor with gradients off, and keeps its Inductor form elsewhere.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
except ImportError:  # pragma: no cover - torch's CUDA builds ship Triton; without it the Inductor form runs
    triton = None

HAS_TRITON = triton is not None

MOMENTS_TILE, APPLY_TILE = 2048, 8192  # elements of a tile: 16 per thread at 4 and 8 warps


def _tile(hw: int, c: int, elements: int) -> tuple[int, int]:
    """(rows, channels) of a tile: channels up to 128 in one contiguous row segment, rows to fill `elements`."""
    block_c = min(triton.next_power_of_2(c), 128)
    return max(1, min(triton.next_power_of_2(hw), elements // block_c)), block_c


if HAS_TRITON:

    @triton.jit
    def _moments_kernel(x_ptr, mean_ptr, var_ptr, HW, C, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
        """Per (n, c): the mean and the variance over the H·W rows of image n, in float32. Sums of d = x − k and d²
        with k the channel's first value: shifted by a sample of the data, the variance keeps its digits when the
        mean is far larger than the spread (a one-pass Σx² loses them). Each thread keeps its own partial sums
        across the loop; the tile is reduced across threads once, at the end."""
        n = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cols < C
        base = x_ptr + n * HW * C
        k = tl.load(base + cols, mask=cmask, other=0.0).to(tl.float32)  # row 0
        s1 = tl.zeros([BLOCK_HW, BLOCK_C], dtype=tl.float32)
        s2 = tl.zeros([BLOCK_HW, BLOCK_C], dtype=tl.float32)
        for start in range(0, HW, BLOCK_HW):
            rows = start + tl.arange(0, BLOCK_HW)
            mask = (rows < HW)[:, None] & cmask[None, :]
            x = tl.load(base + rows[:, None] * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            d = tl.where(mask, x - k[None, :], 0.0)
            s1 += d
            s2 += d * d
        t1 = tl.sum(s1, axis=0)
        tl.store(mean_ptr + n * C + cols, k + t1 / HW, mask=cmask)
        tl.store(var_ptr + n * C + cols, tl.maximum(tl.sum(s2, axis=0) - t1 * t1 / HW, 0.0) / HW, mask=cmask)

    @triton.jit
    def _scale_shift_act_kernel(
        x_ptr, a_ptr, b_ptr, y_ptr, HW, C, SILU: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr
    ):
        """y[n, r, c] = act(x[n, r, c]·A[n, c] + B[n, c]) on a tile of rows r of image n, in float32, stored in
        y's dtype."""
        n = tl.program_id(0).to(tl.int64)
        rows = tl.program_id(1) * BLOCK_HW + tl.arange(0, BLOCK_HW)
        cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cols < C
        mask = (rows < HW)[:, None] & cmask[None, :]
        a = tl.load(a_ptr + n * C + cols, mask=cmask, other=0.0)
        b = tl.load(b_ptr + n * C + cols, mask=cmask, other=0.0)
        offsets = n * HW * C + rows[:, None] * C + cols[None, :]
        u = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32) * a[None, :] + b[None, :]
        if SILU:
            u = u * tl.sigmoid(u)
        tl.store(y_ptr + offsets, u.to(y_ptr.dtype.element_ty), mask=mask)

    @triton_op("cfg::group_norm_act", mutates_args={})
    def _group_norm_act(
        x: Tensor,
        weight: Tensor,
        bias: Tensor,
        pre_bias: Tensor | None,
        scale: Tensor | None,
        shift: Tensor | None,
        num_groups: int,
        eps: float,
        silu: bool,
        dtype: torch.dtype,
    ) -> Tensor:
        n, c, h, w = x.shape
        g = num_groups
        if not x.is_contiguous(memory_format=torch.channels_last):
            raise ValueError(f"group_norm_act needs a channels-last tensor, got strides {x.stride()}")
        mean_c = torch.empty((n, c), device=x.device, dtype=torch.float32)
        var_c = torch.empty((n, c), device=x.device, dtype=torch.float32)
        block_hw, block_c = _tile(h * w, c, MOMENTS_TILE)
        wrap_triton(_moments_kernel)[(n, triton.cdiv(c, block_c))](
            x, mean_c, var_c, h * w, c, BLOCK_HW=block_hw, BLOCK_C=block_c, num_warps=4
        )
        # per (n, c), on N×C numbers: the group statistics (population variance var_g = mean_c(var_c +
        # (mean_c − mean_g)²)), then y = act(x·a + b) with the norm's affine, the scale-shift and pre_bias in a, b
        if pre_bias is not None:
            mean_c = mean_c + pre_bias.float()
        mean_c, var_c = mean_c.view(n, g, -1), var_c.view(n, g, -1)
        mean_g = mean_c.mean(-1, keepdim=True)  # (N, G, 1)
        rstd = torch.rsqrt((var_c + (mean_c - mean_g) ** 2).mean(-1, keepdim=True) + eps)
        a = rstd * weight.float().view(1, g, -1)  # (N, G, C/G)
        b = bias.float().view(1, g, -1) - mean_g * a
        a, b = a.reshape(n, c), b.reshape(n, c)
        if scale is not None and shift is not None:
            s = 1 + scale.float().reshape(n, c)
            a, b = a * s, b * s + shift.float().reshape(n, c)
        if pre_bias is not None:  # (x + β₀)·a + b
            b = b + pre_bias.float() * a
        a, b = a.contiguous(), b.contiguous()
        y = torch.empty((n, c, h, w), device=x.device, dtype=dtype, memory_format=torch.channels_last)
        block_hw, block_c = _tile(h * w, c, APPLY_TILE)
        grid = (n, triton.cdiv(h * w, block_hw), triton.cdiv(c, block_c))
        wrap_triton(_scale_shift_act_kernel)[grid](
            x, a, b, y, h * w, c, SILU=silu, BLOCK_HW=block_hw, BLOCK_C=block_c, num_warps=8
        )
        return y


def group_norm_act(
    x: Tensor,  # (N, C, H, W), channels-last
    num_groups: int,
    weight: Tensor,  # (C,) GroupNorm's γ
    bias: Tensor,  # (C,) GroupNorm's β
    eps: float,
    *,
    pre_bias: Tensor | None = None,  # (C,) added to x before the norm (a convolution's bias, folded in here)
    scale: Tensor | None = None,  # (N, C, 1, 1): y ← y·(1 + scale) + shift after the norm
    shift: Tensor | None = None,
    silu: bool = False,  # y ← silu(y) last
    dtype: torch.dtype | None = None,  # of the output; x's by default
) -> Tensor:
    """silu(GroupNorm(x + pre_bias)·(1 + scale) + shift) by two Triton kernels; the output channels-last."""
    if (scale is None) != (shift is None):
        raise ValueError("group_norm_act: scale and shift go together; got only one of them")
    return torch.ops.cfg.group_norm_act(
        x, weight, bias, pre_bias, scale, shift, num_groups, eps, silu, dtype or x.dtype
    )
