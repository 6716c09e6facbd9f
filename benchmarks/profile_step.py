"""Where a training step's and a guided sampling step's time goes, and which settings make them faster.

    python benchmarks/profile_step.py [--preset presets/fashion_mnist_gpu.yaml] [--seconds 4]
        [--only loop,kernels,cell,copies,variants,options] [--loop-steps 400] [--loop-forms compile,graph]
        [--loop-batches 256,512] [--autotune] [--sdpa BACKEND]

Parts (all but `options` by default; they run in this order: loop, options, kernels, copies, cell, variants):
  loop      the real training loop (`train_diffusion`) in each of --loop-forms (compile: compiled network;
            graph: + CUDA graph, train.cuda_graph; graph+update: + the clipping, Adam and EMA compiled too,
            train.compile_update) at each of --loop-batches
  kernels   torch.profiler over the preset's steps as they run: the compiled training step replayed as one
            CUDA graph (`GraphStep`, train.cuda_graph), the compiled training step launched kernel by kernel, and
            the compiled guided sampling step; per step the top kernels and the device time by kind
            (convolution/matmul, attention, fused elementwise, norm, copies, optimizer), and how busy the GPU
            was (summed kernel time / wall time: below ~90% the step waits on the host)
  cell      a whole sampling cell as the sample stage runs it (`generate_w_grid`: the preset's w grid, batch
            and steps, per-example noise, the guided sampler, uint8 images to the host): images/s and MFU
            with the network passes CFG really runs (w = 0 rows skip ε(z), w = −1 rows skip ε(z, c)), with
            cuDNN's autotuning and with its heuristics (`sample.cudnn_benchmark`, default false: the same bytes
            on every GPU; on one H200 the two were within 0.4%, docs/gpu/cudnn_h200.txt)
  copies    where the training step's plain copy kernels come from (20% of a compiled step's device time until
            compile_net forced channels-last layouts, docs/gpu/layout_h100.txt): their device time by the op
            enclosing each `aten::copy_` (an autograd node, an attention op, ...) and by input shapes with the
            Python frames above (the compiled step, not graphed, so every kernel has its launching op)
  variants  memory formats, compile modes and batches of a training and a sampling step (with --autotune
            also torch.compile mode max-autotune-no-cudagraphs, which benchmarks Triton/cuDNN choices per
            convolution: minutes of compilation); every compiled row through cfg's compile_net, so with forced
            channels-last layouts inside the graph ("contiguous" is the input's and the weights' format)
  options   Inductor option sets (OPTION_SETS, --sets: coordinate-descent tuning of the fused kernels, max-autotune
            with and without Triton convolution templates, regional compilation of the repeated blocks, GroupNorm's
            output kept in bf16, cuDNN's heuristics instead of its autotuning, without Inductor's combo kernels,
            torch's own convolution and upsampling in place of cfg's, cfg's convolution without its channel padding,
            the training step's update compiled too, Inductor's persistent reductions allowed again, cuDNN's kernel
            for the short attention that sampling runs through the memory-efficient one, the attention block's q, k,
            v from its 1×1 convolution instead of a matmul, the residual blocks' modulation applied after GroupNorm
            instead of folded into it, GroupNorm's statistics from Welford's reduction in sampling too, single
            Inductor switches of INDUCTOR_SWITCHES) on the preset's guided sampling step and its CUDA-graphed
            training step (--kinds; --train-batch / --sample-batch for other batches): compile seconds, wall and
            kernel time per step, MFU
            and the device time by kernel kind with launches per step and mean µs (--kernels-out DIR: every kernel
            of each row, as CSV, with its µs per launch: mean, fewest, most); each (set, kind) in a process of its
            own with empty Inductor and Triton caches, so every compile time is cold (--no-isolate: all in this
            process). Not in the default parts: max-autotune compiles for minutes
Every row prints images/s and MFU (model FLOPs per image from torch's FLOP counter x images/s / the bf16
matmul rate measured in the same run). Graph breaks of the compiled variants are counted. `--sdpa flash|efficient|
cudnn|math` runs every part with only that attention backend (default: PyTorch's choice, cuDNN's on an H100/H200,
and the memory-efficient kernel that cfg's `attention` calls for short sequences without gradients).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import time
from pathlib import Path

import torch
from bench_throughput import flops_per_image, matmul_rate, sync
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from cfg.engine.device import COMPILE_MODES, autocast, compile_net, configure_cuda
from cfg.engine.device import cudnn_benchmark as cudnn_autotuning
from cfg.engine.generate import examples_per_batch, generate_w_grid, sampling_kwargs
from cfg.engine.training import GraphStep, make_adam, train_diffusion
from cfg.io import load_yaml
from cfg.maths.diffusion import diffusion_loss, training_draws
from cfg.maths.guidance import guided_eps, needed_passes
from cfg.nets import unet
from cfg.nets.unet import EMA, UNet, UNetConfig
from cfg.study.config import params_from_dict
from cfg.study.presets import flat_overrides, merged_params


def timed(fn, seconds: float) -> float:
    """Median seconds per call after warm-up, with CUDA events."""
    for _ in range(3):
        fn()
    sync(torch.device("cuda"))
    times, t_end = [], time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(times) < 5:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return sorted(times)[len(times) // 2]


def build(config: UNetConfig, fmt, mode: str | None, options: dict | None = None, regional: bool = False):
    torch.manual_seed(0)
    model = UNet(config).cuda().to(memory_format=fmt)
    for p in model.parameters():  # away from the zero init, so nothing is trivially skipped
        p.data.add_(0.01 * torch.randn_like(p))
    if mode is None:
        return model, model
    return model, compile_net(model, mode, options, regional)


def train_fn(config, fmt, mode, batch):
    model, net = build(config, fmt, mode)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
    c, s = config.in_channels, config.image_size
    x = torch.randn(batch, c, s, s, device="cuda").contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)

    def step():
        with autocast(torch.device("cuda"), True):
            loss = diffusion_loss(net, x, y, p_uncond=0.1, null_label=10, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


# train.compile_update: clipping, Adam and the EMA compiled along with a compiled network (the "compiled-update" set)
COMPILED_UPDATE = False


def graph_train_fn(config, batch, mode: str = "default", options: dict | None = None, regional: bool = False):
    """The training step of train.cuda_graph (compiled network, channels-last, bf16): `GraphStep` on one fixed
    batch and draw, after its eager warm-up and capture."""
    model, net = build(config, torch.channels_last, mode, options, regional)
    compiled_update = COMPILED_UPDATE and mode is not None  # as train_diffusion builds them
    opt = make_adam(
        model.parameters(), 1e-4, torch.device("cuda"), graphed=True, compile_update=compiled_update
    )
    ema = EMA(model, 0.9999, warmup=True)
    running = torch.zeros((), device="cuda")
    c, s = config.in_channels, config.image_size
    x = torch.randn(batch, c, s, s, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    draws = training_draws(x, y, p_uncond=0.1, null_label=10, generator=gen)
    step = GraphStep(net, model, opt, ema, running, 1.0, True, compiled_update)
    return lambda: step(x, *draws)


def sample_fn(config, fmt, mode, batch, options: dict | None = None, regional: bool = False):
    model, net = build(config, fmt, mode, options, regional)
    model.eval()
    c, s = config.in_channels, config.image_size
    z = torch.randn(batch, c, s, s, device="cuda").contiguous(memory_format=fmt)
    lab = torch.randint(0, 10, (batch,), device="cuda")
    w = torch.linspace(0.1, 4, batch, device="cuda")  # every row both passes
    lam = torch.zeros(batch, device="cuda")

    def step():
        with torch.no_grad(), autocast(torch.device("cuda"), True):
            return guided_eps(net, z, lam, lab, w, 10)

    return step


# the training loop's forms of --only loop: (train_diffusion's cuda_graph, compile_update), with the network compiled
LOOP_FORMS = {"compile": (False, False), "graph": (True, False), "graph+update": (True, True)}


def loop_rate(
    config, batch: int, steps: int, *, compile: bool, cuda_graph: bool, compile_update: bool = False
) -> tuple[float, float]:
    """images/s of the real training loop (cfg.engine.training.train_diffusion: batch gather, draws, loss,
    backward, clipping, Adam, EMA, loss bookkeeping), timed by the loop itself after its first logged interval
    (compilation, autotuning and graph capture excluded); and the wall seconds of the whole call."""
    n = 20_000
    x = torch.rand(n, config.in_channels, config.image_size, config.image_size) * 2 - 1
    y = torch.randint(0, config.num_classes, (n,))
    t0 = time.perf_counter()
    result = train_diffusion(
        config, x, y, steps=steps, batch_size=batch, warmup_steps=10, device="cuda", bf16=True,
        compile=compile, cuda_graph=cuda_graph, compile_update=compile_update, log_every=max(10, steps // 5),
    )  # fmt: skip
    return result.images_per_s, time.perf_counter() - t0


# kinds of CUDA kernels by (lower-case) name, the first match wins; Inductor's Triton kernels are named after the
# ops they fuse (a conv's bias add gives "..._convolution_..."), so they are told apart by prefix first
KERNEL_KINDS = [
    ("convolution / matmul", ("triton_tem",)),  # Inductor's GEMM/conv templates (max-autotune)
    ("fused elementwise / reduction (Triton)", ("triton",)),
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("optimizer / EMA", ("adam", "multi_tensor", "foreach")),
    ("convolution / matmul", ("conv", "cudnn", "xmma", "gemm", "cutlass", "wgrad", "dgrad", "sm90", "sm80")),
    ("group norm", ("groupnorm", "moments", "computeinternalgradients", "group_norm")),
    ("copy / cast", ("copy", "cast")),
]


def kernel_kind(name: str) -> str:
    low = name.lower()
    for kind, keys in KERNEL_KINDS:
        if any(low.startswith(k) if k.startswith("triton") else k in low for k in keys):
            return kind
    return "other elementwise / reduction"


def top_kernels(
    step, n: int = 12, calls: int = 5, csv_path: Path | None = None
) -> tuple[float, list[str], float]:
    """The top kernels of `calls` back-to-back steps by device time, the device time by kernel kind (with launches
    per step and the mean launch's µs: many launches of a few µs each mean a step bound by launch latency and
    occupancy, not by bytes or FLOPs), and how busy the GPU was: summed kernel time / wall time of those same
    steps (kernels of one stream do not overlap here; the profiler's own overhead is in the wall time, so busy is
    if anything understated). `csv_path`: every kernel written there (name, kind, launches and µs per step, µs per
    launch: mean, fewest and most; a kernel name that runs at several shapes, or one shape two ways, spreads them).
    Returns (wall s per step, printable lines, kernel s per step; 0 when the profiler recorded none)."""
    for _ in range(3):
        step()
    sync(torch.device("cuda"))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(calls):
            step()
        sync(torch.device("cuda"))
        wall = (time.perf_counter() - t0) / calls  # the profiled steps themselves, back to back
    durations: dict[str, list[float]] = {}  # kernel name -> each launch's µs over the `calls` steps
    for e in prof.events():
        if (t := e.self_device_time_total) > 0:
            durations.setdefault(e.key, []).append(t)
    events = sorted(durations.items(), key=lambda kv: -sum(kv[1]))
    total = sum(sum(us) for _, us in events)  # µs over `calls` steps
    if total == 0:
        return wall, [f"  step {wall * 1e3:.2f} ms wall; the profiler recorded no kernels"], 0.0
    kinds: dict[str, list[float]] = {}  # kind -> [µs, launches] over the `calls` steps
    for name, us in events:
        acc = kinds.setdefault(kernel_kind(name), [0.0, 0])
        acc[0] += sum(us)
        acc[1] += len(us)
    if csv_path is not None:
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        with csv_path.open("w", newline="") as f:
            out = csv.writer(f)
            out.writerow(
                ["kernel", "kind", "launches_per_step", "us_per_step", "us_per_launch", "us_min", "us_max"]
            )
            for name, us in events:
                out.writerow(
                    [
                        name,
                        kernel_kind(name),
                        f"{len(us) / calls:g}",
                        f"{sum(us) / calls:.2f}",
                        f"{sum(us) / len(us):.2f}",
                        f"{min(us):.2f}",
                        f"{max(us):.2f}",
                    ]
                )
    busy = total / calls / 1e6 / wall
    lines = [
        f"  step {wall * 1e3:.2f} ms wall, {total / calls / 1e3:.2f} ms of kernels: GPU busy {busy:.0%}; "
        f"{sum(len(us) for _, us in events) // calls} kernels/step",
        "  by kind (launches/step, mean µs): "
        + ", ".join(
            f"{k} {us / total:.0%} ({launches // calls}, {us / launches:.1f})"
            for k, (us, launches) in sorted(kinds.items(), key=lambda kv: -kv[1][0])
        ),
    ]
    return (
        wall,
        lines
        + [f"  {sum(us) / total:6.1%}  {len(us) // calls:>4}/step  {name[:100]}" for name, us in events[:n]],
        total / calls / 1e6,
    )


# Inductor option sets of `--only options`: name -> (compile mode, options on top of compile_net's, regional
# compilation, a change to the U-Net's layers while it compiles and runs (a context manager's factory, or None),
# cuDNN autotuning). The train.compile / sample.compile settings
# (COMPILE_MODES: default; coordinate descent, Inductor's search of each fused Triton kernel's block sizes and warps;
# max-autotune, cuDNN against Triton templates per convolution/matmul plus that search; regional, the repeated
# blocks compiled one by one), exactly as the stages compile them, then variants of them:


@contextlib.contextmanager
def patched(owner, name: str, make):
    """Within the block, `owner.<name>` is `make(its original value)`."""
    original = getattr(owner, name)
    setattr(owner, name, make(original))
    try:
        yield
    finally:
        setattr(owner, name, original)


def bf16_group_norm():
    """cfg's GroupNorm returns its input's dtype also under CUDA autocast (where it returns float32)."""
    return patched(
        unet.GroupNorm, "forward", lambda forward: lambda mod, x, *film: forward(mod, x, *film).to(x.dtype)
    )


def torch_conv_grads():
    """cfg's Conv2d as nn.Conv2d: without its channels-last output gradient, channel padding and tap sums under
    compile."""
    return patched(unet.Conv2d, "forward", lambda forward: torch.nn.Conv2d.forward)


def cudnn_thin_convs():
    """cfg's Conv2d sends its convolutions with few output channels (the U-Net's last) to cuDNN, padded to 8
    channels, instead of to cfg.nets.unet.tap_conv's 1×1 convolution to one map per tap."""
    return patched(unet, "_TAP_CHANNELS", lambda channels: {})


def unpadded_channels():
    """cfg's Conv2d keeps its channel counts under compile (no zero channels up to cuDNN's multiple of 8) and sends
    every convolution to cuDNN, the few-channel ones too."""
    stack = contextlib.ExitStack()
    stack.enter_context(patched(unet, "_CHANNEL_MULTIPLE", lambda multiples: {}))
    stack.enter_context(cudnn_thin_convs())
    return stack


def torch_upsample():
    """cfg's Upsample as F.interpolate, also under compile."""
    return patched(
        unet.Upsample,
        "forward",
        lambda forward: lambda mod, x: torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest"),
    )


def compiled_update():
    """train.compile_update: the CUDA-graphed training step's clipping, Adam (foreach) and EMA compiled too."""
    import sys

    return patched(sys.modules[__name__], "COMPILED_UPDATE", lambda compiled: True)


def sdpa_attention():
    """cfg's `attention` through F.scaled_dot_product_attention at every length (SDPA's pick, cuDNN's kernel on an
    H200, or --sdpa's backend), not the memory-efficient kernel it calls itself for short sequences without
    gradients (up to EFFICIENT_ATTENTION_TOKENS tokens)."""
    return patched(unet, "EFFICIENT_ATTENTION_TOKENS", lambda tokens: {})


def conv_qkv():
    """The attention block's q, k, v from cfg's 1×1 Conv2d again (Inductor adds its bias in three copy kernels ahead
    of the attention op), not from a matmul of the pixels' rows."""
    return patched(
        unet, "pixel_rows_conv1x1", lambda rows: lambda conv, x: conv(x).permute(0, 2, 3, 1).flatten(1, 2)
    )


def film_outside():
    """The residual blocks' modulation GroupNorm(h) · (1 + scale) + shift computed after cfg's GroupNorm, as before
    GroupNorm folded it into its per-channel affine."""

    def make(forward):
        def unfolded(mod, x, scale=None, shift=None):
            unet.GroupNorm.check_modulation(x, scale, shift)
            out = forward(mod, x)
            return out if scale is None else out * (1 + scale) + shift

        return unfolded

    return patched(unet.GroupNorm, "forward", make)


def welford_statistics():
    """GroupNorm's per-channel moments from var_mean's Welford reduction for every input, as before sampling's bf16
    inputs took them from sums of x and x² (cfg.nets.unet._channel_moments)."""
    return patched(unet, "_channel_moments", lambda sums: unet._welford_moments)


def default_plus(options: dict) -> tuple:
    """The option set of the default compile (COMPILE_OPTIONS and all) with `options` on top."""
    return (COMPILE_MODES["default"][0], COMPILE_MODES["default"][1] | options, False, None, True)


OPTION_SETS = {name: (*setting, None, True) for name, setting in COMPILE_MODES.items()} | {
    # GroupNorm's output in the activations' bf16 instead of autocast's float32: half the bytes of what the
    # training graph saves for backward and of the normalised tensors it reads again there
    "bf16-groupnorm": (*COMPILE_MODES["default"], bf16_group_norm, True),
    "coordinate-descent+bf16-groupnorm": (*COMPILE_MODES["coordinate-descent"], bf16_group_norm, True),
    # the default compile with cuDNN's heuristics instead of its autotuning (configure_cuda's, which the train
    # stage keeps; its step ran 18.86 ms with the heuristics against 18.54 autotuned, on the other H200 of the host,
    # one run each: docs/gpu/train_kernels_h200.txt; sampling uses the heuristics, sample.cudnn_benchmark)
    "cudnn-heuristics": (*COMPILE_MODES["default"], None, False),
    # without Inductor's combo kernels (COMPILE_OPTIONS turns them on: independent small kernels of a graph
    # launched as one horizontally fused kernel)
    "no-combo-kernels": default_plus({"combo_kernels": False}),
    # Inductor's Triton templates tuned against cuBLAS for the matmuls (and, it turned out, the convolutions: 8 of
    # their kernels, 18 launches a step, took a template): the qkv matmul (K = 128) runs at 2.7-3.4 TB/s in cuBLAS,
    # and a template may take GroupNorm's apply as its prologue. On one H200 cuBLAS kept the qkv matmul and the guided
    # sampling step ran 91.75 against 91.68 ms, after 274 against 45 s of cold compilation
    # (docs/gpu/qkv_matmul_modes_h200.txt)
    "autotune-gemm": default_plus({"max_autotune_gemm": True}),
    # these two put torch's own layers back in cfg's U-Net: the convolutions' output gradients left in the layout
    # Inductor gives them (cfg's Conv2d makes them channels-last, which torch 2.11's convolution backward otherwise
    # copies them into: docs/gpu/copies_h200.txt)
    "torch-conv-grads": (*COMPILE_MODES["default"], torch_conv_grads, True),
    # the one-channel output convolution through cuDNN, padded to 8 channels with zeros, as before tap_conv took it
    # (docs/gpu/thin_convs_h200.txt); unpadded-channels: the stem and output convolutions through cuDNN as they are
    "cudnn-thin-convs": (*COMPILE_MODES["default"], cudnn_thin_convs, True),
    "unpadded-channels": (*COMPILE_MODES["default"], unpadded_channels, True),
    # nearest upsampling as F.interpolate, whose backward Inductor makes an atomic scatter-add (cfg's Upsample
    # repeats pixels through a broadcast view instead)
    "torch-upsample": (*COMPILE_MODES["default"], torch_upsample, True),
    # the training step's clipping, Adam and EMA compiled as well (train.compile_update): 14.97 against 15.38 ms of
    # kernels per training step on one H200, both with a hashed dropout mask since reverted
    # (docs/gpu/dropout_update_h200.txt)
    "compiled-update": (*COMPILE_MODES["default"], compiled_update, True),
    # Inductor's persistent (single-pass) reductions allowed again, as before COMPILE_OPTIONS turned them off
    "persistent-reductions": default_plus({"triton.persistent_reductions": True}),
    # the 8 x 8 attention through SDPA's cuDNN kernel, as before cfg's `attention` chose the memory-efficient one
    "cudnn-short-attention": (*COMPILE_MODES["default"], sdpa_attention, True),
    # q, k, v from a 1x1 convolution, as before cfg's attention block took them from a matmul
    "conv-qkv": (*COMPILE_MODES["default"], conv_qkv, True),
    # the residual blocks' modulation (1 + scale, shift) applied after GroupNorm, not folded into its affine
    "film-outside": (*COMPILE_MODES["default"], film_outside, True),
    # GroupNorm's statistics from var_mean's Welford reduction also in sampling (which takes them from sums of x and
    # x²: 92.84 and 93.43 against 95.40 ms a guided sampling step on one H200, docs/gpu/sum_statistics_h200.txt)
    "welford-statistics": (*COMPILE_MODES["default"], welford_statistics, True),
    # max-autotune with only Triton's convolution templates (which can take the neighbouring elementwise ops into
    # their prologue/epilogue), cuDNN left out
    "max-autotune-triton-convs": (
        COMPILE_MODES["max-autotune"][0],
        COMPILE_MODES["max-autotune"][1] | {"max_autotune_conv_backends": "TRITON"},
        False,
        None,
        True,
    ),
}
# single Inductor switches on top of the default compile, for the fused elementwise / reduction kernels that take
# about half of both steps (GroupNorm's statistics and apply passes with their producers). On H200s none made either
# step more than 2% faster (multi-kernel: training 44% slower; tile-reductions: training fails to compile in torch
# 2.11): docs/gpu/inductor_switches_h200.txt, and for "pdl" docs/gpu/pdl_flash_loop_h200.txt
INDUCTOR_SWITCHES = {
    "tile-reductions": {"triton.tile_reductions": True},  # 2-D tiled reductions (over H×W, C innermost)
    "nd-tiling": {"triton.prefer_nd_tiling": True},
    "mix-order-reduction": {"triton.mix_order_reduction": True},
    "aggressive-fusion": {"aggressive_fusion": True},
    # persistent and looped reductions both, chosen by timing (persistent ones allowed again for it: COMPILE_OPTIONS
    # turns them off, and multi-kernel only adds a looped twin to a persistent reduction)
    "multi-kernel": {"triton.multi_kernel": 1, "triton.persistent_reductions": True},
    "autotune-pointwise": {"max_autotune_pointwise": True},
    "benchmark-fusion": {"benchmark_fusion": True},  # each candidate fusion kept only where timing favours it
    # a value used more than once (a residual sum) stored when it reads more than 3 inputs, not 4: its readers
    # then load one tensor instead of recomputing it from two (within the noise on both steps, H200:
    # docs/gpu/qkv_matmul_h200.txt)
    "realize-reads-3": {"realize_reads_threshold": 3},
    # pointwise kernels without 2-D tiles: the GroupNorm apply passes, whose loops run (B·C) × (H·W) with H·W
    # innermost, then read NHWC memory strided by C; the sampling step ran 3.3× slower (one H200:
    # docs/gpu/film_fold_h200.txt)
    "max-tiles-1": {"triton.max_tiles": 1},
    # Programmatic Dependent Launch (Hopper and later): each Triton kernel is launched while the one before it still
    # runs and waits in-kernel (griddepcontrol) only before its first dependent load, to hide the launch latency
    # between the training step's ~770 small Triton kernels. On one H200 both steps ran slower with it (training
    # 17.23 against 16.72 ms, sampling 92.43 against 91.12 ms: docs/gpu/pdl_flash_loop_h200.txt)
    "pdl": {"triton.enable_pdl": True},
}
OPTION_SETS |= {name: default_plus(options) for name, options in INDUCTOR_SWITCHES.items()}
OPTION_KINDS = ("sample", "train")


def option_rows(
    config, sets, kinds, batch_train: int, batch_sample: int, f_train: float, f_fwd: float, peak: float,
    csv_dir: Path | None = None,
):  # fmt: skip
    """Each of `sets` (OPTION_SETS names) on each of `kinds`: "sample", the guided sampling step (both passes),
    and "train", the CUDA-graphed training step; the kinds of a set one after the other, so that every set's rows
    come early. Yields printable lines as each finishes (a set that fails to compile says so, the next one runs).
    Within one process later sets find what earlier ones left in Inductor's caches: `--only options` runs each
    (set, kind) in a process of its own with empty caches unless --no-isolate. `csv_dir`: each row's kernels,
    all of them, in <kind>_<set>_<batch>.csv there."""
    import gc

    for name in sets:
        mode, options, regional, layers, tuned = OPTION_SETS[name]
        for kind in kinds:
            images, flops = (batch_sample, 2 * f_fwd) if kind == "sample" else (batch_train, f_train)
            torch._dynamo.reset()
            t0 = time.perf_counter()
            step = None
            try:
                with layers() if layers else contextlib.nullcontext(), cudnn_autotuning(tuned):
                    if kind == "sample":
                        step = sample_fn(config, torch.channels_last, mode, images, options, regional)
                    else:
                        step = graph_train_fn(config, images, mode, options, regional)
                    step()
                    sync(torch.device("cuda"))
                    compile_s = time.perf_counter() - t0
                    csv_path = csv_dir / f"{kind}_{name}_{images}.csv" if csv_dir is not None else None
                    wall, lines, kern = top_kernels(step, n=6, csv_path=csv_path)
                if kern <= 0:
                    raise RuntimeError("the profiler recorded no kernels")
            except Exception as e:  # noqa: BLE001 - one failing set must not end the comparison
                yield f"== {kind} | {name}: failed after {time.perf_counter() - t0:.0f} s: {type(e).__name__}: {e}"[
                    :400
                ]
                continue
            finally:  # the next set compiles and tunes without this one's graphs and memory
                del step
                gc.collect()
                torch.cuda.empty_cache()
            yield (
                f"== {kind} | {name}: compile {compile_s:.0f} s; {wall * 1e3:.2f} ms wall, {kern * 1e3:.2f} ms kernels"
                f" per step of {images}; MFU {images / wall * flops / peak:.1%} wall, "
                f"{images / kern * flops / peak:.1%} kernels\n" + "\n".join(lines)
            )


def cold_cache_env(tmp: str) -> dict[str, str]:
    """This process's environment with torch.compile's caches (Inductor's, Triton's) in `tmp`, so that a child
    started with it compiles everything from empty caches (each setting's compile time a cold one)."""
    import os

    return os.environ | {"TORCHINDUCTOR_CACHE_DIR": f"{tmp}/inductor", "TRITON_CACHE_DIR": f"{tmp}/triton"}


def isolated_option_rows(args, sets, kinds):
    """Each (set, kind) of `--only options` in a process of its own whose Inductor and Triton caches start empty,
    so that every compile time is a cold one and no set reuses another's tuned kernels; yields each child's lines."""
    import subprocess
    import sys
    import tempfile

    for name in sets:
        for kind in kinds:
            with tempfile.TemporaryDirectory(prefix="cfg-options-") as tmp:
                env = cold_cache_env(tmp)
                cmd = [
                    sys.executable, __file__, "--preset", args.preset, "--seconds", str(args.seconds),
                    "--only", "options", "--sets", name, "--kinds", kind, "--no-isolate",
                ]  # fmt: skip
                for flag, value in (
                    ("--train-batch", args.train_batch),
                    ("--sample-batch", args.sample_batch),
                    ("--kernels-out", args.kernels_out),
                    ("--sdpa", args.sdpa),
                ):
                    cmd += [flag, str(value)] if value else []
                out = subprocess.run(cmd, env=env, capture_output=True, text=True)
                rows = [line for line in out.stdout.splitlines() if line.startswith(("== ", "  "))]
                if out.returncode or not rows:
                    rows.append(f"== {kind} | {name}: process exit {out.returncode}: {out.stderr[-300:]}")
                yield "\n".join(rows)


COPY_OPS = ("aten::copy_", "aten::contiguous", "aten::clone", "aten::_to_copy", "aten::to", "aten::reshape")


def launching_op(event) -> str:
    """The nearest enclosing op of a profiled copy that is not itself a copy, and the autograd node above it if
    there is one (e.g. `aten::mul < autograd::engine::evaluate_function: MulBackward0`, `AccumulateGrad`)."""
    parent = event.cpu_parent
    while parent is not None and (parent.name in COPY_OPS or parent.name.startswith("cuda")):
        parent = parent.cpu_parent
    if parent is None:
        return "(top level)"
    node = parent
    while node is not None and not node.name.startswith(("autograd::", "torch::autograd::")):
        node = node.cpu_parent
    return parent.name if node is None or node is parent else f"{parent.name} < {node.name}"


def copy_sources(step, n: int = 12) -> list[str]:
    """Where a step's plain copy kernels come from: the device time of `aten::copy_` by the op that encloses it
    (`launching_op`), then by input shapes with the innermost Python frames above."""
    for _ in range(3):
        step()
    sync(torch.device("cuda"))
    with profile(
        activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True, with_stack=True
    ) as prof:
        for _ in range(3):
            step()
        sync(torch.device("cuda"))
    by_op: dict[str, list[float]] = {}
    for e in prof.events():
        if e.name == "aten::copy_" and e.self_device_time_total > 0:
            entry = by_op.setdefault(launching_op(e), [0.0, 0])
            entry[0] += e.self_device_time_total
            entry[1] += 1
    total = sum(t for t, _ in by_op.values())
    lines = [f"  copies (aten::copy_) on the device: {total / 3 / 1e3:.2f} ms per step, by enclosing op:"]
    for name, (t, count) in sorted(by_op.items(), key=lambda kv: -kv[1][0])[:n]:
        lines.append(f"  {t / 3 / 1e3:6.2f} ms/step {count // 3:>4}/step  {name[:110]}")
    ops = [
        e
        for e in prof.key_averages(group_by_input_shape=True, group_by_stack_n=4)
        if e.key == "aten::copy_" and e.self_device_time_total > 0
    ]
    ops.sort(key=lambda e: -e.self_device_time_total)
    lines.append("  by input shapes:")
    for e in ops[:n]:
        stack = " < ".join(str(f).split("/")[-1] for f in (e.stack or [])[:4])
        lines.append(
            f"  {e.self_device_time_total / 3 / 1e3:6.2f} ms/step {e.count // 3:>4}/step  {e.input_shapes}"
            + (f"\n      from {stack}" if stack else "")
        )
    return lines


def cell_rate(
    config, params, n_examples: int, f_fwd: float, cudnn_benchmark: bool = True
) -> tuple[float, float, float]:
    """A whole sampling cell of the preset's grid as the sample stage runs it (`sampling_kwargs`: sampler,
    options, steps, λ range, batch, precision, compile; CFG), with cuDNN's autotuning on or off
    (`sample.cudnn_benchmark`): (images/s, model FLOP/s with the network passes CFG runs — w = 0 rows skip ε(z),
    w = −1 rows skip ε(z, c) —, wall s of the timed call). One untimed batch compiles (and autotunes) first."""
    s = params.sample
    model = UNet(config).cuda().eval()
    for p in model.parameters():
        p.data.add_(0.01 * torch.randn_like(p))
    kwargs = sampling_kwargs(params) | {"guidance": "cfg", "guidance_options": {}}
    kwargs["use_cudnn_benchmark"] = cudnn_benchmark
    kwargs |= {"num_classes": 10, "image_shape": (config.in_channels, config.image_size, config.image_size)}
    generate_w_grid(model, s.w, examples_per_batch(s.batch_size, len(s.w)), device="cuda", **kwargs)
    sync(torch.device("cuda"))
    t0 = time.perf_counter()
    generate_w_grid(model, s.w, n_examples, device="cuda", **kwargs)
    sync(torch.device("cuda"))
    wall = time.perf_counter() - t0
    images = n_examples * len(s.w)
    cond, uncond = needed_passes(torch.tensor(s.w), len(s.w))
    passes_per_image = (cond.numel() + uncond.numel()) / len(s.w)
    return images / wall, images / wall * s.steps * passes_per_image * f_fwd, wall


def print_table(rows, peak: float, f_train: float, f_fwd: float) -> None:
    print(
        f"\ndevice {torch.cuda.get_device_name(0)}, torch {torch.__version__}; matmul {peak / 1e12:.0f} TFLOP/s"
    )
    print(f"model FLOPs per image: train {f_train / 1e9:.2f} G, forward {f_fwd / 1e9:.2f} G")
    print(f"{'what':<44}{'batch':>6}{'images/s':>11}{'TFLOP/s':>9}{'MFU':>7}{'breaks':>7}{'wall s':>7}")
    for what, b, ips, flops, breaks, wall in rows:
        print(f"{what:<44}{b:>6}{ips:>11,.0f}{flops / 1e12:>9.1f}{flops / peak:>7.1%}{breaks:>7}{wall:>7.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="presets/fashion_mnist_gpu.yaml")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument(
        "--only",
        default="loop,kernels,cell,copies,variants",
        help="comma-separated parts: loop, kernels, cell, copies, variants, options (not in the default)",
    )
    ap.add_argument(
        "--sdpa",
        choices=["flash", "efficient", "cudnn", "math"],
        help="run with only this scaled_dot_product_attention backend (default: PyTorch's choice)",
    )
    ap.add_argument("--loop-steps", type=int, default=400, help="steps of each training-loop run")
    ap.add_argument(
        "--loop-forms", default="compile,graph", help=f"loop: which forms, of {', '.join(LOOP_FORMS)}"
    )
    ap.add_argument("--loop-batches", default="256,512", help="loop: batches, comma-separated")
    ap.add_argument("--cell-examples", type=int, default=2000, help="examples per w of the timed cell")
    ap.add_argument(
        "--autotune", action="store_true", help="variants: add compile mode max-autotune-no-cudagraphs"
    )
    ap.add_argument(
        "--sets",
        default=",".join(OPTION_SETS),
        help=f"options: which option sets, of {', '.join(OPTION_SETS)}",
    )
    ap.add_argument("--kinds", default=",".join(OPTION_KINDS), help="options: sample, train or both")
    ap.add_argument(
        "--train-batch", type=int, help="options: the training step's batch (default: the preset's)"
    )
    ap.add_argument(
        "--sample-batch", type=int, help="options: the sampling step's examples (default: the preset's batch)"
    )
    ap.add_argument("--kernels-out", help="options: a folder for every row's whole kernel list (CSV)")
    ap.add_argument(
        "--no-isolate",
        dest="isolate",
        action="store_false",
        help="options: compile every set in this process (later sets then reuse earlier ones' cache entries)",
    )
    args = ap.parse_args()
    parts = set(args.only.split(","))
    if unknown := parts - {"loop", "kernels", "cell", "copies", "variants", "options"}:
        ap.error(
            f"--only {args.only}: unknown part(s) {sorted(unknown)}; use loop, kernels, cell, copies, variants, "
            "options"
        )
    if unknown := set(args.sets.split(",")) - set(OPTION_SETS):
        ap.error(f"--sets {args.sets}: unknown set(s) {sorted(unknown)}; use {', '.join(OPTION_SETS)}")
    if unknown := set(args.loop_forms.split(",")) - set(LOOP_FORMS):
        ap.error(
            f"--loop-forms {args.loop_forms}: unknown form(s) {sorted(unknown)}; use {', '.join(LOOP_FORMS)}"
        )
    try:
        batches = [int(b) for b in args.loop_batches.split(",")]
        if min(batches) < 1:
            raise ValueError
    except ValueError:
        ap.error(f"--loop-batches {args.loop_batches}: use positive integers, comma-separated (e.g. 256,512)")
    args.loop_batches = batches
    if unknown := set(args.kinds.split(",")) - set(OPTION_KINDS):
        ap.error(f"--kinds {args.kinds}: unknown kind(s) {sorted(unknown)}; use sample, train")
    if args.sdpa:
        backend = {
            "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION,
            "math": SDPBackend.MATH,
        }[args.sdpa]
        print(f"scaled_dot_product_attention backend: {args.sdpa} only")
        with sdpa_kernel(backend), sdpa_attention():
            return run(args, parts)
    return run(args, parts)


def preset_params(preset: str):
    """params.yaml with the preset file's values on top, as the stages of a study on that preset read them."""
    return params_from_dict(
        merged_params(
            load_yaml(Path("params.yaml").read_text()),
            flat_overrides(load_yaml(Path(preset).read_text())),
        )
    )


def preset_unet(params) -> UNetConfig:
    """The preset's U-Net for Fashion-MNIST-shaped images (one channel, 10 classes) at its data.image_size."""
    size = params.data.image_size or 32
    return UNetConfig.from_params(params.model, image_size=size, in_channels=1, num_classes=10)


def run(args, parts: set[str]) -> None:
    params = preset_params(args.preset)
    configure_cuda()
    config = preset_unet(params)
    peak = matmul_rate(torch.device("cuda"), args.seconds)
    probe = UNet(config).cuda()
    f_train = flops_per_image(probe, config, torch.device("cuda"), train=True)
    f_fwd = flops_per_image(probe, config, torch.device("cuda"), train=False)
    cl, cf = torch.channels_last, torch.contiguous_format
    rows = []
    forms = args.loop_forms.split(",")
    for batch, form in [(b, f) for b in args.loop_batches for f in forms] if "loop" in parts else []:
        torch._dynamo.reset()
        graphed, update = LOOP_FORMS[form]
        ips, wall = loop_rate(
            config, batch, args.loop_steps, compile=True, cuda_graph=graphed, compile_update=update
        )
        what = "train loop compile" + (" + CUDA graph" if graphed else "") + (" + update" if update else "")
        rows.append((what, batch, ips, f_train * ips, 0, wall))
        print(rows[-1], flush=True)
    kernels = []  # (heading, lines), printed after the table
    if "options" in parts:
        sets, kinds = args.sets.split(","), args.kinds.split(",")
        print(f"\nInductor option sets, {torch.cuda.get_device_name(0)}, matmul {peak / 1e12:.0f} TFLOP/s:")
        if args.isolate and len(sets) * len(kinds) > 1:
            rows_of = isolated_option_rows(args, sets, kinds)
        else:
            batches = (
                args.train_batch or params.train.batch_size,
                args.sample_batch or params.sample.batch_size,
            )
            csv_dir = Path(args.kernels_out) if args.kernels_out else None
            rows_of = option_rows(config, sets, kinds, *batches, f_train, f_fwd, peak, csv_dir)
        for text in rows_of:
            print(text, flush=True)
    if "kernels" in parts:
        batch, nb = params.train.batch_size, params.sample.batch_size
        for title, make, images, flops in [
            (f"train step, compile + CUDA graph (train.cuda_graph), batch {batch}",
             lambda: graph_train_fn(config, batch), batch, f_train),
            (f"train step, compile, batch {batch} (loss, backward, Adam; no clipping or EMA)",
             lambda: train_fn(config, torch.channels_last, "default", batch), batch, f_train),
            (f"guided sampling step, compile, batch {nb} (both passes)",
             lambda: sample_fn(config, torch.channels_last, "default", nb), nb, 2 * f_fwd),
        ]:  # fmt: skip
            torch._dynamo.reset()
            wall, lines, _ = top_kernels(make())
            lines.insert(
                1,
                f"  {images / wall:,.0f} images/s, {images / wall * flops / 1e12:.1f} TFLOP/s, MFU {images / wall * flops / peak:.1%}",
            )
            kernels.append((f"top CUDA kernels, {title} (share of device time)", lines))
            print(f"\n{title}:\n" + "\n".join(lines), flush=True)
    if "copies" in parts:
        torch._dynamo.reset()
        batch = params.train.batch_size
        lines = copy_sources(train_fn(config, torch.channels_last, "default", batch))
        kernels.append((f"copy sources, train step, compile, batch {batch}", lines))
        print(f"\ncopy sources, train step, compile, batch {batch}:\n" + "\n".join(lines), flush=True)
    for tuned in (True, False) if "cell" in parts else ():  # sample.cudnn_benchmark: speed against same bytes
        torch._dynamo.reset()
        ips, flops, wall = cell_rate(config, params, args.cell_examples, f_fwd, tuned)
        s = params.sample
        what = f"sample cell {len(s.w)} w x {args.cell_examples}, T={s.steps}, cuDNN {'tuned' if tuned else 'heur.'}"
        rows.append((what, s.batch_size, ips, flops, 0, wall))
        print(rows[-1], flush=True)
    if "variants" in parts:
        train_variants = [
            ("eager channels_last", cl, None, 256),
            ("eager contiguous", cf, None, 256),
            ("compile channels_last", cl, "default", 256),
            ("compile contiguous", cf, "default", 256),
            ("compile contiguous", cf, "default", 512),
            ("compile contiguous", cf, "default", 1024),
        ]
        if args.autotune:
            train_variants.append(
                ("compile max-autotune-no-cg ch_last", cl, "max-autotune-no-cudagraphs", 256)
            )
        sample_variants = [
            ("eager channels_last", cl, None, 4096),
            ("compile channels_last", cl, "default", 4096),
            ("compile contiguous", cf, "default", 4096),
            ("compile reduce-overhead contig.", cf, "reduce-overhead", 4096),
            ("compile contiguous", cf, "default", 8192),
            ("compile channels_last", cl, "default", 8192),
        ]
        if args.autotune:
            sample_variants.append(
                ("compile max-autotune-no-cg ch_last", cl, "max-autotune-no-cudagraphs", 4096)
            )
        steps = {}  # the train steps, for the kernel table below
        for kind, make, flops, variants in (
            ("train", train_fn, f_train, train_variants),
            ("sample step", sample_fn, 2 * f_fwd, sample_variants),
        ):
            for name, fmt, mode, batch in variants:
                torch._dynamo.reset()
                torch._dynamo.utils.counters.clear()
                t0 = time.perf_counter()
                step = make(config, fmt, mode, batch)
                s = timed(step, args.seconds)
                breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
                rows.append(
                    (f"{kind} {name}", batch, batch / s, flops * batch / s, breaks, time.perf_counter() - t0)
                )
                if kind == "train":
                    steps[(name, batch)] = step
                print(rows[-1], flush=True)
        eager = top_kernels(steps[("eager channels_last", 256)])[1]
        kernels.append(
            ("top CUDA kernels, train eager channels_last batch 256 (share of device time)", eager)
        )
    print_table(rows, peak, f_train, f_fwd)
    for heading, lines in kernels:
        print(f"\n{heading}:\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
