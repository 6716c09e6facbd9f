"""Damaged outputs are refused with the file's name and the stage that makes it; a checkpoint whose weights
changed after it was written is caught by its content hash."""

import pytest
import torch

from cfg.eval.stats import load_reference_stats
from cfg.nets.classifier import Classifier, ClassifierConfig, load_classifier, save_classifier
from cfg.nets.unet import UNet, UNetConfig, load_checkpoint, save_checkpoint
from cfg.study.records import SampleSet

CONFIG = UNetConfig(
    image_size=8, in_channels=1, num_classes=3, base_width=8, channel_mult=(1,), head_channels=8
)


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_a_checkpoint_loads_back_and_verifies_its_hash(tmp_path):
    model = UNet(CONFIG)
    save_checkpoint(tmp_path / "c.pt", model, {"p_uncond": 0.1})
    back, meta = load_checkpoint(tmp_path / "c.pt")
    assert meta == {"p_uncond": 0.1}
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), back.state_dict().values(), strict=True)
    )


def test_changed_weights_are_caught_by_the_content_hash(tmp_path):
    save_checkpoint(tmp_path / "c.pt", UNet(CONFIG), {})
    blob = torch.load(tmp_path / "c.pt", weights_only=True)
    name = next(iter(blob["state_dict"]))
    blob["state_dict"][name].view(-1)[0] += 1  # a flipped value: the file still unpickles
    torch.save(blob, tmp_path / "c.pt")
    with pytest.raises(
        ValueError, match=r"c\.pt: the weights do not match the checkpoint's content hash.*dvc repro train@"
    ):
        load_checkpoint(tmp_path / "c.pt")


def test_truncated_and_missing_files_name_themselves_and_their_stage(tmp_path):
    save_checkpoint(tmp_path / "c.pt", UNet(CONFIG), {})
    _truncate(tmp_path / "c.pt")
    with pytest.raises(
        ValueError, match=r"c\.pt is not a readable U-Net checkpoint .*truncated or corrupt.*dvc repro train@"
    ):
        load_checkpoint(tmp_path / "c.pt")
    clf = Classifier(ClassifierConfig(in_channels=1, num_classes=3, image_size=8, width=4, feature_dim=6))
    save_classifier(tmp_path / "clf.pt", clf, {})
    _truncate(tmp_path / "clf.pt", 0.3)
    with pytest.raises(
        ValueError, match=r"clf\.pt is not a readable classifier checkpoint.*dvc repro classifier"
    ):
        load_classifier(tmp_path / "clf.pt")
    (tmp_path / "ref.pt").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(
        ValueError, match=r"ref\.pt is not a readable reference statistics file.*dvc repro reference"
    ):
        load_reference_stats(tmp_path / "ref.pt")
    with pytest.raises(
        FileNotFoundError, match=r"none\.pt: no sample file there; make it with `dvc repro sample@"
    ):
        SampleSet.load(tmp_path / "none.pt")
