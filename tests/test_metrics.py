"""Tests of cfg.eval.metrics and cfg.nets.inception against closed forms, invariants and independent numpy code."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg
import torch

from cfg.eval.features import Features, classifier_extractor, extract_features, inception_extractor
from cfg.eval.fingerprint import Fingerprint, FingerprintMismatch, check_comparable
from cfg.eval.metrics import class_accuracy, fid, inception_score, kid, per_class_fid, precision_recall
from cfg.eval.stats import ReferenceStats, load_reference_stats, reference_stats, save_reference_stats
from cfg.nets.classifier import Classifier, ClassifierConfig
from cfg.nets.inception import load_inception


def gaussian(n: int, d: int, seed: int, shift: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) * scale + shift


def ref_of(x: torch.Tensor, labels: torch.Tensor | None = None) -> ReferenceStats:
    return reference_stats(Features(x), labels=labels)


# ---------------------------------------------------------------------------------------------------------
# FID


def numpy_fid(x: np.ndarray, y: np.ndarray) -> float:
    """The TF / pytorch-fid formula: scipy.linalg.sqrtm of the covariance product."""
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fid_matches_scipy_reference_with_unequal_sizes():
    x = gaussian(300, 12, seed=0)
    y = gaussian(170, 12, seed=1, shift=0.3) @ gaussian(12, 12, seed=2) / 3  # correlated, other size
    expected = numpy_fid(y.numpy(), x.numpy())
    assert fid(Features(y), ref_of(x)) == pytest.approx(expected, rel=1e-6)


def test_fid_of_a_set_with_itself_is_zero():
    x = gaussian(200, 16, seed=3)
    assert abs(fid(Features(x), ref_of(x))) < 1e-8


def test_fid_of_two_gaussians_matches_closed_form():
    # features whose sample mean and covariance are exactly mu and diag(s²): whiten, then scale and shift
    def exact(n, mu, s, seed):
        z = gaussian(n, len(mu), seed)
        z = z - z.mean(0)
        z = z @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(z.T))).T  # sample covariance = I
        return z * s + mu

    mu1, s1 = torch.tensor([0.0, 1.0, -2.0, 0.5]).double(), torch.tensor([1.0, 0.5, 2.0, 1.5]).double()
    mu2, s2 = torch.tensor([1.0, 1.0, 0.0, -0.5]).double(), torch.tensor([2.0, 0.5, 1.0, 0.1]).double()
    closed = float(((mu1 - mu2) ** 2).sum() + ((s1 - s2) ** 2).sum())
    value = fid(Features(exact(50, mu1, s1, seed=4)), ref_of(exact(80, mu2, s2, seed=5)))
    assert value == pytest.approx(closed, rel=1e-9)


def test_fid_of_one_dimensional_features_is_the_closed_form():
    # D = 1 (a custom extractor's scalar feature): (μ₁ − μ₂)² + (s₁ − s₂)², with the unbiased variances
    x, y = torch.tensor([[0.0], [1.0], [2.0]]), torch.tensor([[0.0], [2.0], [4.0], [7.0]])
    s1, s2 = x.double().var().sqrt().item(), y.double().var().sqrt().item()
    closed = (x.mean().item() - y.mean().item()) ** 2 + (s1 - s2) ** 2
    assert fid(Features(x), ref_of(y)) == pytest.approx(closed, rel=1e-9)


def test_per_class_fid_is_fid_of_each_class():
    x, y = gaussian(120, 6, seed=6), gaussian(90, 6, seed=7, shift=0.5)
    x_labels, y_labels = torch.arange(120) % 3, torch.arange(90) % 3
    ref = ref_of(x, labels=x_labels)
    out = per_class_fid(Features(y), y_labels, ref)
    assert sorted(out) == [0, 1, 2]
    for c in range(3):
        assert out[c] == pytest.approx(fid(Features(y[y_labels == c]), ref_of(x[x_labels == c])), rel=1e-9)
    with pytest.raises(ValueError, match="reference labels"):
        per_class_fid(Features(y), y_labels, ref_of(x))


def test_features_from_another_extractor_are_refused():
    x = gaussian(20, 4, seed=8)
    ref = reference_stats(Features(x, weights_hash="aaaa", extractor_name="classifier"))
    with pytest.raises(FingerprintMismatch, match="weights"):
        fid(Features(x, weights_hash="bbbb", extractor_name="classifier"), ref)
    with pytest.raises(ValueError, match="dimension"):
        fid(Features(x[:, :3]), ref)


def test_features_of_images_of_another_size_than_the_reference_are_refused():
    # Inception resizes every image to 299, so 16-pixel samples against a 32-pixel reference gave a number
    x = gaussian(20, 4, seed=8)
    ref = reference_stats(Features(x, extractor_name="inception", resolution=32))
    assert fid(Features(x, extractor_name="inception", resolution=32), ref) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(FingerprintMismatch, match="16 pixels a side, the reference's 32") as err:
        fid(Features(x, extractor_name="inception", resolution=16), ref)
    assert err.value.fields == ["resolution"]
    # a reference written before the side was kept (0) is not judged
    assert fid(Features(x, resolution=16), reference_stats(Features(x))) == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Inception Score


def test_inception_score_of_uniform_predictions_is_one():
    mean, std = inception_score(Features(torch.zeros(3, 5), logits=torch.zeros(60, 10)))
    assert mean == pytest.approx(1.0, abs=1e-12) and std == 0.0


def test_inception_score_of_confident_evenly_spread_predictions_is_k():
    k = 10
    logits = 200.0 * torch.nn.functional.one_hot(torch.arange(100) % k, k).float()
    mean, _ = inception_score(Features(torch.zeros(100, 1), logits=logits))
    assert mean == pytest.approx(k, rel=1e-9)
    mean, std = inception_score(Features(torch.zeros(100, 1), logits=logits), splits=4, seed=1)
    assert 1.0 < mean <= k and std >= 0.0
    assert inception_score(Features(torch.zeros(100, 1), logits=logits), splits=4, seed=1) == (mean, std)


# ---------------------------------------------------------------------------------------------------------
# KID


def numpy_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² with the polynomial kernel (x·y / D + 1)³ (Bińkowski et al. 2018, Eq. 4)."""
    d = x.shape[1]
    kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    m, n = len(x), len(y)
    return float(
        (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
        + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
        - 2 * kxy.sum() / (m * n)
    )


def test_kid_on_full_sets_matches_numpy_unbiased_mmd():
    x, y = gaussian(150, 10, seed=9), gaussian(150, 10, seed=10, shift=0.4, scale=1.3)
    mean, std = kid(Features(y), ref_of(x), subsets=1, subset_size=150)
    assert mean == pytest.approx(numpy_mmd2(y.numpy(), x.numpy()), rel=1e-9)
    assert std == 0.0


def test_kid_is_near_zero_for_one_distribution_and_handles_unequal_sizes():
    x, y = gaussian(400, 8, seed=11), gaussian(250, 8, seed=12)
    same, same_std = kid(Features(y), ref_of(x), subsets=20, subset_size=1000)  # clipped to 250
    shifted, _ = kid(Features(y + 0.5), ref_of(x), subsets=20, subset_size=1000)
    assert abs(same) < 0.01 and same_std < 0.01
    assert shifted > 10 * max(abs(same), same_std)
    assert kid(Features(y), ref_of(x), subsets=5, subset_size=100, seed=1) == kid(
        Features(y), ref_of(x), subsets=5, subset_size=100, seed=1
    )


# ---------------------------------------------------------------------------------------------------------
# Precision / recall


def numpy_precision_recall(gen: np.ndarray, real: np.ndarray, k: int) -> tuple[float, float]:
    """Brute force k-NN manifolds: radius = distance to the k-th neighbour other than the point itself."""

    def dist(a, b):
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))

    r_real = np.sort(dist(real, real), axis=1)[:, k]
    r_gen = np.sort(dist(gen, gen), axis=1)[:, k]
    precision = (dist(gen, real) <= r_real[None, :]).any(1).mean()
    recall = (dist(real, gen) <= r_gen[None, :]).any(1).mean()
    return float(precision), float(recall)


def test_precision_recall_of_identical_and_of_disjoint_sets():
    x = gaussian(60, 5, seed=13)
    assert precision_recall(Features(x), ref_of(x), k=3) == (1.0, 1.0)
    assert precision_recall(Features(x + 100.0), ref_of(x), k=3) == (0.0, 0.0)


def test_precision_recall_hand_computed_1d():
    # real 0,1,2,3 (k=1 radii all 1); generated 0.5, 0.875 (radii 0.375), 10, 10.5 (radii 0.5).
    # precision: 0.5 and 0.875 lie within 1 of a real point, 10 and 10.5 do not -> 2/4.
    # recall: only real 1 lies within 0.375 of 0.875 -> 1/4.
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    gen = torch.tensor([[0.5], [0.875], [10.0], [10.5]])
    assert precision_recall(Features(gen), ref_of(real), k=1) == (0.5, 0.25)


def test_precision_recall_matches_brute_force_numpy():
    x, y = gaussian(80, 2, seed=14), gaussian(55, 2, seed=15, shift=0.7, scale=0.6)
    expected = numpy_precision_recall(y.numpy(), x.numpy(), k=3)
    assert precision_recall(Features(y), ref_of(x), k=3, batch_size=16) == pytest.approx(expected, abs=1e-12)
    assert 0.0 < expected[0] < 1.0 and 0.0 < expected[1] < 1.0  # the case is not degenerate
    with pytest.raises(ValueError, match="k must lie"):
        precision_recall(Features(y), ref_of(x), k=55)


def test_precision_recall_equals_torch_fidelity_on_a_realistic_size():
    # the routine it replaces (torch-fidelity's, which computes on the host): the very same counts on features
    # of the evaluation classifier's width, with several distance blocks and ties at the radius impossible
    from torch_fidelity.metric_prc import prc_features_to_metric

    x, y = gaussian(700, 128, seed=16), gaussian(600, 128, seed=17, shift=0.3)
    theirs = prc_features_to_metric(
        y.double(), x.double(), prc_neighborhood=3, prc_batch_size=250, save_cpu_ram=True, verbose=False
    )
    ours = precision_recall(Features(y), ref_of(x), k=3, batch_size=250)
    assert 0.05 < ours[0] < 0.95 and 0.05 < ours[1] < 0.95  # not degenerate
    assert ours == (round(theirs["precision"] * 600) / 600, round(theirs["recall"] * 700) / 700)


# ---------------------------------------------------------------------------------------------------------
# Class accuracy


def test_class_accuracy_hand_case():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 1.0], [5.0, 0.0, 0.0]])
    assert class_accuracy(logits, torch.tensor([0, 1, 1, 2])) == 0.5
    with pytest.raises(ValueError, match="labels"):
        class_accuracy(logits, torch.tensor([0, 1]))


# ---------------------------------------------------------------------------------------------------------
# Feature extraction, reference statistics, fingerprints


@pytest.fixture(scope="module")
def small_classifier() -> Classifier:
    torch.manual_seed(0)
    return Classifier(ClassifierConfig(in_channels=1, num_classes=4, image_size=8, width=4, feature_dim=6))


def test_classifier_extractor_features(small_classifier):
    ext = classifier_extractor(small_classifier)
    u8 = torch.randint(0, 256, (10, 1, 8, 8), dtype=torch.uint8)
    images = u8.float() / 127.5 - 1
    a = extract_features(ext, images, batch_size=3)
    b = extract_features(ext, u8, batch_size=10)
    assert a.features.shape == (10, 6) and a.logits.shape == (10, 4)
    torch.testing.assert_close(a.features, b.features)  # uint8 input and batch size change nothing
    torch.testing.assert_close(a.logits, b.logits)
    assert (a.extractor_name, a.weights_hash, a.resize, a.resolution) == (
        "classifier",
        ext.weights_hash,
        "none (native 8x8)",
        8,
    )
    assert len(ext.weights_hash) == 16
    with pytest.raises(ValueError, match="without resizing"):
        extract_features(ext, torch.zeros(2, 1, 16, 16))


def test_reference_stats_save_load_roundtrip(tmp_path, small_classifier):
    ext = classifier_extractor(small_classifier)
    feats = extract_features(ext, torch.rand(20, 1, 8, 8) * 2 - 1)
    stats = reference_stats(feats, ext, labels=torch.arange(20) % 4)
    assert stats.n == 20 and stats.mu.dtype == torch.float64 and stats.sigma.shape == (6, 6)
    save_reference_stats(tmp_path / "ref.pt", stats)
    loaded = load_reference_stats(tmp_path / "ref.pt")
    for name in ("mu", "sigma", "features", "labels"):
        assert torch.equal(getattr(loaded, name), getattr(stats, name)), name
    assert (loaded.hash, loaded.extractor_name, loaded.weights_hash, loaded.resize, loaded.resolution) == (
        stats.hash,
        "classifier",
        ext.weights_hash,
        "none (native 8x8)",
        8,
    )
    tampered = torch.load(tmp_path / "ref.pt", weights_only=True)
    tampered["mu"][0] += 1
    torch.save(tampered, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="hash"):
        load_reference_stats(tmp_path / "bad.pt")


def make_fingerprint(**changes) -> Fingerprint:
    fields = dict(
        extractor="classifier",
        weights_hash="ab" * 8,
        reference_hash="cd" * 8,
        n_samples=1000,
        resolution=16,
        resize="none (native 16x16)",
    )
    return Fingerprint(**{**fields, **changes})


def test_fingerprints():
    fp = make_fingerprint()
    assert Fingerprint.from_dict(fp.to_dict()) == fp
    assert fp.key() == make_fingerprint().key() and len(fp.key()) == 12
    check_comparable([fp, fp.to_dict(), json.dumps(fp.to_dict()), make_fingerprint()])
    check_comparable([fp, fp.key()])
    with pytest.raises(FingerprintMismatch, match="n_samples") as err:
        check_comparable([fp, make_fingerprint(n_samples=5000)])
    assert err.value.fields == ["n_samples"]
    with pytest.raises(FingerprintMismatch, match="extractor differs") as err:
        check_comparable([fp.to_dict(), make_fingerprint(extractor="inception-v3-tf-2015-12-05", resize="x")])
    assert err.value.fields == ["extractor", "resize"]
    with pytest.raises(FingerprintMismatch, match="key"):
        check_comparable([fp, make_fingerprint(resolution=32).key()])
    with pytest.raises(ValueError, match="lacks"):
        Fingerprint.from_dict({"extractor": "classifier"})


# ---------------------------------------------------------------------------------------------------------
# Inception-v3 (torch-fidelity), with random weights written in its key layout


@pytest.fixture
def random_inception_weights(tmp_path, monkeypatch):
    """A state_dict of torch-fidelity's FeatureExtractorInceptionV3 with its default random initialisation."""
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    # the constructor loads weights itself (downloading when given no path): skip both to get the bare net
    with monkeypatch.context() as m:
        m.setattr(tf_inception, "load_state_dict_from_url", lambda *args, **kwargs: {})
        m.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
        torch.manual_seed(0)
        net = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    path = tmp_path / "random-inception.pth"
    torch.save(net.state_dict(), path)
    return path


def test_inception_extractor_on_local_weights(random_inception_weights):
    with pytest.warns(UserWarning, match="not comparable"):
        ext = inception_extractor(random_inception_weights)
    assert (ext.feature_dim, ext.num_logits, ext.input_size) == (2048, 1008, 299)
    images = torch.rand(2, 1, 16, 16) * 2 - 1  # grayscale in [-1, 1]
    seen = []
    ext.net.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    feats = extract_features(ext, images, batch_size=2)
    assert feats.features.shape == (2, 2048) and feats.logits.shape == (2, 1008)
    assert torch.isfinite(feats.features).all() and torch.isfinite(feats.logits).all()
    assert feats.resize == "bilinear to 299x299 (torch-fidelity, TF-compatible)" and feats.resolution == 16
    # the adapter: [-1, 1] -> uint8 by rounding, one channel repeated to RGB (checked on the network's input)
    assert torch.equal(seen[0], ((images + 1) * 127.5).round().to(torch.uint8).repeat(1, 3, 1, 1))


class NotATensor:
    pass


def test_load_inception_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth") as err:
        load_inception(tmp_path / "missing.pth")
    assert "missing.pth" in str(err.value)
    torch.save({"x": NotATensor()}, tmp_path / "pickle.pth")
    with pytest.raises(ValueError, match="not a plain PyTorch state_dict"):
        load_inception(tmp_path / "pickle.pth")
