"""The diffusion training loop: joint conditional / unconditional training by label dropout (Alg. 1)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from cfg.engine.device import autocast, configure_cuda
from cfg.maths.diffusion import LAMBDA_MAX, LAMBDA_MIN, diffusion_loss
from cfg.nets.unet import EMA, UNet, UNetConfig

# called every log_every steps with {"step", "loss", "lr", "images_per_s", "eta_s", "ema"}; may raise to stop training
StepCallback = Callable[[dict], None]


def train_kwargs(train) -> dict:
    """`train_diffusion`'s keyword arguments from params.yaml's `train` section (`cfg.study.config.TrainParams`), less
    p_uncond (one per model), the device (resolved by the caller) and the logging cadence."""
    names = (
        "steps",
        "batch_size",
        "lr",
        "warmup_steps",
        "ema_decay",
        "grad_clip",
        "lambda_min",
        "lambda_max",
    )
    return {k: getattr(train, k) for k in (*names, "seed", "bf16", "compile")}


@dataclass
class TrainResult:
    model: UNet  # the raw (non-averaged) weights after the last step
    ema: UNet  # the EMA weights, which are sampled
    history: list[dict] = field(default_factory=list)  # the logged loss curve
    images_per_s: float = 0.0  # training throughput over the whole run (after the first logged interval)


def train_diffusion(
    config: UNetConfig,
    train_x: Tensor,  # (N, C, H, W) in [-1, 1]
    train_y: Tensor,  # (N,) int64 labels
    *,
    p_uncond: float = 0.1,  # probability of replacing a label by the null label
    steps: int = 1000,  # optimiser steps
    batch_size: int = 128,  # images per step
    lr: float = 2e-4,  # Adam learning rate after warm-up
    warmup_steps: int = 100,  # linear warm-up steps
    ema_decay: float = 0.999,  # EMA decay
    grad_clip: float | None = 1.0,  # max gradient norm, None to disable
    lambda_min: float = LAMBDA_MIN,  # log-SNR range of training λ
    lambda_max: float = LAMBDA_MAX,
    seed: int = 0,  # seeds initialisation, batches, λ, ε and label dropout
    device: torch.device | str = "cpu",
    bf16: bool = True,  # bf16 autocast on CUDA
    compile: bool = False,  # torch.compile the network on CUDA
    log_every: int = 50,  # steps between history entries / callback calls
    callback: StepCallback | None = None,
) -> TrainResult:
    """Train ε_θ(z_λ, λ, c) with the ε-MSE loss and label dropout p_uncond; returns model, EMA and loss curve."""
    if not 0.0 <= p_uncond <= 1.0:
        raise ValueError(f"p_uncond must lie in [0, 1], got {p_uncond}")
    device = torch.device(device)
    configure_cuda()
    torch.manual_seed(seed)
    model = UNet(config).to(device)
    ema = EMA(model, ema_decay)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if compile and device.type == "cuda" else model
    # the fused kernel: one pass over all parameters (about 5% of a CPU step for the embedded default's U-Net)
    opt = torch.optim.Adam(model.parameters(), lr=lr, fused=device.type in ("cpu", "cuda"))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warmup_steps)))
    gen = torch.Generator(device=device).manual_seed(seed)
    x_all, y_all = train_x.to(device), train_y.to(device)

    history: list[dict] = []
    running, n_running = 0.0, 0
    t_start = t_last = time.perf_counter()
    timed_images, timed_s = 0, 0.0
    model.train()
    for step in range(1, steps + 1):
        idx = torch.randint(0, x_all.shape[0], (batch_size,), generator=gen, device=device)
        x, y = x_all[idx], y_all[idx]
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, bf16):
            loss = diffusion_loss(
                step_model,
                x,
                y,
                p_uncond=p_uncond,
                null_label=config.null_label,
                generator=gen,
                lambda_min=lambda_min,
                lambda_max=lambda_max,
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        sched.step()
        ema.update(model)
        running += loss.detach()
        n_running += 1
        if step % log_every == 0 or step == steps:
            mean_loss = float(running) / n_running  # the only host sync, once per interval
            if not math.isfinite(mean_loss):
                raise FloatingPointError(f"training loss became {mean_loss} at step {step}; lower train.lr")
            now = time.perf_counter()
            if history:  # the first interval holds compilation and warm-up
                timed_images += n_running * batch_size
                timed_s += now - t_last
            rate = timed_images / timed_s if timed_s else n_running * batch_size / max(now - t_last, 1e-9)
            entry = {
                "step": step,
                "loss": mean_loss,
                "lr": sched.get_last_lr()[0],
                "images_per_s": rate,
                "elapsed_s": now - t_start,
                "eta_s": (steps - step) * batch_size / rate,
            }
            history.append(entry)
            if callback is not None:
                callback({**entry, "ema": ema.model})  # the weights a checkpoint evaluation samples
            running, n_running, t_last = 0.0, 0, now
    model.eval()
    return TrainResult(
        model=model,
        ema=ema.model,
        history=history,
        images_per_s=timed_images / timed_s if timed_s else history[-1]["images_per_s"],
    )
