"""Generate images for a whole grid of guidance strengths with one batch and one noise draw per example.

Example i of a cell is conditioned on class i mod K and starts from the same noise for every w and every
guidance method, so columns of the grid differ only by (method, w) (and the ancestral sampler's per-step noise
is shared across them as well).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from cfg.data.images import to_uint8
from cfg.engine.device import autocast, compile_as, configure_cuda, cudnn_benchmark
from cfg.engine.distributed import Claims, Dist, gather_rows
from cfg.maths.diffusion import LAMBDA_MAX, LAMBDA_MIN, sampling_lambdas
from cfg.maths.guidance import guidance_entries, guided_denoiser, needs_guide_network
from cfg.maths.noise import example_noise, stream_source
from cfg.maths.samplers import SAMPLERS
from cfg.nets.hashing import state_dict_hash
from cfg.nets.unet import UNet, load_checkpoint
from cfg.study.records import SampleSet


class NonFiniteSamples(RuntimeError):
    """Sampling gave NaN or inf: the network or the sampler diverged. uint8 storage would have turned those
    pixels into black or white ones, scored as if they were images."""


# called after every batch with {"images", "total_images", "elapsed_s", "eta_s"}
ProgressCallback = Callable[[dict], None]


def sampler_options(sample) -> dict:
    """The options params.yaml's `sample` section (`cfg.study.config.SampleParams`) gives its sampler: its
    registry options completed with their defaults, and clip_denoised (every sampler takes it)."""
    return {"clip_denoised": sample.clip_denoised} | SAMPLERS.resolve(
        sample.sampler, sample.sampler_options, "sample.sampler_options"
    )


def guidance_of(sample) -> list[tuple[str, dict]]:
    """The (method, resolved options) of params.yaml's `sample.guidance`, in its order."""
    return guidance_entries(sample.guidance, sample.sampler)


def sampling_kwargs(params) -> dict:
    """`generate_w_grid`'s keyword arguments from params.yaml (`cfg.study.config.Params`): sampler, options, steps,
    λ range, seed, batch and precision, as the sample stage uses them; the caller adds the model's classes and
    image shape and the device. The guidance is that of a lone `sample.guidance` entry (what a search trial
    scores); with several entries, or one that needs a guide network, CFG (the FID curve of training)."""
    s, t = params.sample, params.train
    entries = guidance_of(s)
    lone = len(entries) == 1 and not needs_guide_network(entries)
    guidance, options = entries[0] if lone else ("cfg", {})
    return {
        "sampler": s.sampler,
        "steps": s.steps,
        "sampler_options": sampler_options(s),
        "guidance": guidance,
        "guidance_options": options,
        "lambda_min": t.lambda_min,
        "lambda_max": t.lambda_max,
        "seed": s.seed,
        "batch_size": s.batch_size,
        "bf16": t.bf16,
        "compile": s.compile,
        "use_cudnn_benchmark": s.cudnn_benchmark,
    }


def examples_per_batch(batch_size: int, n_w: int) -> int:
    """Examples in one sampler batch of `batch_size` rows: each example is repeated once per w."""
    return max(1, batch_size // n_w)


@torch.no_grad()
def generate_w_grid(
    model: torch.nn.Module,  # ε_θ(z, λ, c) with a `config.null_label`
    w_values: Sequence[float],  # guidance strengths, the paper's w
    n_samples: int,  # images per w
    *,
    num_classes: int,
    image_shape: tuple[int, int, int],  # (C, H, W)
    sampler: str = "ancestral",
    steps: int = 64,  # sampling steps T
    sampler_options: dict | None = None,  # e.g. {"v": 0.3, "clip_denoised": 1.0}
    guidance: str = "cfg",  # cfg.maths.guidance.GUIDANCE entry
    guidance_options: dict | None = None,  # its options
    guide: torch.nn.Module
    | None = None,  # the guide network of autoguidance: ε(z, λ, c), weaker than `model`
    lambda_min: float = LAMBDA_MIN,
    lambda_max: float = LAMBDA_MAX,
    seed: int = 0,  # with the example index, seeds the initial noise and the sampler's noise (cfg.maths.noise)
    batch_size: int = 1024,  # network rows per batch (before the cond/uncond doubling), rounded down to a
    # multiple of len(w_values); speed only: the images do not depend on it
    device: torch.device | str = "cpu",
    bf16: bool = True,  # bf16 autocast of the network on CUDA
    compile: bool | str = False,  # torch.compile on CUDA (fuses a sampling step's many small ops): compile_as
    use_cudnn_benchmark: bool = False,  # cuDNN picks its convolution algorithms by its heuristics, the same on every
    # GPU of a model (the same bytes on any GPU and any number of processes), or times them per process
    first_index: int = 0,  # generate examples first_index … first_index + n_samples − 1 (seed ranges)
    examples: Tensor | Claims | None = None,  # or exactly these example indices (a shard of a cell), or the
    # blocks a Claims hands this rank as it goes (n_samples unused for both)
    progress: ProgressCallback | None = None,
) -> tuple[Tensor, Tensor]:
    """Sample every w for examples [first_index, first_index + n_samples) (or `examples`).

    Returns (images uint8 (W, N, C, H, W) on CPU, labels (N,)), in the order the examples came (a Claims'
    `rows()`). Example i is conditioned on class i mod K and draws its initial latent and step noise from its
    own streams (`cfg.maths.noise.example_noise`): its images depend only on (seed, i, w, sampler settings),
    never on the batch size, the other examples or how many processes share the cell.
    """
    device = torch.device(device)
    w_list = [float(w) for w in w_values]
    n_w = len(w_list)
    per_batch = examples_per_batch(batch_size, n_w)
    sample_fn = SAMPLERS[sampler]
    options = dict(sampler_options or {})
    lambdas = sampling_lambdas(steps, lambda_min=lambda_min, lambda_max=lambda_max, device=device)
    if isinstance(examples, Claims):
        blocks, expected = examples, examples.expected  # claimed as the loop goes
    else:
        ids_all = (
            first_index + torch.arange(n_samples) if examples is None else examples.to(torch.int64).cpu()
        )
        blocks, expected = [ids_all], ids_all.numel
    null_label = model.config.null_label
    w_col = torch.tensor(w_list, device=device)

    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    configure_cuda()
    model = model.to(memory_format=fmt)
    network = compile_as(model, compile) if device.type == "cuda" else model

    def net(z: Tensor, lam: Tensor, c: Tensor) -> Tensor:
        with autocast(device, bf16):
            return network(z.contiguous(memory_format=fmt), lam.float(), c).float()

    guide_net = None
    if guide is not None:
        guide_model = guide.to(device=device, memory_format=fmt)

        def guide_net(z: Tensor, lam: Tensor, c: Tensor) -> Tensor:
            with autocast(device, bf16):
                return guide_model(z.contiguous(memory_format=fmt), lam.float(), c).float()

    t0 = time.perf_counter()
    done = 0
    # the images as they come, in one buffer (a cell can be most of the host's memory): sized for what this rank
    # expects, exact for a fixed set of examples and for one process; a rank that claims more grows it
    out = torch.empty((n_w, expected(), *image_shape), dtype=torch.uint8)
    seen = []
    with cudnn_benchmark(use_cudnn_benchmark):
        for ids_cpu in (ids for block in blocks for ids in block.split(per_batch) if len(ids)):
            k = len(ids_cpu)
            ids = ids_cpu.to(device)  # (k,)
            # the W copies of an example (w-major rows) share its initial latent and its step noise
            z = example_noise(seed, ids, 0, image_shape).repeat(n_w, 1, 1, 1)  # (W·k, C, H, W)
            noise = stream_source(seed, ids, image_shape)
            labels = (ids % num_classes).repeat(n_w)  # class-balanced: example i is class i mod K
            w = w_col.repeat_interleave(k)  # (W·k,)
            denoise = guided_denoiser(
                net, labels, w, null_label, guidance, guidance_options, lambdas=lambdas, guide=guide_net
            )
            x = sample_fn(
                denoise, z, lambdas, noise=lambda t, src=noise: src(t).repeat(n_w, 1, 1, 1), **options
            )
            finite = torch.isfinite(x).view(n_w, k, -1).all(-1)  # (W, k): each image finite
            if not bool(finite.all()):
                bad = (~finite).sum(1).tolist()
                rows = ", ".join(f"w = {w:g}: {b} of {k}" for w, b in zip(w_list, bad, strict=True) if b)
                raise NonFiniteSamples(
                    f"sampling gave NaN or inf (guidance {guidance}, sampler {sampler}, T = {steps}) for examples "
                    f"{int(ids_cpu[0])}..{int(ids_cpu[-1])}, images per w: {rows}; the network or the sampler "
                    "diverged (its settings, bf16, clip_denoised), and no sample of it is written"
                )
            if done + k > out.shape[1]:
                grown = torch.empty((n_w, max(done + k, 2 * out.shape[1]), *image_shape), dtype=torch.uint8)
                grown[:, :done] = out[:, :done]
                out = grown
            out[:, done : done + k] = to_uint8(x).view(n_w, k, *image_shape).cpu()
            seen.append(ids_cpu)
            done += k
            if progress is not None:
                elapsed = time.perf_counter() - t0
                total = max(done, expected())
                progress(
                    {
                        "images": done * n_w,
                        "total_images": total * n_w,
                        "elapsed_s": elapsed,
                        "eta_s": elapsed / done * (total - done),
                    }
                )
    ids_done = torch.cat(seen) if seen else torch.zeros(0, dtype=torch.int64)
    return (out if done == out.shape[1] else out[:, :done].clone()), ids_done % num_classes


def sample_checkpoint(
    model: torch.nn.Module,  # the checkpoint's EMA U-Net
    meta: dict,  # the checkpoint's meta (p_uncond, classes, mlflow_run_id, params_hash)
    params,  # cfg.study.config.Params: the sample section and the λ range
    *,
    checkpoint: str,  # its path, recorded
    device: torch.device | str,
    progress: ProgressCallback | None = None,
    dist: Dist | None = None,  # several processes: each samples its shard of the examples, all get the cell
    guide: torch.nn.Module | None = None,  # autoguidance's guide network (the train_guide stage's model)
    guide_checkpoint: str | Path | None = None,  # its path, recorded
) -> SampleSet:
    """The sample stage: every (guidance method, w) of params.yaml's grid from one checkpoint, as a `SampleSet`
    (method-major rows; the same noise for every row; the same bytes for any number of processes)."""
    d = dist or Dist()
    cfg, s = model.config, params.sample
    weights_hash = state_dict_hash(model)  # before sampling: the weights as the checkpoint holds them
    entries = guidance_of(s)
    uses_guide = needs_guide_network(entries)
    if guide is None and uses_guide:
        raise ValueError(
            "sample.guidance has autoguidance but no guide network was given (train_guide stage)"
        )
    # whole batches, as one process runs them, each to the rank that asks first (Claims: the same bytes for any
    # split, and ranks whose GPUs also train a model take fewer)
    block = examples_per_batch(s.batch_size, len(s.w))
    kwargs = sampling_kwargs(params)
    t0 = time.perf_counter()
    done = [0]  # images of the methods before the current one, for the progress callback
    method = [0]  # the current method's place in `entries`

    def step(info: dict) -> None:
        if progress is not None:  # this method's share so far and estimated, the later ones' estimated alike
            total = done[0] + info["total_images"] * (len(entries) - method[0])
            images_done = done[0] + info["images"]
            elapsed = time.perf_counter() - t0
            progress(
                info
                | {
                    "images": images_done,
                    "total_images": total,
                    "elapsed_s": elapsed,
                    "eta_s": elapsed / images_done * (total - images_done),
                }
            )

    parts = []  # (images, labels, rows) of each method: gathered after the last, so that a rank done with its
    # blocks of one method goes on to claim the next method's while others finish theirs
    for m, (name, options) in enumerate(entries):
        method[0] = m
        kwargs |= {"guidance": name, "guidance_options": options}
        claims = Claims(s.n_samples, d, block)
        images, labels = generate_w_grid(
            model.to(device),
            s.w,
            s.n_samples,
            examples=claims,
            num_classes=cfg.num_classes,
            image_shape=(cfg.in_channels, cfg.image_size, cfg.image_size),
            device=device,
            progress=step,
            guide=guide if needs_guide_network([(name, options)]) else None,
            **kwargs,
        )
        done[0] += images.shape[0] * images.shape[1]
        parts.append((images, labels, claims.rows()))
    # (M·W, n, C, H, W), method-major
    images = torch.cat([gather_rows(i, d, s.n_samples, dim=1, rows=rows) for i, _, rows in parts])
    labels = gather_rows(parts[0][1], d, s.n_samples, rows=parts[0][2])
    return SampleSet(
        images=images,
        labels=labels,
        w=[float(w) for _ in entries for w in s.w],
        classes=list(meta["classes"]),
        p_uncond=meta["p_uncond"],
        guidance=[name for name, _ in entries for _ in s.w],
        guidance_options=[dict(options) for _, options in entries for _ in s.w],
        guidance_label=[label for label in s.guidance for _ in s.w],  # in guidance_of's order
        sampler=s.sampler,
        sampler_options=kwargs["sampler_options"],
        steps=s.steps,
        seed=s.seed,
        checkpoint=str(checkpoint),
        train_run_id=meta.get("mlflow_run_id"),
        checkpoint_params_hash=meta.get("params_hash", ""),
        guide_checkpoint=str(guide_checkpoint) if uses_guide and guide_checkpoint else None,
        device=str(device),
        seconds=time.perf_counter() - t0,
        weights_hash=weights_hash,
    )


def load_guide(
    path: str | Path | None,  # the train_guide stage's checkpoint.pt
    model: torch.nn.Module,  # the checkpoint's U-Net that the guide is to guide
    meta: dict,  # its meta
    *,
    map_location: torch.device | str = "cpu",
) -> UNet:
    """Autoguidance's guide network, refused (ValueError naming both values) unless it was trained on the model's
    data with its image size, channels, classes and λ range: its ε(z, λ, c) replaces ε(z) in Eq. 6, so it must
    read the same z, λ and labels. Checked before any sampling."""
    if path is None or not Path(path).is_file():
        what = "no guide network was given" if path is None else f"there is no guide network at {path}"
        raise FileNotFoundError(
            f"sample.guidance uses autoguidance, but {what}: the train_guide stage trains one only when an "
            "entry of sample.guidance needs it; rerun it (dvc repro train_guide)"
        )
    path = Path(path)
    guide, guide_meta = load_checkpoint(path, map_location=map_location)
    g, m = guide.config, model.config
    pairs = {
        "image_size": (g.image_size, m.image_size),
        "in_channels": (g.in_channels, m.in_channels),
        "num_classes": (g.num_classes, m.num_classes),
        "classes": (guide_meta.get("classes"), meta.get("classes")),
        "data_fingerprint": (guide_meta.get("data_fingerprint"), meta.get("data_fingerprint")),
    }
    for key in ("lambda_min", "lambda_max"):
        pairs[f"train.{key}"] = (guide_meta.get("train", {}).get(key), meta.get("train", {}).get(key))
    wrong = [f"{k} {a!r} (guide) vs {b!r} (model)" for k, (a, b) in pairs.items() if a != b]
    if wrong:
        raise ValueError(
            f"the guide network {path} does not fit the model it is to guide: {'; '.join(wrong)}; retrain the "
            "guide on the model's data and settings (dvc repro train_guide)"
        )
    return guide
