"""Tests of cfg.nets.classifier on real data: sklearn's 8x8 digits resized to 16x16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from cfg.nets.classifier import (
    Classifier,
    ClassifierConfig,
    accuracy,
    load_classifier,
    random_shift,
    save_classifier,
    train_classifier,
)


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train_x, train_y, test_x, test_y): 1437 / 360 images (N, 1, 16, 16) in [-1, 1], stratified split."""
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8 - 1  # 0..16 -> [-1, 1], (N, 1, 8, 8)
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)  # (N, 1, 16, 16)
    y = torch.tensor(d.target, dtype=torch.int64)
    i_train, i_test = train_test_split(
        torch.arange(len(y)).numpy(), test_size=0.2, stratify=d.target, random_state=0
    )
    return x[i_train], y[i_train], x[i_test], y[i_test]


@pytest.fixture(scope="module")
def trained(digits) -> tuple[Classifier, list[dict], list[dict]]:
    train_x, train_y, _, _ = digits
    seen: list[dict] = []
    model, history = train_classifier(
        train_x,
        train_y,
        ClassifierConfig(in_channels=1, num_classes=10, image_size=16),
        epochs=6,
        progress=seen.append,
    )
    return model, history, seen


def test_classifier_reaches_high_test_accuracy(digits, trained):
    _, _, test_x, test_y = digits
    model, history, seen = trained
    assert accuracy(model, test_x, test_y, batch_size=100) >= 0.95
    assert [h["epoch"] for h in history] == list(range(1, 7))
    assert set(history[0]) == {"epoch", "loss", "train_acc"}
    assert history[-1]["loss"] < history[0]["loss"]
    assert seen == history


def test_features_and_logits_shapes(digits, trained):
    _, _, test_x, _ = digits
    model, _, _ = trained
    with torch.no_grad():
        feats = model.features(test_x[:7])
        logits = model(test_x[:7])
    assert feats.shape == (7, model.config.feature_dim)
    assert logits.shape == (7, 10)
    torch.testing.assert_close(model.head(feats), logits)  # eval mode: dropout is off


def test_save_load_roundtrip_gives_identical_logits(tmp_path, digits, trained):
    _, _, test_x, _ = digits
    model, _, _ = trained
    meta = {"dataset": "digits16", "test_acc": 0.97, "epochs": 6}
    save_classifier(tmp_path / "clf.pt", model, meta)
    loaded, loaded_meta = load_classifier(tmp_path / "clf.pt")
    assert loaded_meta == meta
    assert loaded.config == model.config
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(test_x[:32]), model(test_x[:32]))
    with pytest.raises(TypeError, match="JSON"):
        save_classifier(tmp_path / "bad.pt", model, {"test_acc": torch.tensor(0.9)})


def test_training_is_seeded_and_leaves_global_rng_alone(digits):
    train_x, train_y, _, _ = digits
    config = ClassifierConfig(in_channels=1, num_classes=10, image_size=16, width=8, feature_dim=16)
    state = torch.get_rng_state()
    a, _ = train_classifier(train_x[:256], train_y[:256], config, epochs=1, seed=3)
    b, _ = train_classifier(train_x[:256], train_y[:256], config, epochs=1, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(ta, tb), name


def test_random_shift_translates_by_at_most_max_shift():
    x = torch.full((64, 1, 9, 9), -1.0)
    x[:, :, 4, 4] = 1.0
    out = random_shift(x, 2, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    rows, cols = (out[:, 0] == 1.0).nonzero()[:, 1:].T
    assert len(rows) == 64  # exactly one bright pixel per image, moved
    assert (rows - 4).abs().max() <= 2 and (cols - 4).abs().max() <= 2
    assert len({(int(r), int(c)) for r, c in zip(rows, cols, strict=True)}) > 10  # offsets vary per image


def test_bad_inputs_are_rejected_before_training(digits):
    train_x, train_y, _, _ = digits
    config = ClassifierConfig(in_channels=1, num_classes=10, image_size=16)
    with pytest.raises(ValueError, match=r"shape \(N, 1, 16, 16\)"):
        train_classifier(train_x[:, :, :8, :8], train_y, config)
    with pytest.raises(ValueError, match="floats"):
        train_classifier(train_x.to(torch.uint8), train_y, config)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        train_classifier(train_x, train_y, ClassifierConfig(in_channels=1, num_classes=5, image_size=16))
    with pytest.raises(ValueError, match="int64"):
        train_classifier(train_x, train_y.int(), config)
    with pytest.raises(ValueError, match="dropout"):
        ClassifierConfig(in_channels=1, num_classes=10, image_size=16, dropout=1.0)


def test_training_equals_the_plain_loop_of_one_batch_at_a_time(digits):
    """train_classifier draws an epoch's batch order and shifts up front and keeps its sums on the device (no
    host sync per step on a GPU); on CPU it must take exactly the steps of the plain loop, which gathers, shifts
    and reads the loss one batch at a time from the same generator."""
    train_x, train_y = digits[0][:400], digits[1][:400]
    config = ClassifierConfig(in_channels=1, num_classes=10, image_size=16, width=8, feature_dim=16)
    model, history = train_classifier(train_x, train_y, config, epochs=2, batch_size=64, lr=2e-3, seed=3)

    with torch.random.fork_rng():
        torch.manual_seed(3)
        generator = torch.Generator().manual_seed(3)
        plain = Classifier(config)
        opt = torch.optim.AdamW(plain.parameters(), lr=2e-3, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=2 * 7)
        plain_history = []
        for epoch in (1, 2):
            plain.train()
            loss_sum, correct = 0.0, 0
            for idx in torch.randperm(400, generator=generator).split(64):
                x = random_shift(train_x[idx], 1, generator)
                logits = plain(x)
                loss = F.cross_entropy(logits, train_y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                loss_sum += loss.item() * len(idx)
                correct += int((logits.argmax(1) == train_y[idx]).sum())
            plain_history.append({"epoch": epoch, "loss": loss_sum / 400, "train_acc": correct / 400})
    assert history == plain_history
    for (name, a), b in zip(model.state_dict().items(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
