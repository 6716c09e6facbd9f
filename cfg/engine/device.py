"""Device choice and mixed precision: CUDA when present (bf16 autocast where safe), CPU otherwise."""

from __future__ import annotations

import contextlib

import torch


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when available, else CPU; 'cuda' without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but torch sees no CUDA GPU; use 'auto' or 'cpu'")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {name!r}; use 'auto', 'cpu' or 'cuda'")
    return torch.device(name)


def autocast(
    device: torch.device, enabled: bool = True, cache: bool = True
) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA for the network's matmuls and convolutions; a no-op on CPU.

    Only the network runs under it: the diffusion arithmetic (α, σ, x̂, the sampler update) stays float32
    or float64, where bf16's 8-bit mantissa would visibly bias samples at high log-SNR. `cache=False` for
    CUDA-graph capture (PyTorch's advice: cached weight casts would outlive the graph's memory pool).
    """
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=cache)
    return contextlib.nullcontext()


def configure_cuda() -> None:
    """TF32 matmuls and cuDNN autotuning: free speed on Ampere/Hopper with no effect on CPU. Autotuning times
    each convolution's candidate algorithms in the process and keeps the fastest, so two processes (two GPUs of
    one model, or two runs) may round differently; `sample.cudnn_benchmark: false` turns it off for sampling."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


@contextlib.contextmanager
def cudnn_benchmark(on: bool):
    """cuDNN's autotuning on or off inside the block, as it was after (the FID curve samples inside training)."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


# Inductor keeps a graph's convolutions channels-last only where its heuristic expects that to pay; it declines
# for any graph with a convolution larger than 1×1 that has at most half as many output as input channels (the
# U-Net's convolutions after a skip concatenation, its 64 → 1 output convolution). The training graph then handed
# cuDNN contiguous gradients for channels-last activations, and every convolution backward copied one into the
# other's layout (docs/gpu/layout_h100.txt). Forced, every graph stays channels-last. Combo kernels: Inductor
# launches independent small kernels of a graph as one (horizontal fusion). The preset's CUDA-graphed training step
# ran ≈ 1,370 kernels instead of ≈ 1,660, in 18.21 ms against 18.54 and 17.95 against 18.18 (two runs on H200s, each
# pair in one run); its sampling step was unchanged (104.1 against 104.0 ms), the cold compiles within the shared
# hosts' noise (80-92 s; docs/gpu/train_kernels_h200.txt). No persistent reductions: Inductor made GroupNorm's
# statistics at 8 × 8 and 16 × 16 single-pass ("persistent") kernels of at most 32 channels a program, which read the
# NHWC rows at 1.1 TB/s; as looped reductions the guided sampling step ran 101.79 ms against 105.03 on one H200, the
# training step unchanged (15.56 against 15.57 ms of kernels; docs/gpu/reductions_attention_h200.txt).
COMPILE_OPTIONS = {
    "force_layout_optimization": True,
    "combo_kernels": True,
    "triton.persistent_reductions": False,
}


def compile_net(
    module: torch.nn.Module,
    mode: str = "default",
    options: dict | None = None,
    regional: bool = False,
) -> torch.nn.Module:
    """torch.compile for the U-Net (training, sampling, benchmarks): COMPILE_OPTIONS on top of a compile mode's
    own options (torch.compile takes a mode or options, not both), then `options` (Inductor config keys, e.g.
    {"coordinate_descent_tuning": True}) on top of both. The whole network as one graph, or with `regional`
    its repeated blocks one by one (`compile_regions`)."""
    from torch._inductor import list_mode_options

    merged = list_mode_options(mode) | COMPILE_OPTIONS | (options or {})
    if regional:
        return compile_regions(module, merged)
    return torch.compile(module, options=merged)


# the graphs Dynamo may keep per block (training and evaluation mode, times the batch sizes a process meets: a
# cell's full and shorter last batch, the rows each guidance method of a grid skips)
REGION_GRAPHS = 32


def compile_regions(module: torch.nn.Module, options: dict) -> torch.nn.Module:
    """Regional compilation: every block of the classes that the network's `compile_regions` attribute names (the
    U-Net's residual and attention blocks) compiled on its own, in place, with static shapes; the rest of the
    network (embeddings, stem, down- and up-sampling, output) runs eagerly. Dynamo compiles one graph per distinct
    block (its attributes, training mode and input shapes) and reuses it for every block like it, so a cold start
    compiles a fraction of what the whole network's graph holds (the preset's U-Net: 11 distinct graphs for 28
    blocks; its training step's first forward and backward on CPU 61 s against 95 s whole,
    benchmarks/compile_time.py), at the price of the fusions across block boundaries. With static shapes every
    other batch size (a cell's shorter last batch, the rows a guidance method skips) compiles every distinct block
    again. `module` itself is returned (a DDP wrapper too: its blocks are compiled); train.cuda_graph still
    captures the whole step.

    Dynamo keeps a block class's graphs on its `forward` and stops compiling one code object after a number of
    them (then runs it eagerly); that limit, process-wide, is raised here to REGION_GRAPHS per block, and never
    lowered."""
    classes = next((m.compile_regions for m in module.modules() if hasattr(m, "compile_regions")), ())
    regions = [m for m in module.modules() if classes and isinstance(m, classes)]
    if not regions:
        raise ValueError(
            f"regional compilation: {type(module).__name__} names no blocks to compile (a compile_regions "
            "attribute of block classes, as cfg.nets.unet.UNet has); use compile: true for the whole network"
        )
    config = torch._dynamo.config
    for name in ("recompile_limit", "accumulated_recompile_limit"):
        name = name if hasattr(config, name) else name.replace("recompile", "cache_size")  # torch < 2.7
        setattr(config, name, max(getattr(config, name), REGION_GRAPHS * len(regions)))
    for block in regions:
        block.compile(dynamic=False, options=options)
    return module


# what `train.compile` / `sample.compile` may name besides true/false: (torch.compile mode, Inductor options on top of
# COMPILE_OPTIONS, regional compilation). On the preset's guided sampling step (one H200,
# docs/gpu/inductor_options_h200.txt) "default" ran 106.4 ms, "coordinate-descent" (a search of each fused Triton
# kernel's block sizes) 99.2 ms and "max-autotune" (cuDNN against Triton templates per convolution, plus that
# search) 96.2 ms. They compiled in 236 s and 538 s against "default"'s 46 s from a cold cache, in one process whose
# caches the sets shared, on a host shared with a study: indicative only. Inductor's caches keep the tuned choices,
# so a warm cache should load them as fast as "default" (not measured). No CUDA graphs from Inductor:
# train.cuda_graph captures its own step, and sampling batches change shape.
# "regional" compiles the network's blocks one by one (compile_regions), "default"'s options otherwise: a shorter cold
# compile of the training step on CPU (61 against 95 s, benchmarks/compile_time.py), but not on an H200, where it
# compiled the training step in 101 s against "default"'s 92 s, ran it in 20.28 ms against 18.54 and the sampling
# step in 134.4 ms against 104.0 (the code before cfg's Conv2d, Upsample and combo kernels, a host shared with
# another benchmark; docs/gpu/train_kernels_h200.txt). Kept opt-in: it pays nowhere a stage compiles.
COMPILE_MODES = {
    "default": ("default", {}, False),
    "coordinate-descent": ("default", {"coordinate_descent_tuning": True}, False),
    "max-autotune": ("max-autotune-no-cudagraphs", {}, False),
    "regional": ("default", {}, True),
}


def compile_as(module: torch.nn.Module, setting: bool | str) -> torch.nn.Module:
    """`module` as a `train.compile` / `sample.compile` setting says: false leaves it as it is, true compiles it
    as "default", a name of COMPILE_MODES with that variant (through `compile_net`)."""
    if setting is False:
        return module
    name = "default" if setting is True else setting
    if name not in COMPILE_MODES:
        raise ValueError(f"compile setting {setting!r} is not one of true, false, {list(COMPILE_MODES)}")
    mode, options, regional = COMPILE_MODES[name]
    return compile_net(module, mode, options, regional)
