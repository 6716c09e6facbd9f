"""benchmarks/bench_throughput.py on CPU at a tiny size: the table, and the diffusers peer's rows and FLOPs.

No timings are asserted: the box is shared, and on CPU the numbers only show that every row ran."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from cfg.nets.unet import UNet, UNetConfig, count_parameters
from tests.conftest import ROOT, run

# a preset over params.yaml: 16x16 images, two levels, attention at 8 (and in the middle)
TINY_MODEL = {
    "base_width": 8,
    "channel_mult": [1, 2],
    "blocks_per_level": 1,
    "attention_resolutions": [8],
    "head_channels": 8,
    "dropout": 0.0,
}
TINY_CONFIG = UNetConfig(image_size=16, in_channels=1, num_classes=10, **TINY_MODEL)


# the benchmark as a script with `import diffusers` failing, as where it is not installed
WITHOUT_DIFFUSERS = (
    "import runpy, sys; sys.modules['diffusers'] = None; sys.argv = sys.argv[1:]; "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)


def bench(tmp_path: Path, diffusers: bool = True) -> str:
    """The benchmark's stdout on CPU for the tiny model, batches of 2, at least 5 timed calls per row."""
    preset = tmp_path / "tiny.yaml"
    preset.write_text(
        yaml.safe_dump({"data": {"name": "fashion_mnist", "image_size": 16}, "model": TINY_MODEL})
    )
    python = [sys.executable] if diffusers else [sys.executable, "-c", WITHOUT_DIFFUSERS]
    cmd = [*python, "benchmarks/bench_throughput.py", "--preset", str(preset), "--device", "cpu"]
    return run([*cmd, "--seconds", "0", "--batch", "2", "--sample-batch", "2"], ROOT, timeout=300).stdout


def table_rows(out: str) -> dict[tuple[str, str], list[str]]:
    """(what, model) -> the rest of the row's fields, for every row of the table."""
    rows = {}
    for line in out.splitlines():
        if m := re.match(r"((?:train|sample step) fp32 eager)\s+(cfg-lab|diffusers \S+)\s+(.*)$", line):
            rows[m[1], m[2]] = m[3].split()
    return rows


def printed_costs(out: str, model: str) -> tuple[int, int, int]:
    """(parameters, FLOP per training image, FLOP per forward image) of a model's line."""
    pattern = rf"^  {re.escape(model)}.*?\s([\d,]+) parameters\s+([\d,]+) FLOP train\s+([\d,]+) FLOP forward$"
    m = re.search(pattern, out, re.MULTILINE)
    assert m, f"no cost line for {model}:\n{out}"
    return tuple(int(g.replace(",", "")) for g in m.groups())


def counted(model: torch.nn.Module, train: bool) -> float:
    """FLOPs per image straight from FlopCounterMode (attention in SDPA's math backend), batch 4."""
    x = torch.randn(4, 1, 16, 16)
    lam, y = torch.zeros(4), torch.zeros(4, dtype=torch.long)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(x, lam, y)
        if train:
            out.sum().backward()
    return counter.get_total_flops() / 4


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_throughput", ROOT / "benchmarks/bench_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_table_without_peer(tmp_path):
    out = bench(tmp_path, diffusers=False)
    rows = table_rows(out)
    assert set(rows) == {("train fp32 eager", "cfg-lab"), ("sample step fp32 eager", "cfg-lab")}, out
    assert "device CPU" in out and "cfg-lab/peer" not in out
    assert "peer rows (diffusers UNet2DModel) skipped: diffusers is not importable" in out
    assert "pip install -e '.[bench]'" in out


def test_peer_rows_ratio_and_flops(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    out = bench(tmp_path)
    peer = f"diffusers {diffusers.__version__}"
    rows = table_rows(out)
    assert set(rows) == {
        (w, m) for w in ("train fp32 eager", "sample step fp32 eager") for m in ("cfg-lab", peer)
    }
    assert "device CPU" in out and "cfg-lab/peer" in out and "skipped" not in out
    for what in ("train fp32 eager", "sample step fp32 eager"):
        ours, theirs = rows[what, "cfg-lab"], rows[what, peer]
        assert ours[0] == theirs[0] == "2"  # the same batch
        ips_ours, ips_peer = (float(r[1].replace(",", "")) for r in (ours, theirs))
        assert re.fullmatch(r"\d+\.\d\dx", theirs[-1])
        assert float(theirs[-1][:-1]) == pytest.approx(ips_ours / ips_peer, rel=0.02, abs=0.01)

    # the peer is the same architecture: the same parameters, and the same FLOPs from the same counter,
    # which a direct FlopCounterMode count of the benchmark's peer reproduces
    module = load_bench()
    net = module.PeerUNet(TINY_CONFIG)
    ours_printed, peer_printed = printed_costs(out, "cfg-lab UNet"), printed_costs(out, peer)
    assert peer_printed == (count_parameters(net), counted(net, train=True), counted(net, train=False))
    assert peer_printed == ours_printed
    assert 2 * peer_printed[2] < peer_printed[1] <= 3 * peer_printed[2]


def test_peer_matches_the_preset_architecture():
    """At the GPU preset's size the peer has cfg-lab's parameter count and FLOPs (README: 9.67 GFLOP per training
    image, 3.22 per forward)."""
    pytest.importorskip("diffusers")
    module = load_bench()
    config = UNetConfig(
        image_size=32,
        in_channels=1,
        num_classes=10,
        base_width=64,
        channel_mult=(1, 2, 2),
        blocks_per_level=2,
        attention_resolutions=(16, 8),
        head_channels=32,
    )
    ours, peer = UNet(config), module.PeerUNet(config)
    assert count_parameters(peer) == count_parameters(ours) == 7_281_217
    meta = torch.device("meta")  # the counter sees shapes only: no arithmetic, a second instead of twenty
    ours, peer = ours.to(meta), peer.to(meta)
    for train, flops in ((True, 9_669_443_584), (False, 3_223_552_000)):
        assert module.flops_per_image(peer, config, meta, train) == flops
        assert module.flops_per_image(ours, config, meta, train) == flops
