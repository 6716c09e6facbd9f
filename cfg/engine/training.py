"""The diffusion training loop: joint conditional / unconditional training by label dropout (Alg. 1)."""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from cfg.engine.device import COMPILE_OPTIONS, autocast, compile_as, configure_cuda
from cfg.engine.distributed import Dist, all_mean, all_stack
from cfg.io import atomic_save
from cfg.maths.diffusion import LAMBDA_MAX, LAMBDA_MIN, diffusion_loss, eps_loss, training_draws
from cfg.nets.unet import EMA, UNet, UNetConfig

# called every log_every steps with {"step", "loss", "lr", "images_per_s", "eta_s", "ema"}; may raise to stop
# training; what it returns (e.g. the FIDs of an evaluation of "ema") is added to that step's history entry
StepCallback = Callable[[dict], dict | None]


def train_kwargs(train) -> dict:
    """`train_diffusion`'s keyword arguments from params.yaml's `train` section (`cfg.study.config.TrainParams`), less
    p_uncond (one per model), the device (resolved by the caller) and the logging and checkpointing cadence."""
    names = (
        "steps",
        "batch_size",
        "lr",
        "warmup_steps",
        "ema_decay",
        "ema_warmup",
        "grad_clip",
        "lambda_min",
        "lambda_max",
    )
    return {k: getattr(train, k) for k in (*names, "seed", "bf16", "compile", "cuda_graph", "compile_update")}


# train.* keys that do not change the trained weights or the loss curve
RESUME_NEUTRAL_KEYS = ("p_uncond", "device", "checkpoint_every", "eval_every", "eval_samples", "eval_w")


def resume_state_path(
    root: str | Path,  # project root; states live in <root>/.resume/
    *,
    p_uncond: float,
    data_fingerprint: str,
    model: dict,  # params.yaml's model section
    train: dict,  # params.yaml's train section
    device: torch.device,  # the resolved device: a CUDA state is not resumed on CPU
    world: int = 1,  # data-parallel processes (train.devices: all counts the GPUs of the machine it runs on)
) -> Path:
    """Where a train run keeps its resume state: outside the stage's outputs (DVC deletes those before it runs),
    named by a hash of everything that determines the result, so that a state of other settings is never resumed.
    The process count is part of it: each rank draws its own dropout masks, and the gradients are summed in
    another order, so another count trains other weights (a single process's path is the one it always had)."""
    settings = {
        "p_uncond": p_uncond,
        "data_fingerprint": data_fingerprint,
        "model": model,
        "train": {k: v for k, v in train.items() if k not in RESUME_NEUTRAL_KEYS},
        "device": torch.device(device).type,
    }
    if world > 1:
        settings["world"] = world
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return Path(root) / ".resume" / f"train-p_uncond={p_uncond}-{digest}" / "state.pt"


GRAPH_WARMUP = 3  # eager steps before the capture (cuDNN autotuning, compilation, Adam's state allocated)


class GraphStep:
    """One training step (given the batch and its draws) replayed as a CUDA graph: eps_loss, backward, gradient
    clipping, Adam and the EMA update, the loss added to `running`. The first GRAPH_WARMUP calls run eagerly on
    a side stream (as PyTorch's whole-network capture recipe asks); the next captures, and every call replays."""

    def __init__(
        self, net, model, opt, ema: EMA, running: Tensor, grad_clip: float | None, bf16: bool,
        compile_update: bool = False,
    ):  # fmt: skip
        self.net, self.model, self.opt, self.ema, self.running = net, model, opt, ema, running
        self.grad_clip, self.bf16 = grad_clip, bf16
        # `update` through torch.compile (train.compile_update): Inductor fuses clipping, Adam (foreach, not fused:
        # the fused kernel is opaque to it) and the EMA into a few kernels over all parameters. The eager
        # multi-tensor kernels of the preset's 275 mostly small tensors took 0.63 ms of its step on an H200
        # (0.7-1.2 TB/s), the compiled ones ~0.28 ms (docs/gpu/dropout_update_h200.txt)
        self.update = torch.compile(self.update, options=COMPILE_OPTIONS) if compile_update else self.update
        self.device = running.device
        self.decay = torch.zeros((), device=self.device)
        self.inputs: list[Tensor] | None = None  # x, λ, ε, c: fixed buffers the graph reads
        self.graph: torch.cuda.CUDAGraph | None = None
        self.calls = 0
        self.addresses: list[int] = []  # of the long-lived tensors the graph reads and writes, at capture

    def _long_lived(self) -> list[Tensor]:
        """Tensors allocated outside the graph's pool that every replay reads or writes in place: weights and
        buffers, EMA weights and buffers, Adam's state and learning rates. A graph replays raw addresses, so if any of
        them is reallocated (a module converted with `.to(memory_format=...)`, `.float()`, a `load_state_dict`
        with assign=True) the replays would go on updating freed memory while the module reads its new,
        frozen tensors."""
        state = [t for st in self.opt.state.values() for t in st.values() if isinstance(t, Tensor)]
        lrs = [g["lr"] for g in self.opt.param_groups if isinstance(g["lr"], Tensor)]
        return [
            *self.model.parameters(), *self.model.buffers(), *self.ema.model.parameters(),
            *self.ema.model.buffers(), *state, *lrs,
        ]  # fmt: skip

    def check_addresses(self) -> None:
        """Raise if a tensor the captured step updates in place was reallocated since the capture. The training
        loop calls it after its callback and checkpoint code, the only foreign code between two replays (a
        check per replay would cost ~1,400 `data_ptr` calls a step)."""
        if self.graph is None:
            return
        now = [t.data_ptr() for t in self._long_lived()]
        if now != self.addresses:
            moved = sum(a != b for a, b in zip(now, self.addresses, strict=False)) + abs(
                len(now) - len(self.addresses)
            )
            raise RuntimeError(
                f"train.cuda_graph: {moved} tensor(s) the captured training step updates in place were reallocated "
                "since the capture (e.g. the model or its EMA converted with .to(memory_format=...) in a callback); "
                "the graph would write into freed memory. Convert a copy instead, or train with cuda_graph: false"
            )

    def body(self) -> None:
        x, lam, eps, c = self.inputs
        with autocast(self.device, self.bf16, cache=False):
            loss = eps_loss(self.net, x, lam, eps, c)
        loss.backward()
        self.update()
        self.running.add_(loss.detach())

    def update(self) -> None:
        """Gradient clipping, Adam and the EMA update, after the backward."""
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.opt.step()
        self.ema.apply_(self.model, self.decay)

    def __call__(self, x: Tensor, lam: Tensor, eps: Tensor, c: Tensor) -> None:
        if self.inputs is None:
            self.inputs = [t.clone(memory_format=torch.preserve_format) for t in (x, lam, eps, c)]
        else:
            for buf, t in zip(self.inputs, (x, lam, eps, c), strict=True):
                buf.copy_(t)
        self.decay.fill_(self.ema.decay_at(self.ema.num_updates))
        if self.graph is not None:
            self.graph.replay()
        elif self.calls < GRAPH_WARMUP:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self.opt.zero_grad(set_to_none=True)
                self.body()
            torch.cuda.current_stream(self.device).wait_stream(side)
        else:
            self.opt.zero_grad(set_to_none=True)  # the graph's backward allocates the gradients in its pool
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.body()
            self.addresses = [t.data_ptr() for t in self._long_lived()]
            self.graph.replay()  # capturing ran nothing: this step happens now
        self.ema.num_updates += 1
        self.calls += 1


def make_adam(
    params, lr: float, device: torch.device, *, graphed: bool, compile_update: bool
) -> torch.optim.Adam:
    """The training loop's Adam. Under train.cuda_graph (`graphed`) its learning rate is a tensor that the scheduler
    fills (no re-capture) and its kernel capturable. With `compile_update` the foreach implementation, which Inductor
    traces (GraphStep.update); otherwise the fused kernel: one pass over all parameters (about 5% of a CPU step for
    the embedded default's U-Net)."""
    return torch.optim.Adam(
        params,
        lr=torch.tensor(lr, device=device) if graphed else lr,
        fused=device.type in ("cpu", "cuda") and not compile_update,
        foreach=True if compile_update else None,
        capturable=graphed,
    )


class OtherCodeState(ValueError):
    """A resume state written by other code than the caller's (`train_diffusion`'s `code`)."""


def _code_changes(
    state: dict | None, code: dict[str, str] | None, resume_path: str | Path | None, resume_other_code: bool
) -> list[str]:
    """The code files that changed across resumes of this state (its own record and the change to `code`, if
    allowed); OtherCodeState when `code` differs from the state's and `resume_other_code` is off."""
    if state is None:
        return []
    other_code = list(state.get("other_code", []))
    if code is None or state.get("code") == code:
        return other_code
    old = state.get("code")
    changed = (
        ["all: a state from before code hashes were kept"]
        if old is None
        else sorted(k for k in old.keys() | code.keys() if old.get(k) != code.get(k))
    )
    if not resume_other_code:
        raise OtherCodeState(
            f"resume state {resume_path} was written by other code (changed: {', '.join(changed)}): "
            "continuing it would train one model with two versions of the code; remove "
            f"{Path(resume_path).parent} to start over, or continue it knowingly"
        )
    return sorted(set(other_code) | set(changed))


def check_resume_code(
    resume_path: str | Path, code: dict[str, str], *, resume_other_code: bool = False
) -> None:
    """train_diffusion's code check of the state at `resume_path` (if any) on its own, for a caller that must
    refuse a state before it starts other work (the train stage: before its MLflow run)."""
    path = Path(resume_path)
    if path.exists():
        _code_changes(torch.load(path, map_location="cpu", weights_only=True), code, path, resume_other_code)


@dataclass
class TrainResult:
    model: UNet  # the raw (non-averaged) weights after the last step
    ema: UNet  # the EMA weights, which are sampled
    history: list[dict] = field(default_factory=list)  # the logged loss curve
    images_per_s: float = 0.0  # training throughput over the whole run (after the first logged interval)
    resumed_from: int = 0  # the step a resume state continued from; 0 when trained from scratch
    # the code files that changed across a resume allowed by `resume_other_code`
    resumed_other_code: list[str] = field(default_factory=list)


def dropout_seed(seed: int, rank: int, step: int) -> int:
    """The global generators' seed for `step` on data-parallel `rank`: a 64-bit hash (splitmix64's finaliser) of
    the three, so that the ranks and steps of a run draw from unrelated seeds."""
    x = (seed * 0x9E3779B97F4A7C15 + rank * 0xBF58476D1CE4E5B9 + step * 0x94D049BB133111EB) % 2**64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % 2**64
    return x ^ (x >> 31)


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
    ema_warmup: bool = True,  # EMA decay min(ema_decay, (1 + t) / (10 + t)) at update t
    grad_clip: float | None = 1.0,  # max gradient norm, None to disable
    lambda_min: float = LAMBDA_MIN,  # log-SNR range of training λ
    lambda_max: float = LAMBDA_MAX,
    seed: int = 0,  # seeds initialisation, batches, λ, ε and label dropout
    device: torch.device | str = "cpu",
    bf16: bool = True,  # bf16 autocast on CUDA
    compile: bool | str = False,  # torch.compile the network on CUDA: true, false or a COMPILE_MODES name
    cuda_graph: bool = False,  # on CUDA, one process: replay each step (loss to EMA) as one CUDA graph
    compile_update: bool = False,  # with compile and cuda_graph on CUDA: clipping, Adam and the EMA compiled too
    log_every: int = 50,  # steps between history entries / callback calls
    callback: StepCallback | None = None,
    resume_path: str | Path | None = None,  # training state file: continued from if it exists, written below
    checkpoint_every: int = 0,  # steps between writes of resume_path; 0 = never
    code: dict[str, str] | None = None,  # {file: hash} of the training code (a stage's deps), kept in states
    resume_other_code: bool = False,  # continue a state other code wrote (else OtherCodeState naming the files)
    dist: Dist | None = None,  # data parallel over dist.world processes (DDP); batch_size is the global batch
) -> TrainResult:
    """Train ε_θ(z_λ, λ, c) with the ε-MSE loss and label dropout p_uncond; returns model, EMA and loss curve.

    With `resume_path`, a state written there by an interrupted call with the same arguments is continued from;
    on CPU the result is bitwise that of an uninterrupted run. The caller removes the file once its outputs are
    safe. A state of other arguments raises ValueError (the caller's path should name the settings), and so does
    one written by other `code` (a state without it counts as other code): its weights would be two versions'
    training under one version's name. With `resume_other_code` such a state is continued, and the result's
    `resumed_other_code` names the files that changed (carried on through later states).

    Data parallel: every process draws the same global batch and noise and computes its batch_size / world
    rows; DDP averages the gradients, so N processes take the steps one process would at the same global
    batch and learning rate (equal up to float reassociation of the gradient sum) when the network has no
    dropout. Dropout masks come from the global generators, which each process seeds before every step from
    (seed, rank, step) (`dropout_seed`): the ranks' rows get independent masks, as one process's rows do, and a
    resumed run draws the masks an uninterrupted one would; the masks are not one process's, so with dropout N
    processes train as one would in distribution, not in value. Rank 0 alone calls `callback` and writes the
    resume state, which holds every rank's loss sum since the last log; only the same number of processes
    continues it (another count trains other weights: a ValueError).

    `cuda_graph`: a step launches hundreds of small kernels (forward, backward, clipping, Adam, EMA), and at
    the GPU preset's batch the GPU waits on their launches more than it computes. The step's deterministic part
    is captured once, after GRAPH_WARMUP eager steps, into one CUDA graph that each later step replays with
    one launch; the batch, λ, ε and label drops are drawn eagerly into fixed buffers in the same order as
    without it, the learning rate and the EMA decay are tensors filled before each replay (Adam runs with
    capturable=True), dropout draws from CUDA's default generator, which graphs advance per replay. The
    weights equal the eager step's up to rounding (the EMA's d·a + (1 − d)·b, Adam's capturable kernel).
    With `compile_update` as well (and `compile`), the graph's clipping, Adam (its foreach form) and EMA update
    are one compiled function: a few fused kernels over all parameters instead of torch's multi-tensor ones.
    """
    d = dist or Dist()
    if cuda_graph and d.world > 1:
        raise ValueError(
            f"train.cuda_graph needs one process (train.devices: 1), got {d.world}: DDP's gradient all-reduce "
            "is not captured here"
        )
    if batch_size % d.world:
        raise ValueError(f"train.batch_size = {batch_size} must be a multiple of the {d.world} processes")
    rows = (
        slice(d.rank * batch_size // d.world, (d.rank + 1) * batch_size // d.world) if d.world > 1 else None
    )
    if not 0.0 <= p_uncond <= 1.0:
        raise ValueError(f"p_uncond must lie in [0, 1], got {p_uncond}")
    if checkpoint_every < 0 or (checkpoint_every and resume_path is None):
        raise ValueError(f"checkpoint_every = {checkpoint_every} needs a resume_path and must be >= 0")
    device = torch.device(device)
    # the arguments that determine the result: a resume state must have been written with the same ones
    settings = {
        "config": config.to_dict(),
        "train_x": list(train_x.shape),
        "p_uncond": p_uncond,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "warmup_steps": warmup_steps,
        "ema_decay": ema_decay,
        "ema_warmup": ema_warmup,
        "grad_clip": grad_clip,
        "lambda_min": lambda_min,
        "lambda_max": lambda_max,
        "seed": seed,
        "device": device.type,
        "bf16": bf16,
        "log_every": log_every,
    }
    graphed = cuda_graph and device.type == "cuda"
    if graphed:  # another kernel path (rounding): a state of the eager path is not continued, nor the reverse
        settings["cuda_graph"] = True
    if d.world > 1:  # other dropout masks and another gradient sum: not continued with another process count
        settings["world"] = d.world
    resume_path = Path(resume_path) if resume_path is not None else None
    state = None
    if resume_path is not None and resume_path.exists():
        state = torch.load(resume_path, map_location="cpu", weights_only=True)
        if state["settings"] != settings:
            diff = sorted(
                k for k in settings | state["settings"] if state["settings"].get(k) != settings.get(k)
            )
            raise ValueError(
                f"resume state {resume_path} was written with other settings ({diff}); remove it"
            )
    other_code = _code_changes(state, code, resume_path, resume_other_code)
    configure_cuda()
    torch.manual_seed(seed)
    model = UNet(config).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    # after the conversion: the EMA weights are then channels-last too, so that sampling them (generate_w_grid
    # converts its model to channels-last) leaves their storage in place, which a CUDA-graph step updates
    ema = EMA(model, ema_decay, warmup=ema_warmup)
    step_model = model
    if d.world > 1:
        step_model = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    step_model = compile_as(step_model, compile) if device.type == "cuda" else step_model
    # clipping, Adam and the EMA (GraphStep.update) compiled with the network under train.cuda_graph
    compile_update = compile_update and graphed and compile is not False
    opt = make_adam(model.parameters(), lr, device, graphed=graphed, compile_update=compile_update)

    def warm_up(s: int) -> float:  # the learning rate's factor at step s + 1 (LambdaLR counts from 0)
        return min(1.0, (s + 1) / max(1, warmup_steps))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, warm_up)
    gen = torch.Generator(device=device).manual_seed(seed)
    x_all, y_all = train_x.to(device), train_y.to(device)

    history: list[dict] = []
    running, n_running = torch.zeros((), device=device), 0  # loss sum since the last log
    t_start = t_last = time.perf_counter()
    timed_images, timed_s = 0, 0.0
    start = 0
    if state is not None:
        start = state["step"]
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        implementation = [(g["fused"], g["foreach"]) for g in opt.param_groups]
        opt.load_state_dict(state["optimizer"])  # the saved groups' settings replace the ones above
        for group, (fused, foreach) in zip(opt.param_groups, implementation, strict=True):
            group["fused"], group["foreach"] = fused, foreach  # this run's kernels, whichever wrote the state
        sched.load_state_dict(state["scheduler"])
        if (
            graphed
        ):  # the loaded lr is a CPU tensor, which fused Adam would read once, at capture: back on the GPU
            for group in opt.param_groups:
                group["lr"] = torch.tensor(float(group["lr"]), device=device)
        gen.set_state(state["generator"])
        torch.set_rng_state(state["cpu_rng"])  # dropout draws from the global generators
        if device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        history = state["history"]
        # each rank's own loss sum since the last log (one per rank in a data-parallel state)
        running = state["running"][d.rank] if d.world > 1 else state["running"]
        running, n_running = running.to(device), state["n_running"]
        timed_images, timed_s = state["timed_images"], state["timed_s"]
        t_start, t_last = t_start - state["elapsed_s"], t_last - state["since_log_s"]
    first_interval = True  # holds compilation and warm-up: not timed
    model.train()
    graph_step = (
        GraphStep(step_model, model, opt, ema, running, grad_clip, bf16, compile_update) if graphed else None
    )
    for step in range(start + 1, steps + 1):
        # each rank its own dropout masks (seeded with the same seed, every rank drew rank 0's)
        if d.world > 1:
            torch.manual_seed(dropout_seed(seed, d.rank, step))
        idx = torch.randint(0, x_all.shape[0], (batch_size,), generator=gen, device=device)
        x, y = x_all[idx], y_all[idx]
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        if graph_step is not None:
            draws = training_draws(
                x, y, p_uncond=p_uncond, null_label=config.null_label, generator=gen,
                lambda_min=lambda_min, lambda_max=lambda_max,
            )  # fmt: skip
            graph_step(x, *draws)
            sched.step()
            n_running += 1
        else:
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
                    rows=rows,
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
            mean_loss = float(all_mean(running, d)) / n_running  # the only host sync, once per interval
            if not math.isfinite(mean_loss):
                raise FloatingPointError(f"training loss became {mean_loss} at step {step}; lower train.lr")
            now = time.perf_counter()
            if not first_interval:
                timed_images += n_running * batch_size
                timed_s += now - t_last
            rate = timed_images / timed_s if timed_s else n_running * batch_size / max(now - t_last, 1e-9)
            entry = {
                "step": step,
                "loss": mean_loss,
                # the rate this step trained with (the scheduler already holds the next one's)
                "lr": lr * warm_up(step - 1),
                "images_per_s": rate,
                "elapsed_s": now - t_start,
                "eta_s": (steps - step) * batch_size / rate,
            }
            history.append(entry)
            running.zero_()  # in place: a CUDA graph adds into this very tensor
            n_running, t_last, first_interval = 0, now, False
            if callback is not None and d.main:
                # "ema": the weights a checkpoint evaluation samples; its values are kept (and resumed) in history
                entry.update(callback({**entry, "ema": ema.model}) or {})
        if checkpoint_every and step % checkpoint_every == 0 and step < steps:
            # every rank's loss sum since the last log: the ranks' sums differ, and a checkpoint may fall between logs
            runnings = all_stack(running, d)
            if d.main:
                now = time.perf_counter()
                atomic_save(
                    {
                        "settings": settings,
                        "code": code,
                        "other_code": other_code,  # files changed by a resume with other code, if any
                        "step": step,
                        "model": model.state_dict(),
                        "ema": ema.state_dict(),
                        "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(),
                        "generator": gen.get_state(),
                        "cpu_rng": torch.get_rng_state(),
                        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                        "history": history,
                        "running": runnings.cpu(),  # the loss accumulator: checkpoints need not fall on log steps
                        "n_running": n_running,
                        "timed_images": timed_images,
                        "timed_s": timed_s,
                        "elapsed_s": now - t_start,
                        "since_log_s": now - t_last,
                    },
                    resume_path,
                )
        if graph_step is not None and (
            step % log_every == 0 or (checkpoint_every and step % checkpoint_every == 0)
        ):
            graph_step.check_addresses()  # after the callback / checkpoint code: nothing reallocated what it updates
    model.eval()
    return TrainResult(
        model=model,
        ema=ema.model,
        history=history,
        images_per_s=timed_images / timed_s if timed_s else history[-1]["images_per_s"],
        resumed_from=start,
        resumed_other_code=other_code,
    )
