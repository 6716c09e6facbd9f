"""ADM-style U-Net ε_θ(z_λ, λ, c) (Dhariwal & Nichol 2021) and an EMA of its weights.

Residual blocks with GroupNorm and SiLU, the embedding added as a scale and shift after the first norm,
self-attention at chosen resolutions, a sinusoidal embedding of the log-SNR λ and a learned class embedding
with one extra index (``num_classes``) reserved for the null label of classifier-free guidance.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cfg.io import atomic_save, load, tensors_sha256


@dataclass
class UNetConfig:
    image_size: int = 16  # input height = width, pixels
    in_channels: int = 1  # image channels
    num_classes: int = 10  # conditioning classes; index num_classes is the null label
    base_width: int = 32  # channels at the first level
    channel_mult: tuple[int, ...] = (1, 2)  # width multiplier per level; len = number of levels
    blocks_per_level: int = 1  # residual blocks per level
    attention_resolutions: tuple[int, ...] = (8,)  # feature-map sizes with self-attention
    dropout: float = 0.1  # dropout in residual blocks
    head_channels: int = 32  # channels per attention head
    lambda_scale: float = 25.0  # λ ∈ [−20, 20] is embedded as sinusoids of λ·lambda_scale

    def __post_init__(self) -> None:
        self.channel_mult = tuple(self.channel_mult)
        self.attention_resolutions = tuple(self.attention_resolutions)
        if self.image_size % (2 ** (len(self.channel_mult) - 1)):
            raise ValueError(
                f"image_size {self.image_size} must be divisible by 2^(levels-1) = "
                f"{2 ** (len(self.channel_mult) - 1)} for channel_mult {self.channel_mult}"
            )

    @property
    def null_label(self) -> int:
        return self.num_classes

    @classmethod
    def from_params(cls, model, *, image_size: int, in_channels: int, num_classes: int) -> UNetConfig:
        """The U-Net that params.yaml's `model` section (`cfg.study.config.ModelParams`) describes, for images of the
        given size, channels and classes."""
        return cls(
            image_size=image_size,
            in_channels=in_channels,
            num_classes=num_classes,
            base_width=model.base_width,
            channel_mult=tuple(model.channel_mult),
            blocks_per_level=model.blocks_per_level,
            attention_resolutions=tuple(model.attention_resolutions),
            dropout=model.dropout,
            head_channels=model.head_channels,
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _compiled_channels_last(x: Tensor) -> bool:
    """Whether torch.compile is tracing a channels-last image batch: where GroupNorm, Conv2d and Upsample below
    take their compiled-GPU forms (eager runs and contiguous inputs keep torch's own)."""
    return (
        torch.compiler.is_compiling() and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    )


def _channel_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Each channel's mean and population variance over H × W of a (B, C, H, W) batch, in float32: (B, C) each.

    A bf16/fp16 batch that no gradient flows through (sampling) takes them from float32 sums of x and x²,
    var = E[x²] − E[x]²: one pass with an add and a multiply-add an element, as NVIDIA's NHWC GroupNorm kernels for
    diffusion U-Nets do (TensorRT's groupNormPlugin). Its rounding error, relative to the var + eps that GroupNorm
    divides by, grows with q = (mean² + var) / (var + eps): at most about 3n · 2⁻²⁴ · q for n elements summed one
    after another, far less summed in a tree. A group of channels all nearly constant far from zero (q in the
    millions) would lose its variance; in trained networks q stayed small: below 100 in every group of any GroupNorm
    of the embedded default's network (real test images, 9 noise levels; median 1.3), at most 31 in the preset's
    (trained 2,000 steps on an H200, 7 noise levels), where the compiled bf16 ε with the sums and with Welford's
    reduction were as far from the float64 network's, to three digits, at every noise level. The preset's guided
    sampling step ran 92.57 against 95.34 ms on an H200, its reductions 15.3 against 18.4 ms
    (docs/gpu/sum_statistics_h200.txt). Inputs that need a gradient (training) keep var_mean's Welford reduction, as
    do float32 inputs, whose precision the sums would waste: in the training step the sums added 33 Triton kernels a
    step and no speed.
    """
    if x.dtype in (torch.bfloat16, torch.float16) and not x.requires_grad:
        xf = x.float()
        mean, mean_sq = xf.mean(dim=(2, 3)), (xf * xf).mean(dim=(2, 3))
        return mean, (mean_sq - mean * mean).clamp_min(0)
    return _welford_moments(x)


def _welford_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """_channel_moments from var_mean's Welford reduction, whatever the input."""
    var, mean = torch.var_mean(x.float(), dim=(2, 3), correction=0)
    return mean, var


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same parameters and state dict) whose statistics, when torch.compile traces it on a
    channels-last tensor, come from per-channel moments over H×W combined per group (population variance:
    var_g = mean_c(var_c + (mean_c − mean_g)²)). With C innermost in memory a group is a few channels (2–12 at the
    preset's widths) strided by C, which Inductor's reduction over the native op reads uncoalesced; per-channel
    moments read whole rows (docs/gpu/layout_h100.txt). Eager and contiguous inputs keep the native kernel. The
    output dtype is the native op's: float32 under CUDA autocast, the input's otherwise.

    With `scale` and `shift` (broadcastable to (B, C, 1, 1)) it returns the residual blocks' modulated
    GroupNorm(x) · (1 + scale) + shift. The compiled channels-last form folds the modulation into its per-(example,
    channel) affine x · a + b, so that the pass over the activations loads fewer per-channel values and does less
    arithmetic per element: in a residual block at the preset's sampling batch that pass ran 0.58 against 0.72 ms on
    an H200, and the guided sampling step 0.7–0.8% faster in two single-process pairs (docs/gpu/film_fold_h200.txt).
    The output dtype is the unfolded product's; its (1 + scale) is written in scale's dtype, which Inductor, in
    either form, may compute in float32."""

    @staticmethod
    def check_modulation(x: Tensor, scale: Tensor | None, shift: Tensor | None) -> None:
        """Both or neither of scale and shift, each a 4-dim tensor broadcastable to (B, C, 1, 1): one value per
        example and channel (or per channel), for both the eager product and the compiled fold."""
        if (scale is None) != (shift is None):
            given, missing = ("scale", "shift") if shift is None else ("shift", "scale")
            raise ValueError(
                f"GroupNorm: got {given} without {missing}; the modulation GN(x) * (1 + scale) + shift takes both "
                "(or neither)"
            )
        if scale is None:
            return
        b, c = x.shape[:2]
        for name, t in (("scale", scale), ("shift", shift)):
            ok = isinstance(t, Tensor) and t.dim() == 4 and t.shape[2:] == (1, 1)
            if not (ok and t.shape[0] in (1, b) and t.shape[1] in (1, c)):
                shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(
                    f"GroupNorm: {name} of shape {shape} for an input of {b} examples and {c} channels; it takes a "
                    f"tensor of shape ({b} or 1, {c} or 1, 1, 1)"
                )

    def forward(self, x: Tensor, scale: Tensor | None = None, shift: Tensor | None = None) -> Tensor:
        self.check_modulation(x, scale, shift)
        if not (self.affine and _compiled_channels_last(x)):
            out = super().forward(x)
            return out if scale is None else out * (1 + scale) + shift
        b, c = x.shape[:2]
        g = self.num_groups
        xf = x.float()
        mean_c, var_c = _channel_moments(x)  # (B, C)
        mean_c, var_c = mean_c.view(b, g, -1), var_c.view(b, g, -1)
        mean_g = mean_c.mean(-1, keepdim=True)
        rstd = torch.rsqrt((var_c + (mean_c - mean_g) ** 2).mean(-1, keepdim=True) + self.eps)  # (B, G, 1)
        a = rstd * self.weight.float().view(1, g, -1)
        a, s = a.view(b, c, 1, 1), (self.bias.float().view(1, g, -1) - mean_g * a).view(b, c, 1, 1)
        dtype = x.dtype
        if scale is not None:
            # (B or 1, C or 1, 1, 1), the shapes check_modulation lets through: broadcast against a and s
            m = (1 + scale).float()
            a, s = a * m, s * m + shift.float()
            dtype = torch.promote_types(dtype, torch.promote_types(scale.dtype, shift.dtype))
        out = xf * a + s
        # CUDA autocast runs group_norm in float32 (the CPU's does not)
        return out if x.is_cuda and torch.is_autocast_enabled("cuda") else out.to(dtype)


class _ChannelsLastGrad(torch.autograd.Function):
    """The identity, whose backward hands on its gradient as a channels-last clone."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return torch.ops.aten.clone.default(grad, memory_format=torch.channels_last)


# Channel counts that cuDNN's bf16 tensor-core convolutions want, per device type: a multiple of 8. With one input
# channel (the preset's stem) or one output channel (its last convolution) cuDNN fell back to an older kernel family
# and a layout conversion (`implicit_convolve_sgemm` 1.29 ms and `nhwcToNchwKernel` 0.40 ms of the preset's guided
# sampling step on an H200, both gone with the padding). Zero channels added to reach the multiple change no value
# (up to rounding: other kernels); on one H200 the sampling step ran 102.98 ms against 104.48 unpadded, the training
# step 17.02 against 17.40 (docs/gpu/channel_padding_h200.txt). Other devices keep the channel counts as they are.
# The last convolution has since gone to `tap_conv` (below); the stem is still padded.
_CHANNEL_MULTIPLE = {"cuda": 8}


# Convolutions with at most this many output channels (and more input channels), per device type, that cfg's
# Conv2d computes under compile as a 1×1 convolution to one channel per tap and a sum of the taps' shifted maps
# (`tap_conv`). Padded to 8 output channels, the preset's one-channel output convolution still ran one of cuDNN's
# older sm80 kernels at under 1 TB/s: 1.19-1.30 ms of the guided sampling step on H200s for reading 7,500 × 32 × 32 ×
# 64 bf16 values (0.98 GB) once. As tap_conv the output block (GroupNorm, SiLU, convolution) ran 1.29 against 2.02 ms
# alone, and the sampling step 92.53 against 93.31 ms, the training step 16.61 against 16.85 ms, on one H200
# (docs/gpu/thin_convs_h200.txt, which also has the forms that did not pay, the stem's among them).
_TAP_CHANNELS = {"cuda": 4}


def tap_conv(x: Tensor, weight: Tensor, bias: Tensor | None, padding: tuple[int, int]) -> Tensor:
    """A stride-1 convolution F.conv2d(x, weight, bias, padding=padding) of a (B, C_in, H, W) batch as a 1×1
    convolution to one map u per tap (i, j) and output channel, u_ij = Σ_c weight[:, c, i, j] · x[:, c], then
    out = bias + Σ_ij u_ij shifted by the tap's offset, summed in float32 (the input's dtype if wider). The same
    values up to rounding (u is rounded to the convolution's dtype: autocast's when it is on); cheaper than the
    convolution itself when it has few output channels, whose k² maps are small. The 1×1 convolution's outputs are
    padded with zeros to a multiple of 8 (cuDNN's aligned kernels)."""
    c_out, c_in, kh, kw = weight.shape
    ph, pw = padding
    b, _, h, w = x.shape
    ho, wo = h + 2 * ph - kh + 1, w + 2 * pw - kw + 1
    n = kh * kw * c_out
    rows = weight.permute(2, 3, 0, 1).reshape(n, c_in)  # rows (i, j, o)
    u = F.conv2d(x, F.pad(rows, (0, 0, 0, -n % 8))[:, :, None, None])  # (B, n + pad, H, W)
    channels_last = x.is_contiguous(memory_format=torch.channels_last)
    if channels_last:
        u = _ChannelsLastGrad.apply(u)  # as Conv2d's own convolutions (below)
    acc = torch.promote_types(u.dtype, torch.float32)
    maps = u[:, :n].unflatten(1, (kh, kw, c_out)).to(acc)  # (B, kh, kw, C_out, H, W)
    maps = F.pad(maps, (pw, pw, ph, ph))
    out = sum(maps[:, i, j, :, i : i + ho, j : j + wo] for i in range(kh) for j in range(kw))
    if bias is not None:
        out = out + bias.to(u.dtype).to(acc)[:, None, None]
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return out.to(u.dtype).contiguous(memory_format=layout)


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters and state dict) that, when torch.compile traces it on a channels-last tensor:
    - makes its output gradient channels-last inside the compiled backward. Inductor (torch 2.11) hands the
      convolution backward (an ATen fallback) gradients in the contiguous layout, and cuDNN's backward then copied
      each into channels-last: 28 copies, 4.8% of the preset's training step on an H200 (docs/gpu/copies_h200.txt
      traced them); the clone is mostly fused into the kernels that compute the gradients instead, and the step ran
      17.07 ms against 17.95 (docs/gpu/train_kernels_h200.txt);
    - on a device in `_CHANNEL_MULTIPLE`, pads input and output channels with zeros up to that multiple (input and
      weight padded, the extra outputs sliced off): the same values, computed by the kernels cuDNN has for aligned
      channels.
    - on a device in `_TAP_CHANNELS`, with at most that many output channels (fewer than its inputs) and stride 1,
      computes it as a 1×1 convolution to one map per tap and a sum of the shifted maps (`tap_conv`).
    Eager and contiguous inputs: the plain convolution (a one-channel input counts as both layouts)."""

    def forward(self, x: Tensor) -> Tensor:
        if not _compiled_channels_last(x):
            return super().forward(x)
        if self._by_taps(x):
            return tap_conv(x, self.weight, self.bias, self.padding)
        weight, bias = self.weight, self.bias
        multiple = _CHANNEL_MULTIPLE.get(x.device.type, 1) if self.groups == 1 else 1
        pad_in, pad_out = -self.in_channels % multiple, -self.out_channels % multiple
        if pad_in:
            x = F.pad(x, (0, 0, 0, 0, 0, pad_in))
            weight = F.pad(weight, (0, 0, 0, 0, 0, pad_in))
        if pad_out:
            weight = F.pad(weight, (0, 0, 0, 0, 0, 0, 0, pad_out))
            bias = None if bias is None else F.pad(bias, (0, pad_out))
        out = _ChannelsLastGrad.apply(self._conv_forward(x, weight, bias))
        return out[:, : self.out_channels] if pad_out else out

    def _by_taps(self, x: Tensor) -> bool:
        few = self.out_channels <= _TAP_CHANNELS.get(x.device.type, 0) < self.in_channels
        plain = self.stride == self.dilation == (1, 1) and self.groups == 1 and self.padding_mode == "zeros"
        return few and plain and isinstance(self.padding, tuple)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling by 2 (nn.Upsample(scale_factor=2, mode="nearest"); no parameters). When
    torch.compile traces it on a channels-last tensor, each pixel is repeated through a broadcast view of the NHWC
    memory, whose backward is a sum over the 2×2 copies. Inductor turns the native op's backward into a scatter-add
    of float atomics into zeros instead (2.6% of the preset's training step's kernel time on an H200), whose
    summation order can change between runs; with cfg's Conv2d and combo kernels in, the step's time was the same
    either way (17.48 against 17.47 ms; docs/gpu/train_kernels_h200.txt). The same values either way; eager and
    contiguous inputs keep the native op."""

    def forward(self, x: Tensor) -> Tensor:
        if not _compiled_channels_last(x):
            return F.interpolate(x, scale_factor=2, mode="nearest")
        b, c, h, w = x.shape
        nhwc = x.permute(0, 2, 3, 1)[:, :, None, :, None, :].expand(b, h, 2, w, 2, c)  # (B, H, 2, W, 2, C)
        return nhwc.reshape(b, 2 * h, 2 * w, c).permute(0, 3, 1, 2)  # channels-last, as its input


def _norm(ch: int) -> GroupNorm:
    groups = math.gcd(32, ch) if ch >= 32 else max(1, ch // 4)
    return GroupNorm(groups, ch)


def sinusoidal_embedding(x: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Transformer-style sinusoids of a scalar per example: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=x.device, dtype=torch.float32) / half)
    args = x.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ResBlock(nn.Module):
    def __init__(self, ch_in: int, ch_out: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1 = _norm(ch_in)
        self.conv1 = Conv2d(ch_in, ch_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * ch_out)
        self.norm2 = _norm(ch_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = Conv2d(ch_out, ch_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)
        self.skip = Conv2d(ch_in, ch_out, 1) if ch_in != ch_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)  # (B, C, 1, 1) each
        h = self.norm2(h, scale, shift)  # GroupNorm(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


# On CUDA, attention without gradients (sampling) over at most this many tokens runs PyTorch's memory-efficient
# kernel rather than SDPA's pick (cuDNN's on an H100/H200). At the preset's 8 × 8 blocks (64 tokens, 4 heads of 32
# channels, bf16) on an H200, a batch of 7,500 ran 0.376 ms against cuDNN's 0.559; at 16 × 16 cuDNN stays the
# fastest of SDPA's kernels (1.47 ms against flash 1.79, efficient 3.97). The guided sampling step ran 97.57 ms
# against 98.28 with cuDNN's; the training step was slower with it (16.10 against 15.67 ms of kernels), so training
# keeps SDPA's pick (docs/gpu/reductions_attention_h200.txt). The op is called directly: an `sdpa_kernel` block
# inside a compiled region keeps Inductor's AOT cache from holding the graph (pytorch/pytorch#194007). So SDPA's
# checks and switches do not apply to it (`torch.backends.cuda.enable_mem_efficient_sdp` and `sdpa_kernel` leave it
# on; Dynamo cannot trace the query of those switches): this dict turns it off, e.g. {} for SDPA everywhere.
EFFICIENT_ATTENTION_TOKENS = {"cuda": 64}


def _bf16_efficient_kernels() -> bool:
    """The memory-efficient kernels exist in bf16 from compute capability 8.0 (SDPA falls back to math before)."""
    return torch.cuda.get_device_capability() >= (8, 0)


# torch.compiler.assume_constant_result (Dynamo traces the query as its value) is this mark; the decorator imports
# torch._dynamo, 1.2-1.7 s of every stage process's start on 2 CPU cores, compiled or not (transformers marks its
# compile constants the same way; tests/test_model.py checks that the mark is the one torch's decorator sets)
_bf16_efficient_kernels._dynamo_marked_constant = True


def _efficient_dtype(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.float32) or (dtype == torch.bfloat16 and _bf16_efficient_kernels())


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q kᵀ / √d) v over (B, heads, tokens, d), the views AttentionBlock makes. Without gradients, at most
    EFFICIENT_ATTENTION_TOKENS tokens on the device, a dtype the kernels take and q, k, v laid out as the op takes
    them (channels contiguous, as in the channels-last block's views; every other stride a multiple of 8 elements,
    so that the views of one aligned qkv tensor start aligned too), the memory-efficient kernel; SDPA otherwise."""
    short = q.shape[-2] <= EFFICIENT_ATTENTION_TOKENS.get(q.device.type, 0)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    laid_out = all(t.stride(-1) == 1 and all(s % 8 == 0 for s in t.stride()[:-1]) for t in (q, k, v))
    if short and not grad and laid_out and _efficient_dtype(q.dtype):
        return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, False)[0]
    return F.scaled_dot_product_attention(q, k, v)


def pixel_rows_conv1x1(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """A 1×1 convolution of a channels-last (B, C, H, W) batch as a matmul of its pixels' rows: (B, H·W, C_out),
    the same values (up to rounding). The attention block's q, k, v come from it. Inductor takes a convolution's bias
    out into the next Triton kernel; before the attention op (an extern kernel) that kernel was three copies, q, k
    and v each written out with the bias added: 4.6 ms of the preset's 98.5 ms guided sampling step on an H200
    (docs/gpu/qkv_matmul_h200.txt). A matmul's bias stays in cuBLAS's epilogue, and the attention op reads q, k, v
    as views of its output."""
    plain = conv.kernel_size == conv.stride == conv.dilation == (1, 1) and conv.groups == 1
    if not (plain and conv.padding in ((0, 0), "valid")):
        raise ValueError(f"pixel_rows_conv1x1 takes a plain 1x1 convolution, not {conv}")
    b, c, h, w = x.shape
    rows = x.permute(0, 2, 3, 1).reshape(b, h * w, c)  # a view of channels-last memory (a copy of any other)
    return F.linear(rows, conv.weight.flatten(1), conv.bias)


class AttentionBlock(nn.Module):
    def __init__(self, ch: int, head_channels: int):
        super().__init__()
        self.heads = max(1, ch // head_channels)
        self.norm = _norm(ch)
        self.qkv = Conv2d(ch, 3 * ch, 1)
        self.proj = Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        d = c // self.heads
        x_norm = self.norm(x)
        if x.is_contiguous(memory_format=torch.channels_last):
            # (B, H, W, C) in memory: q, k, v from the pixels' rows (channels (3, heads, d)), the heads split and
            # merged back as views, with no layout copy (a copy of q, k, v and of the output per block otherwise;
            # docs/gpu/layout_h100.txt). The layout is x's: eager CUDA's GroupNorm returns NCHW for NHWC input.
            qkv = pixel_rows_conv1x1(self.qkv, x_norm).view(b, h * w, 3, self.heads, d)
            q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # (B, heads, HW, d)
            out = attention(q, k, v).transpose(1, 2).reshape(b, h, w, c).permute(0, 3, 1, 2)
        else:  # contiguous (the CPU): the views of NCHW, faster there
            qkv = self.qkv(x_norm)  # channels (3, heads, d)
            q, k, v = (t.transpose(-1, -2) for t in qkv.reshape(b, 3, self.heads, d, h * w).unbind(1))
            out = attention(q, k, v).transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj(out)


class UNet(nn.Module):
    """ε_θ(z, λ, c): (B, C, H, W), (B,), (B,) -> (B, C, H, W)."""

    # the repeated blocks that regional compilation compiles one by one (cfg.engine.device.compile_regions)
    compile_regions = (ResBlock, AttentionBlock)

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        ch = config.base_width
        emb_dim = 4 * ch
        self.lambda_embed = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_embed = nn.Embedding(config.num_classes + 1, emb_dim)
        self.stem = Conv2d(config.in_channels, ch, 3, padding=1)

        self.down = nn.ModuleList()
        skips = [ch]
        res = config.image_size
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.blocks_per_level):
                block = nn.ModuleList([ResBlock(ch, config.base_width * mult, emb_dim, config.dropout)])
                ch = config.base_width * mult
                if res in config.attention_resolutions:
                    block.append(AttentionBlock(ch, config.head_channels))
                self.down.append(block)
                skips.append(ch)
            if level < len(config.channel_mult) - 1:
                self.down.append(nn.ModuleList([Conv2d(ch, ch, 3, stride=2, padding=1)]))
                skips.append(ch)
                res //= 2

        self.mid = nn.ModuleList(
            [
                ResBlock(ch, ch, emb_dim, config.dropout),
                AttentionBlock(ch, config.head_channels),
                ResBlock(ch, ch, emb_dim, config.dropout),
            ]
        )

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for i in range(config.blocks_per_level + 1):
                block = nn.ModuleList(
                    [ResBlock(ch + skips.pop(), config.base_width * mult, emb_dim, config.dropout)]
                )
                ch = config.base_width * mult
                if res in config.attention_resolutions:
                    block.append(AttentionBlock(ch, config.head_channels))
                if level > 0 and i == config.blocks_per_level:
                    block.append(Upsample())
                    block.append(Conv2d(ch, ch, 3, padding=1))
                    res *= 2
                self.up.append(block)

        self.out = nn.Sequential(_norm(ch), nn.SiLU(), Conv2d(ch, config.in_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def _run(self, block: nn.ModuleList, h: Tensor, emb: Tensor) -> Tensor:
        for layer in block:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return h

    def forward(self, z: Tensor, lam: Tensor, labels: Tensor) -> Tensor:
        emb = self.lambda_embed(sinusoidal_embedding(lam * self.config.lambda_scale, self.config.base_width))
        emb = emb + self.class_embed(labels)  # (B, emb_dim)
        h = self.stem(z)
        hs = [h]
        for block in self.down:
            h = self._run(block, h, emb)
            hs.append(h)
        for layer in self.mid:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        for block in self.up:
            h = self._run(block, torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)


class EMA(nn.Module):
    """Exponential moving average of a model's weights: θ_ema ← d_t·θ_ema + (1 − d_t)·θ.

    d_t = decay, or with `warmup` d_t = min(decay, (1 + t) / (10 + t)) for the t-th update (t = 0, 1, …), so
    the average forgets its initial weights within a few hundred updates instead of ~1/(1 − decay).
    The update count is part of the state dict, so a resumed EMA continues the same schedule.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = False):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0  # t: updates so far
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, t: int) -> float:
        """d_t of the t-th update (t = 0 first)."""
        return min(self.decay, (1 + t) / (10 + t)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        weight = 1.0 - self.decay_at(self.num_updates)  # a Python float: no host sync
        ema_p = list(self.model.parameters())
        torch._foreach_lerp_(ema_p, [p.detach() for p in model.parameters()], weight)
        for b_ema, b in zip(self.model.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)
        self.num_updates += 1

    @torch.no_grad()
    def apply_(self, model: nn.Module, decay: Tensor) -> None:
        """θ_ema ← d·θ_ema + (1 − d)·θ with d a tensor on the weights' device: the kernels of `update` with no
        Python number in them, so a CUDA graph can replay it (the caller fills d with `decay_at` and counts
        `num_updates`). Equal to `update` up to rounding (d·a + (1 − d)·b instead of lerp)."""
        ema_p = list(self.model.parameters())
        torch._foreach_mul_(ema_p, decay)
        torch._foreach_add_(ema_p, torch._foreach_mul([p.detach() for p in model.parameters()], 1.0 - decay))
        for b_ema, b in zip(self.model.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)

    def get_extra_state(self) -> dict:
        return {"num_updates": self.num_updates}

    def set_extra_state(self, state: dict) -> None:
        self.num_updates = int(state["num_updates"])

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_checkpoint(path, model: nn.Module, meta: dict) -> None:
    """Write the model's weights with the configuration it was built from and `meta` (training settings)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    blob = {"config": model.config.to_dict(), "state_dict": state, "meta": meta}
    atomic_save(blob | {"sha256": tensors_sha256(state)}, path)


def load_checkpoint(path, map_location="cpu") -> tuple[UNet, dict]:
    """Rebuild the U-Net from the configuration stored in the checkpoint; returns (model in eval mode, meta).
    A file that is truncated, corrupt or whose weights do not match their stored hash is refused, naming it."""
    rerun = "dvc repro train@<p_uncond> (or the step that wrote it)"
    blob = load(path, what="U-Net checkpoint", rerun=rerun, map_location=map_location)
    if "sha256" in blob and tensors_sha256(blob["state_dict"]) != blob["sha256"]:
        raise ValueError(
            f"{path}: the weights do not match the checkpoint's content hash (corrupt); make it again with `{rerun}`"
        )
    model = UNet(UNetConfig(**blob["config"]))
    model.load_state_dict(blob["state_dict"])
    return model.eval(), blob["meta"]
