"""Per-example noise streams: Gaussian noise that depends only on (seed, example index, step, element).

A sample is then the same whatever batch it was drawn in and however many processes drew the cell: the
initial latent of example i is stream (seed, i, step 0) and the sampler's noise at step t is (seed, i, t + 1).
The W copies of an example (one per w of the grid) share its streams, so columns of a grid differ only by w.

The generator is counter-based, like Philox or JAX's PRNG: each element's two uniforms are a hash of
(seed, example, step, element index), computed with integer tensor ops on any device, so nothing is drawn
sequentially and any slice of the examples can be drawn alone. The hash is Wellons' `lowbias32` (a bijective
32-bit mixer of good avalanche), chained over the counters; uniforms become normals by Box-Muller in float64.

A stream's state is 64 bits: two 32-bit words hashed from (seed, example, step) under two keys, and an
element's word is lowbias32(lowbias32(h₀ ^ counter) ^ h₁). With one 32-bit state h and words lowbias32(
lowbias32(h ^ counter) ^ constant), as before, any two streams whose states differed by 2k held the same values
with element e moved to e ^ k (81 of 100,000 initial latents of 64 elements repeated another's values), and
a study's ~10⁷ streams (150,000 examples × 65 draws) would hold ~10⁴ pairs of identical streams by the birthday
bound (estimated). With two words both have to line up, ~2³² times more rarely. Statistical checks (moments,
normality, independence across examples, steps and elements, no stream a shuffle of another) are in
tests/test_noise.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x · c) mod 2³² for x in [0, 2³²) held in int64, without int64 overflow (c split into 16-bit halves)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _lowbias32(x: Tensor) -> Tensor:
    """Chris Wellons' lowbias32 integer hash on uint32 values stored in int64."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _mix(h: Tensor, counter: Tensor | int) -> Tensor:
    return _lowbias32((h ^ (torch.as_tensor(counter, dtype=torch.int64, device=h.device) & _M32)) & _M32)


def example_noise(
    seed: int,  # the cell's sampling seed
    examples: Tensor,  # (B,) int64 example indices (repeat an index to give several rows the same noise)
    step: int,  # 0 for the initial latent, t + 1 for a sampler's step t
    shape: tuple[int, ...],  # per-example shape, e.g. (C, H, W)
    *,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Standard normal noise (B, *shape) on `examples`' device; row b depends only on (seed, examples[b], step)."""
    device = examples.device
    n = math.prod(shape)
    key = _lowbias32(torch.tensor([seed & _M32], dtype=torch.int64, device=device) ^ 0x5BD1E995)
    key = _mix(key, seed >> 32)  # seeds beyond 32 bits still differ
    h0, h1 = (
        _mix(_mix(_mix(key, lane), examples.to(torch.int64)[:, None]), step)
        for lane in (0x68E31DA4, 0x1B873593)
    )
    elem = torch.arange(n, dtype=torch.int64, device=device)[None]  # (1, n)
    u1 = _mix(_mix(h0, 2 * elem), h1)  # (B, n), two independent words per element
    u2 = _mix(_mix(h0, 2 * elem + 1), h1)
    # uniforms in (0, 1): never 0, so the log is finite
    u1 = (u1.to(torch.float64) + 0.5) / 2**32
    u2 = (u2.to(torch.float64) + 0.5) / 2**32
    z = torch.sqrt(-2 * torch.log(u1)) * torch.cos(2 * math.pi * u2)  # Box-Muller
    return z.to(dtype).view(len(examples), *shape)


# What samplers call for the step noise: step index -> noise shaped like z
NoiseSource = Callable[[int], Tensor]


def stream_source(seed: int, examples: Tensor, shape: tuple[int, ...], dtype=torch.float32) -> NoiseSource:
    """The samplers' noise source for rows `examples`: step t draws `example_noise(seed, examples, t + 1)`."""
    return lambda t: example_noise(seed, examples, t + 1, shape, dtype=dtype)


def generator_source(z: Tensor, generator: torch.Generator | None) -> NoiseSource:
    """A noise source from a torch.Generator (tests and ad-hoc use): each step draws randn like z in turn."""
    return lambda t: torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
