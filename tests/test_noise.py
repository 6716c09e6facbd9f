"""Per-example noise streams: standard normal, independent across examples, steps and elements, and the
images of a cell independent of the batch size and of how the examples are split."""

import math

import pytest
import torch
from scipy import stats

from cfg.engine.generate import generate_w_grid
from cfg.maths.noise import _lowbias32, _mul32, example_noise
from cfg.nets.unet import UNet, UNetConfig


def test_mul32_and_hash_match_uint32_arithmetic():
    # a second implementation: Python integers modulo 2**32
    xs = torch.tensor([0, 1, 2**31, 2**32 - 1, 123456789, 987654321], dtype=torch.int64)
    for c in (0x7FEB352D, 0x846CA68B):
        assert _mul32(xs, c).tolist() == [(int(x) * c) % 2**32 for x in xs]

    def ref(x):
        x ^= x >> 16
        x = (x * 0x7FEB352D) % 2**32
        x ^= x >> 15
        x = (x * 0x846CA68B) % 2**32
        return x ^ (x >> 16)

    assert _lowbias32(xs).tolist() == [ref(int(x)) for x in xs]
    assert _lowbias32(torch.tensor([0x12345678])).item() != 0x12345678


def test_streams_are_standard_normal_and_independent():
    n = example_noise(3, torch.arange(4000), 5, (25,), dtype=torch.float64)  # 100,000 values
    x = n.flatten()
    assert abs(x.mean().item()) < 4 / math.sqrt(len(x))  # 4 standard errors
    assert abs(x.var().item() - 1) < 4 * math.sqrt(2 / len(x))
    assert stats.kstest(x.numpy(), "norm").pvalue > 1e-3
    # across examples, elements and steps: correlations at the 1/sqrt(n) noise level
    m = example_noise(3, torch.arange(4000), 6, (25,), dtype=torch.float64)
    k = example_noise(4, torch.arange(4000), 5, (25,), dtype=torch.float64)
    bound = 4 / math.sqrt(4000)
    for a, b in ((n[:, 0], n[:, 1]), (n[:, 3], m[:, 3]), (n[:, 7], k[:, 7]), (n[:-1, 0], n[1:, 0])):
        assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < bound


def test_a_row_depends_only_on_seed_example_and_step():
    ids = torch.tensor([5, 9, 5, 123456])
    a = example_noise(1, ids, 2, (3, 4, 4))
    assert torch.equal(a[0], a[2]) and not torch.equal(a[0], a[1])
    assert torch.equal(example_noise(1, ids[1:2], 2, (3, 4, 4))[0], a[1])  # alone or in a batch
    assert not torch.equal(example_noise(1, ids, 3, (3, 4, 4)), a)
    assert not torch.equal(example_noise(2, ids, 2, (3, 4, 4)), a)
    assert not torch.equal(example_noise(1 + 2**32, ids, 2, (3, 4, 4)), a)  # seeds past 32 bits


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = UNet(
        UNetConfig(
            image_size=8, in_channels=1, num_classes=3, base_width=8, channel_mult=(1,), head_channels=8
        )
    )
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))  # the zero-initialised output layer would make ε ≡ 0
    return net.eval()


def _grid(model, **kw):
    args = dict(
        num_classes=3, image_shape=(1, 8, 8), steps=6, seed=11, sampler_options={"clip_denoised": 1.0}
    )
    return generate_w_grid(model, [-1.0, 0.0, 2.0], **(args | kw))


def test_images_do_not_depend_on_the_batch_size(model):
    """The reliability issue's criterion: batch sizes 8, 16 and 20 (rows; 2, 5 and 6 examples of 3 w) give
    the same bytes for the same seed."""
    ref, labels = _grid(model, n_samples=13, batch_size=8)
    for batch in (16, 20, 3 * 13):
        images, lab = _grid(model, n_samples=13, batch_size=batch)
        assert torch.equal(images, ref), batch
        assert torch.equal(lab, labels)


def test_shards_of_a_cell_concatenate_to_the_whole_cell(model):
    whole, labels = _grid(model, n_samples=10, batch_size=9)
    parts = [
        _grid(model, n_samples=0, examples=ids, batch_size=6)
        for ids in (torch.arange(0, 10, 2), torch.arange(1, 10, 2))
    ]
    merged = torch.empty_like(whole)
    merged[:, 0::2], merged[:, 1::2] = parts[0][0], parts[1][0]
    assert torch.equal(merged, whole)
    assert torch.equal(parts[1][1], labels[1::2])
    # disjoint ranges draw independent samples: the second half of a cell is its own seed range
    second, _ = _grid(model, n_samples=5, first_index=5, batch_size=6)
    assert torch.equal(second, whole[:, 5:])


def test_no_stream_is_a_shuffle_of_another():
    """Among 100,000 streams of 64 elements no two hold the same values in another order (nor the same values):
    a 32-bit state per stream, with each element drawn from it xor its index, made a stream's values reappear
    permuted (element e at e xor k) in every stream whose state differed by 2k: ~74 such rows expected here, 81 seen."""
    rows = example_noise(1, torch.arange(100_000), 0, (1, 8, 8), dtype=torch.float64).flatten(1)
    values = rows.sort(dim=1).values
    assert torch.unique(values, dim=0).shape[0] == rows.shape[0]


def test_non_finite_samples_stop_sampling_naming_the_w_instead_of_becoming_black_pixels(model):
    # uint8 storage turned NaN into 0 and inf into 255: a diverged network's samples were scored as images
    import copy

    from cfg.engine.generate import NonFiniteSamples

    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.class_embed.weight[1] = (
            math.nan
        )  # class 1 diverges; the null label (w = -1's only pass) does not
    with pytest.raises(
        NonFiniteSamples, match=r"w = 0: 2 of 6, w = 2: 2 of 6; the network or the sampler"
    ) as e:
        _grid(broken, n_samples=6, batch_size=18)  # examples 0..5, two of class 1 (i mod 3)
    assert "w = -1" not in str(e.value) and "examples 0..5" in str(e.value)
    # unconditional sampling (w = -1 alone: the null label only) of the same network is finite, and kept
    args = dict(
        num_classes=3, image_shape=(1, 8, 8), steps=6, seed=11, sampler_options={"clip_denoised": 1.0}
    )
    images, _ = generate_w_grid(broken, [-1.0], 6, **args)
    assert torch.equal(images, generate_w_grid(model, [-1.0], 6, **args)[0])


def test_a_diverged_point_of_the_training_curve_is_nan_and_the_training_goes_on(tmp_path):
    # the train stage scores its EMA weights every train.eval_every steps: a diverged sample there is a NaN point
    # with a warning, not an error that would end hours of training
    import warnings

    import yaml

    from cfg.engine.scoring import training_curve
    from cfg.eval.features import classifier_extractor, extract_features
    from cfg.eval.stats import reference_stats, save_reference_stats
    from cfg.nets.classifier import Classifier, ClassifierConfig, save_classifier
    from cfg.study.config import params_from_dict

    from .conftest import ROOT

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["train"] |= {"eval_samples": 6, "eval_w": 1.0}
    raw["sample"] |= {"steps": 4}
    params = params_from_dict(raw)
    torch.manual_seed(0)
    classifier = Classifier(
        ClassifierConfig(in_channels=1, num_classes=3, image_size=8, width=4, feature_dim=8)
    )
    save_classifier(tmp_path / "c.pt", classifier.eval(), {})
    ext = classifier_extractor(classifier.eval())
    real = (torch.rand(30, 1, 8, 8) * 255).to(torch.uint8)
    save_reference_stats(tmp_path / "r.pt", reference_stats(extract_features(ext, real), ext))
    net = UNet(
        UNetConfig(
            image_size=8, in_channels=1, num_classes=3, base_width=8, channel_mult=(1,), head_channels=8
        )
    )
    columns, curve = training_curve(params, str(tmp_path / "c.pt"), str(tmp_path / "r.pt"), "cpu")
    assert columns == ["fid_w0", "is_w0", "fid_w1", "is_w1"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        point = curve(net.eval())
    assert all(math.isfinite(v) for v in point.values())
    with torch.no_grad():
        net.class_embed.weight[1] = math.nan
    with pytest.warns(
        RuntimeWarning, match=r"training curve: sampling gave NaN or inf .*; its FID and IS are NaN"
    ):
        point = curve(net)
    assert list(point) == columns and all(math.isnan(v) for v in point.values())
