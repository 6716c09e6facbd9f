"""Cell records: evaluate_samples against direct metric calls, seed ranges, the record's round trips."""

import json
import math

import pytest
import torch

from cfg.eval.cells import evaluate_samples, metrics_from_params, score
from cfg.eval.features import classifier_extractor, extract_features
from cfg.eval.fingerprint import fingerprint
from cfg.eval.metrics import (
    METRICS,
    class_accuracy,
    fid,
    inception_score,
    kid,
    per_class_fid,
    precision_recall,
)
from cfg.eval.stats import reference_stats
from cfg.nets.classifier import Classifier, ClassifierConfig
from cfg.study.config import EvaluateParams
from cfg.study.records import CellRecord, SampleSet, p_uncond_name, read_cells, write_cells


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    clf = Classifier(
        ClassifierConfig(in_channels=1, num_classes=4, image_size=8, width=8, feature_dim=16)
    ).eval()
    ext = classifier_extractor(clf)
    real = (torch.rand(80, 1, 8, 8) * 255).to(torch.uint8)
    ref = reference_stats(extract_features(ext, real), ext, labels=torch.arange(80) % 4)
    images = (torch.rand(2, 40, 1, 8, 8) * 255).to(torch.uint8)  # two w, 40 examples
    samples = SampleSet(
        images=images,
        labels=torch.arange(40) % 4,
        w=[0.0, 1.0],
        classes=["a", "b", "c", "d"],
        p_uncond=0.1,
        guidance="cfg",
        guidance_options={},
        sampler="ancestral",
        sampler_options={"v": 0.3, "clip_denoised": 1.0},
        steps=8,
        seed=3,
        checkpoint="models/p_uncond=0.1/checkpoint.pt",
        train_run_id=None,
        checkpoint_params_hash="abc",
    )
    return ext, ref, samples


def test_score_runs_every_registered_metric_with_its_options(setup):
    ext, ref, samples = setup
    gen = extract_features(ext, samples.images[0])
    labels = samples.labels
    metrics = {
        "fid": {},
        "is": {},
        "kid": {"subsets": 3, "subset_size": 30},
        "precision_recall": {"k": 3},
        "class_acc": {},
    }
    out = score(gen, labels, ref, metrics, class_logits=gen.logits, seed=5)
    assert list(out) == ["fid", "is", "kid_x1e3", "kid_x1e3_std", "precision", "recall", "class_acc"]
    assert out["fid"] == fid(gen, ref)
    assert out["is"] == inception_score(gen, seed=5)[0]
    # KID x 10³, as published KIDs are; the std with it
    raw = kid(gen, ref, subsets=3, subset_size=30, seed=5)
    assert (out["kid_x1e3"], out["kid_x1e3_std"]) == (1e3 * raw[0], 1e3 * raw[1])
    assert (out["precision"], out["recall"]) == precision_recall(gen, ref, k=3)
    assert out["class_acc"] == class_accuracy(gen.logits, labels)


def test_evaluate_samples_one_record_per_w_with_ranges_and_per_class(setup):
    ext, ref, samples = setup
    metrics = {"fid": {}, "is": {}, "class_acc": {}}
    seen = []
    records = evaluate_samples(
        samples,
        ext,
        ref,
        metrics=metrics,
        seed_ranges=2,
        per_class_w=1.0,
        on_cell=lambda r, im: seen.append((r.w, im.dtype)),
    )
    assert [r.w for r in records] == [0.0, 1.0] and seen == [(0.0, torch.uint8), (1.0, torch.uint8)]
    for j, r in enumerate(records):
        gen = extract_features(ext, samples.images[j])
        assert r.metrics["fid"] == fid(gen, ref) and r.n_samples == 40 and r.n_per_range == 20
        halves = [gen.select(torch.arange(40) < 20), gen.select(torch.arange(40) >= 20)]
        assert r.ranges["fid"] == [fid(h, ref) for h in halves]
        assert r.metrics["fid_range_mean"] == pytest.approx(sum(r.ranges["fid"]) / 2)
        assert r.metrics["is_range_std"] == pytest.approx(
            abs(r.ranges["is"][0] - r.ranges["is"][1]) / math.sqrt(2)
        )
        assert r.fingerprint == fingerprint(gen, ref).key()
        assert r.sampler_options == {"v": 0.3, "clip_denoised": 1.0} and r.guidance == "cfg"
    assert records[0].per_class_fid is None
    expected = per_class_fid(extract_features(ext, samples.images[1]), samples.labels, ref)
    assert records[1].per_class_fid == {samples.classes[c]: v for c, v in expected.items()}


def test_records_and_samples_round_trip(setup, tmp_path):
    ext, ref, samples = setup
    records = evaluate_samples(samples, ext, ref, metrics={"fid": {}, "is": {}})
    write_cells(tmp_path / "cells.json", records)
    back = read_cells(tmp_path / "cells.json")
    assert back == records
    row = back[0].row()
    assert json.loads(row["sampler_options"]) == {"v": 0.3, "clip_denoised": 1.0}
    assert list(row)[:4] == ["p_uncond", "w", "guidance", "fid"]
    params = back[0].params()
    assert params["sampler_options"] == '{"clip_denoised": 1.0, "v": 0.3}' and params["w"] == 0.0
    samples.save(tmp_path / "samples.pt")
    loaded = SampleSet.load(tmp_path / "samples.pt")
    assert torch.equal(loaded.images, samples.images) and loaded.info() == samples.info()
    assert not list(tmp_path.glob(".samples.pt.*")), "no temporary file left behind"


def test_reading_a_missing_or_foreign_record_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="evaluate stage"):
        read_cells(tmp_path / "none.json")
    (tmp_path / "old.json").write_text(json.dumps([{"p_uncond": 0.1, "v": 0.3}]))
    with pytest.raises(ValueError, match=r"old\.json.*unknown fields \['v'\]"):
        read_cells(tmp_path / "old.json")
    torch.save({"images": 1}, tmp_path / "s.pt")
    with pytest.raises(ValueError, match="rerun its sample stage"):
        SampleSet.load(tmp_path / "s.pt")


def test_metric_options_come_from_the_registry():
    e = EvaluateParams(metrics=["fid", "kid"], metric_options={"kid": {"subsets": 7}})
    assert metrics_from_params(e) == {"fid": {}, "kid": {"subsets": 7, "subset_size": 1000}}
    assert METRICS.options("precision_recall") == {"k": 3}


def test_p_uncond_name_matches_dvc_foreach():
    assert [p_uncond_name(p) for p in (0.1, 0.5, 0.25)] == ["p_uncond=0.1", "p_uncond=0.5", "p_uncond=0.25"]
    assert CellRecord.__dataclass_fields__.keys() >= {"sampler_options", "guidance_options"}


def test_two_variants_of_one_method_are_told_apart_by_their_labels(setup, tmp_path, monkeypatch):
    """sample.guidance labels reach the samples, the records and the cells' MLflow run names: rescale with
    φ = 0.5 and φ = 0.7 under two labels had one run name (`p_uncond=0.1 w=1 rescale`)."""
    import yaml

    from cfg.engine.generate import sample_checkpoint
    from cfg.nets.unet import UNet, UNetConfig
    from cfg.study.config import params_from_dict
    from cfg.study.store import QUEUE_DIR
    from cfg.study.tracking import Tracker, log_cell

    from .conftest import ROOT

    ext, ref, _ = setup
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["sample"] |= {"w": [0.0, 1.0], "steps": 2, "n_samples": 40, "batch_size": 80}
    raw["sample"]["guidance"] = {
        "cfg": {},
        "rescale_05": {"method": "rescale", "phi": 0.5},
        "rescale_07": {"method": "rescale", "phi": 0.7},
    }
    params = params_from_dict(raw)
    torch.manual_seed(0)
    model = UNet(UNetConfig.from_params(params.model, image_size=8, in_channels=1, num_classes=4)).eval()
    meta = {"p_uncond": 0.1, "classes": ["a", "b", "c", "d"]}
    samples = sample_checkpoint(model, meta, params, checkpoint="c.pt", device="cpu")
    assert samples.guidance_label == ["cfg", "cfg", "rescale_05", "rescale_05", "rescale_07", "rescale_07"]
    records = evaluate_samples(samples, ext, ref, metrics={"class_acc": {}})
    names = [r.name for r in records]
    assert names == [
        "p_uncond=0.1 w=0",
        "p_uncond=0.1 w=1",
        "p_uncond=0.1 w=0 rescale_05",
        "p_uncond=0.1 w=1 rescale_05",
        "p_uncond=0.1 w=0 rescale_07",
        "p_uncond=0.1 w=1 rescale_07",
    ]
    assert [r.guidance for r in records[2:]] == ["rescale"] * 4
    assert CellRecord.from_dict(json.loads(json.dumps(records[4].to_dict()))).name == names[4]
    # the runs log_cell starts (offline: the queued calls) carry those names and the label as a tag (not a
    # param: the params are the trade-off table's settings, which analysis reads from MLflow and CSV alike)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("CFG_LAB_TRACKING", "offline")
    tracker = Tracker.open("evaluate@labels", "cfg-lab", root=tmp_path)
    for j, r in enumerate(records):
        log_cell(tracker, r, samples.images[j], samples.labels, samples.classes, "h")
    tracker.finish()
    queued = sorted((tmp_path / QUEUE_DIR).glob("*.jsonl*"))
    calls = [json.loads(line) for f in queued for line in f.read_text().splitlines()]
    created = [c for c in calls if c["op"] == "create_run"]
    assert [c["run_name"] for c in created] == names
    assert [c["tags"]["guidance_label"] for c in created] == [r.label for r in records]
    # a record of a sample file without labels (written before) is named by its method, as before
    old = CellRecord.from_dict({k: v for k, v in records[2].to_dict().items() if k != "guidance_label"})
    assert old.name == "p_uncond=0.1 w=0 rescale"


def test_cells_name_the_weights_they_were_sampled_from(setup, tmp_path, monkeypatch):
    """The sample file, each cell record, its trade-off row and its MLflow run carry the sampled weights' hash: the
    same for one model in any memory format, another after one weight moves by one float step."""
    import yaml

    from cfg.engine.generate import sample_checkpoint
    from cfg.nets.hashing import state_dict_hash
    from cfg.nets.unet import UNet, UNetConfig
    from cfg.study.config import params_from_dict
    from cfg.study.records import SampleSet
    from cfg.study.store import QUEUE_DIR
    from cfg.study.tracking import Tracker, log_cell

    from .conftest import ROOT

    ext, ref, _ = setup
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["sample"] |= {"w": [0.0, 1.0], "steps": 2, "n_samples": 40, "batch_size": 80, "guidance": {"cfg": {}}}
    params = params_from_dict(raw)
    torch.manual_seed(0)
    model = UNet(UNetConfig.from_params(params.model, image_size=8, in_channels=1, num_classes=4)).eval()
    meta = {"p_uncond": 0.1, "classes": ["a", "b", "c", "d"]}
    samples = sample_checkpoint(model, meta, params, checkpoint="c.pt", device="cpu")
    digest = state_dict_hash(model)
    assert samples.weights_hash == digest and len(digest) == 16
    assert state_dict_hash(model.to(memory_format=torch.channels_last)) == digest
    samples.save(tmp_path / "s.pt")
    assert SampleSet.load(tmp_path / "s.pt").weights_hash == digest
    records = evaluate_samples(samples, ext, ref, metrics={"class_acc": {}})
    assert [r.weights_hash for r in records] == [digest, digest]
    assert [r.row()["weights"] for r in records] == [digest, digest]
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("CFG_LAB_TRACKING", "offline")
    tracker = Tracker.open("evaluate@weights", "cfg-lab", root=tmp_path)
    log_cell(tracker, records[0], samples.images[0], samples.labels, samples.classes, "h")
    tracker.finish()
    calls = [
        json.loads(s)
        for f in sorted((tmp_path / QUEUE_DIR).glob("*.jsonl*"))
        for s in f.read_text().split("\n")
        if s
    ]
    assert [c["tags"]["weights"] for c in calls if c["op"] == "create_run"] == [digest]
    with torch.no_grad():
        w = next(model.parameters())
        w.view(-1)[0] = torch.nextafter(w.view(-1)[0], torch.tensor(float("inf")))
    assert state_dict_hash(model) != digest
    # a sample file or record from before the hash was kept reads as "not recorded"
    old = CellRecord.from_dict({k: v for k, v in records[0].to_dict().items() if k != "weights_hash"})
    assert old.weights_hash is None and old.row()["weights"] is None
