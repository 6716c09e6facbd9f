"""The evaluation classifier: a small CNN whose penultimate activations are the default FID / KID features.

Images are (B, C, H, W) in [-1, 1] at the data set's native resolution (no resizing). Conv-BN-ReLU blocks
with two 2x max-pools, global average pooling, a ReLU bottleneck of `feature_dim` units (the features) and a
linear layer to class logits (Inception-v3's pool3 -> logits, in miniature). The same network scores
class accuracy: how often a guided sample is recognised as the class it was conditioned on.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cfg.io import atomic_save, load


@dataclass
class ClassifierConfig:
    in_channels: int  # image channels (1 or 3)
    num_classes: int  # number of classes
    image_size: int  # input height = width, pixels
    width: int = 32  # channels of the first block; x2 and x4 in the next stages
    feature_dim: int = 128  # penultimate (feature) dimension
    dropout: float = 0.1  # dropout on the features before the linear head, training only

    def __post_init__(self) -> None:
        if self.image_size < 4:
            raise ValueError(f"image_size must be >= 4 (two 2x poolings), got {self.image_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        return asdict(self)


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class Classifier(nn.Module):
    """CNN classifier: `features` gives the (B, feature_dim) penultimate activations, `forward` the logits."""

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        w = config.width
        self.body = nn.Sequential(
            _conv_block(config.in_channels, w),
            nn.MaxPool2d(2),  # (B, w, H/2, W/2)
            _conv_block(w, 2 * w),
            nn.MaxPool2d(2),  # (B, 2w, H/4, W/4)
            _conv_block(2 * w, 4 * w),
            nn.AdaptiveAvgPool2d(4),  # (B, 4w, 4, 4): keeps the coarse layout that tells digits apart
            nn.Flatten(),  # (B, 64w)
            nn.Linear(64 * w, config.feature_dim),
            nn.ReLU(),
        )
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations (B, feature_dim) of images (B, C, H, W) in [-1, 1]."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits (B, num_classes)."""
        return self.head(self.dropout(self.features(x)))


def _check_data(x: Tensor, y: Tensor | None, config: ClassifierConfig) -> None:
    expected = (config.in_channels, config.image_size, config.image_size)
    if x.dim() != 4 or tuple(x.shape[1:]) != expected or not x.is_floating_point():
        raise ValueError(
            f"images must be floats in [-1, 1] of shape (N, {', '.join(map(str, expected))}), "
            f"got {x.dtype} {tuple(x.shape)}"
        )
    if y is None:
        return
    if y.shape != (x.shape[0],) or y.dtype != torch.int64:
        raise ValueError(f"labels must be int64 of shape ({x.shape[0]},), got {y.dtype} {tuple(y.shape)}")
    if len(y) and (y.min() < 0 or y.max() >= config.num_classes):
        raise ValueError(
            f"labels must lie in [0, {config.num_classes}), got range [{int(y.min())}, {int(y.max())}]"
        )


def random_shift(x: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Translate each image by its own integer offset in [-max_shift, max_shift]², replicating the border."""
    return shift(x, shift_draws(len(x), max_shift, generator), max_shift)


def shift_draws(b: int, max_shift: int, generator: torch.Generator) -> Tensor:
    """The (2, B, 1) offsets + max_shift of `random_shift` for B images, drawn from `generator`."""
    return torch.randint(0, 2 * max_shift + 1, (2, b, 1), generator=generator)


def shift(x: Tensor, draws: Tensor, max_shift: int) -> Tensor:
    """`random_shift` with its `shift_draws` given."""
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")  # (B, C, H + 2s, W + 2s)
    dy, dx = draws.to(x.device)
    rows = dy + torch.arange(h, device=x.device)  # (B, H)
    cols = dx + torch.arange(w, device=x.device)  # (B, W)
    batch = torch.arange(b, device=x.device)[:, None, None]
    # advanced indices split by the channel slice move to the front: (B, H, W, C)
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def train_classifier(
    train_x: Tensor,  # (N, C, H, W) float in [-1, 1]
    train_y: Tensor,  # (N,) int64 labels
    config: ClassifierConfig,
    *,
    epochs: int = 10,  # passes over the training set
    batch_size: int = 128,  # images per step
    lr: float = 1e-3,  # AdamW peak learning rate, cosine-decayed to 0 over training
    seed: int = 0,  # seeds initialisation, batch order, augmentation and dropout
    device: torch.device | str = "cpu",
    augment: bool = True,  # random shifts of up to max(1, round(image_size / 16)) pixels
    progress: Callable[[dict], None] | None = None,  # called with each epoch's history entry
) -> tuple[Classifier, list[dict]]:
    """Train the evaluation classifier with cross-entropy; returns the model (eval mode) and per-epoch history.

    History entries are {"epoch", "loss", "train_acc"}: mean loss and accuracy over the epoch's (augmented)
    training batches. The global RNG state is left as it was.
    """
    _check_data(train_x, train_y, config)
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    device = torch.device(device)
    max_shift = max(1, round(config.image_size / 16))
    n = len(train_x)
    steps = epochs * math.ceil(n / batch_size)
    history = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)  # initialisation and dropout
        generator = torch.Generator().manual_seed(seed)  # batch order and shifts, on CPU for every device
        model = Classifier(config).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        # the images on the device once, each epoch's batch order and shifts copied there in one go (drawn in the
        # order a batch at a time would draw them), its sums kept there: on a GPU a step of this small network
        # takes less time than a host-side gather, a copy from the host or a sync to read the loss, each of
        # which would make the host wait for the GPU at every step
        x_all, y_all = train_x.to(device, torch.float32), train_y.to(device)
        for epoch in range(1, epochs + 1):
            model.train()
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            correct = torch.zeros((), dtype=torch.int64, device=device)
            order = torch.randperm(n, generator=generator)
            sizes = [len(idx) for idx in order.split(batch_size)]
            shifts = [shift_draws(b, max_shift, generator) for b in sizes] if augment else []
            order_d = order.to(device)
            shifts_d = torch.cat(shifts, dim=1).to(device).split(sizes, dim=1) if augment else []
            for i, idx in enumerate(order_d.split(batch_size)):
                x, y = x_all[idx], y_all[idx]
                if augment:
                    x = shift(x, shifts_d[i], max_shift)
                logits = model(x)
                loss = F.cross_entropy(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                loss_sum += loss.detach().double() * len(idx)  # as Python floats summed: float64
                correct += (logits.argmax(1) == y).sum()
            entry = {"epoch": epoch, "loss": float(loss_sum) / n, "train_acc": int(correct) / n}
            history.append(entry)
            if progress is not None:
                progress(entry)
    return model.eval(), history


@torch.no_grad()
def accuracy(
    model: Classifier,
    x: Tensor,  # (N, C, H, W) float in [-1, 1]
    y: Tensor,  # (N,) int64 labels
    *,
    batch_size: int = 512,  # images per forward pass
    device: torch.device | str = "cpu",
) -> float:
    """Fraction of images whose argmax logit is the label (model in eval mode)."""
    _check_data(x, y, model.config)
    model.eval().to(device)
    correct = sum(
        int((model(xb.to(device, torch.float32)).argmax(1).cpu() == yb).sum())
        for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True)
    )
    return correct / len(x)


def save_classifier(path: str | Path, model: Classifier, meta: dict) -> None:
    """Save weights, configuration and `meta` (JSON values: training params, accuracy, data set)."""
    try:  # weights_only loading accepts plain containers and numbers only, so refuse e.g. numpy scalars now
        meta = json.loads(json.dumps(meta))
    except TypeError as e:
        raise TypeError(f"meta must hold JSON values (str, int, float, bool, None, lists, dicts): {e}") from e
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_save({"config": model.config.to_dict(), "state_dict": state, "meta": meta}, Path(path))


def load_classifier(path: str | Path, map_location: torch.device | str = "cpu") -> tuple[Classifier, dict]:
    """Load a `save_classifier` file (weights_only unpickling) -> (model in eval mode, meta)."""
    ckpt = load(path, what="classifier checkpoint", rerun="dvc repro classifier", map_location=map_location)
    model = Classifier(ClassifierConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.to(map_location).eval(), ckpt["meta"]
