"""Damaged outputs are refused with the file's name and the stage that makes it; a checkpoint whose weights
changed after it was written is caught by its content hash, a flipped byte in any stage output by its zip CRC-32;
writes (sample grids too) that fail on a full disk keep the old file, leave no temporary one and say why."""

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


def _flip(path, marker: bytes, offset: int = 0) -> None:
    """Flip every bit of one byte `offset` bytes into the first run of `marker` in the file."""
    data = bytearray(path.read_bytes())
    at = data.find(marker)
    assert at >= 0, f"{marker!r} not in {path}"
    data[at + offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _samples(n: int = 64) -> SampleSet:
    images = (torch.arange(2 * n * 64) % 251).to(torch.uint8).view(2, n, 1, 8, 8)  # (W, N, C, H, W)
    return SampleSet(
        images=images,
        labels=torch.arange(n) % 4,
        w=[0.0, 1.0],
        classes=["a", "b", "c", "d"],
        p_uncond=0.25,
        guidance="cfg",
        guidance_options={},
        sampler="ancestral",
        sampler_options={"v": 0.3},
        steps=8,
        seed=1,
        checkpoint="models/p_uncond=0.25/checkpoint.pt",
        train_run_id=None,
        checkpoint_params_hash="",
    )


def test_a_flipped_byte_anywhere_in_a_stage_output_is_refused_with_its_stage(tmp_path):
    # torch.load does not check the zip's CRC-32s: without cfg.io.load's check a flipped pixel loads silently
    path = tmp_path / "samples" / "p_uncond=0.25" / "samples.pt"
    _samples().save(path)
    assert torch.equal(SampleSet.load(path).images, _samples().images)
    pixels = bytes(range(60, 70))  # a run of the images' bytes
    _flip(path, pixels, 3)
    assert torch.load(path, weights_only=True)["images"].flatten()[63] == 63 ^ 0xFF, "torch.load takes it"
    with pytest.raises(
        ValueError,
        match=r"p_uncond=0\.25/samples\.pt is not a readable sample file \(BadZipFile: Bad CRC-32 .*\): the file "
        r"is truncated or corrupt; make it again with `dvc repro sample@0\.25`",
    ):
        SampleSet.load(path)
    _samples().save(path)
    _flip(path, b"ancestral")  # the pickled settings, not a tensor
    with pytest.raises(ValueError, match=r"Bad CRC-32 for file '[^']*data\.pkl'.*dvc repro sample@0\.25"):
        SampleSet.load(path)
    # the content hash of checkpoints and the CRC together: the stage named with its p_uncond
    ckpt = tmp_path / "models" / "p_uncond=0.25" / "checkpoint.pt"
    save_checkpoint(ckpt, UNet(CONFIG), {})
    _flip(ckpt, b"state_dict")
    with pytest.raises(
        ValueError, match=r"checkpoint\.pt is not a readable U-Net checkpoint.*dvc repro train@0\.25"
    ):
        load_checkpoint(ckpt)


def test_sample_grids_are_written_atomically(tmp_path):
    import numpy as np
    from PIL import Image

    from cfg.data.images import save_grid, tile_grid

    tiles = (torch.arange(2 * 3 * 16) % 256).to(torch.uint8).view(2, 3, 1, 4, 4)  # (R, K, C, H, W)
    path = tmp_path / "grid.png"
    save_grid(path, tiles, upscale=2)
    assert np.array_equal(np.asarray(Image.open(path)), tile_grid(tiles, upscale=2)[..., 0])
    save_grid(path, tiles.flip(0))  # over the old one
    assert np.array_equal(np.asarray(Image.open(path)), tile_grid(tiles.flip(0))[..., 0])
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"], "no temporary file left"


FULL_DISK = """
import resource, signal, sys, torch
from cfg.data.images import save_grid
from cfg.io import atomic_save
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes beyond the limit fail with EFBIG instead of a signal
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
for write in (
    lambda: save_grid(sys.argv[1], (torch.rand(10, 10, 3, 16, 16) * 255).to(torch.uint8)),
    lambda: atomic_save({"x": torch.rand(10_000)}, sys.argv[2]),
):
    try:
        write()
    except OSError as e:
        print(e)
"""


def test_a_write_beyond_the_file_size_limit_keeps_the_old_file_and_names_the_cause(tmp_path):
    import subprocess
    import sys

    grid, state = tmp_path / "grid.png", tmp_path / "state.pt"
    grid.write_bytes(b"the previous grid")
    out = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(grid), str(state)], capture_output=True, text=True, check=True
    )
    lines = out.stdout.splitlines()
    assert lines == [
        f"[Errno 27] could not write {grid}: File too large (EFBIG); the previous grid.png is unchanged; raise "
        "the file-size limit (ulimit -f) and run the stage again",
        f"[Errno 27] could not write {state}: File too large (EFBIG); no state.pt was written; raise the "
        "file-size limit (ulimit -f) and run the stage again",
    ], out.stdout + out.stderr
    assert grid.read_bytes() == b"the previous grid" and not state.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"], "no temporary file left"
