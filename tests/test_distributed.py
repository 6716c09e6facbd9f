"""Data parallel over real processes (gloo on CPU): training with 2 processes equals 1 process at the same
global batch, and a cell's samples and features are identical whatever the number of processes.

Every process runs one CPU thread, the single-process reference too: on CPU the convolutions' rounding
depends on the thread count (one pixel of 2,112 differed between 1 and 2 threads here), which is a property
of the CPU kernels, not of how the examples are split."""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import replace

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from cfg.engine.distributed import Claims, Dist, finish, gather_rows, init, shard
from cfg.engine.generate import generate_w_grid
from cfg.engine.training import train_diffusion
from cfg.eval.features import classifier_extractor, extract_features
from cfg.nets.classifier import Classifier, ClassifierConfig
from cfg.nets.unet import UNet, UNetConfig

CONFIG = UNetConfig(
    image_size=8,
    in_channels=1,
    num_classes=3,
    base_width=8,
    channel_mult=(1, 2),
    head_channels=8,
    dropout=0.0,
)
# the largest |Δ| allowed between the weights of 1 and 2 processes after 12 Adam steps: the gradient is the
# same sum taken in another order (float32 reassociation), which Adam carries forward at ~1e-7 relative
WEIGHT_TOL = 1e-5


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.rand(64, 1, 8, 8, generator=g) * 2 - 1, torch.randint(0, 3, (64,), generator=g)


def _train(d: Dist):
    x, y = _data()
    r = train_diffusion(
        CONFIG,
        x,
        y,
        p_uncond=0.2,
        steps=12,
        batch_size=8,
        lr=1e-3,
        warmup_steps=2,
        log_every=4,
        seed=3,
        dist=d,
    )
    return {"model": r.model.state_dict(), "ema": r.ema.state_dict(), "loss": [h["loss"] for h in r.history]}


def _model():
    torch.manual_seed(0)
    net = UNet(CONFIG).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def _sample_and_features(d: Dist):
    n = 11
    images, labels = generate_w_grid(
        _model(),
        [-1.0, 0.0, 1.5],
        0,
        examples=shard(n, d),
        num_classes=3,
        image_shape=(1, 8, 8),
        steps=5,
        seed=4,
        batch_size=6,
    )
    images, labels = gather_rows(images, d, n, dim=1), gather_rows(labels, d, n)
    torch.manual_seed(1)
    ext = classifier_extractor(
        Classifier(ClassifierConfig(in_channels=1, num_classes=3, image_size=8, width=4, feature_dim=6))
    )
    # as cfg.eval.cells.evaluate_samples shards a cell: whole extractor batches, each the very batch one process
    # runs (the CPU kernels may round differently for another batch size: seen on an AVX-512 BF16/FP16 CPU)
    block = 4
    feats = extract_features(ext, images[2][shard(n, d, block=block)], batch_size=block)
    return {
        "images": images,
        "labels": labels,
        "features": gather_rows(feats.features, d, n, block=block),
        "logits": gather_rows(feats.logits, d, n, block=block),
    }


def _evaluate(d: Dist):
    from cfg.eval.cells import evaluate_samples
    from cfg.eval.stats import reference_stats
    from cfg.study.records import SampleSet

    g = torch.Generator().manual_seed(5)
    torch.manual_seed(1)
    ext = classifier_extractor(
        Classifier(ClassifierConfig(in_channels=1, num_classes=3, image_size=8, width=4, feature_dim=6))
    )
    real = (torch.rand(60, 1, 8, 8, generator=g) * 255).to(torch.uint8)
    ref = reference_stats(extract_features(ext, real), ext, labels=torch.arange(60) % 3)
    samples = SampleSet(
        # 36: 2 seed ranges of 18, the 3 classes alike in each; 36 = 5 x 7 + 1: the extractor's last batch short
        images=(torch.rand(3, 36, 1, 8, 8, generator=g) * 255).to(torch.uint8),
        labels=torch.arange(36) % 3,
        w=[0.0, 0.5, 1.0],  # rows scored by ranks 0, 1, 0 of two
        classes=["a", "b", "c"],
        p_uncond=0.1,
        guidance="cfg",
        guidance_options={},
        sampler="ddim",
        sampler_options={"clip_denoised": 1.0},
        steps=4,
        seed=0,
        checkpoint="c.pt",
        train_run_id=None,
        checkpoint_params_hash="",
    )
    metrics = {
        "fid": {},
        "is": {},
        "kid": {"subsets": 3, "subset_size": 20},
        "precision_recall": {"k": 3},
        "class_acc": {},
    }
    seen = []  # what rank 0's logging callback gets, in its order
    records = evaluate_samples(
        samples, ext, ref, metrics=metrics, seed_ranges=2, per_class_w=1.0, batch_size=7, dist=d,
        on_cell=(lambda r, images: seen.append((r.w, images.sum().item()))) if d.main else None,
    )  # fmt: skip
    return {"records": [r.to_dict() for r in records], "seen": seen}


def _dropout_masks(d: Dist):
    """Two training steps of a network with dropout 0.5: every Dropout module's zeroed elements, per rank
    (gathered to rank 0), recorded by a global forward hook."""
    masks = []

    def record(module, inputs, output):
        if isinstance(module, torch.nn.Dropout) and module.training:
            masks.append((output == 0) & (inputs[0] != 0))

    hook = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        x, y = _data()
        config = replace(CONFIG, dropout=0.5)
        train_diffusion(config, x, y, steps=2, batch_size=8, warmup_steps=1, log_every=1, seed=3, dist=d)
    finally:
        hook.remove()
    per_rank = [None] * d.world
    if d.world > 1:
        tdist.all_gather_object(per_rank, masks)
    else:
        per_rank = [masks]
    return {"masks": per_rank}


def _resume(d: Dist):
    """Eight steps with dropout 0.5, the resume state written at steps 3 and 6 (between the logs at 4 and 8), then
    the same call again, which continues from the state of step 6: both calls' weights and loss curves."""
    x, y = _data()
    kw = dict(p_uncond=0.2, steps=8, batch_size=8, lr=1e-3, warmup_steps=2, log_every=4, seed=3, dist=d)
    kw |= dict(resume_path=os.environ["CFG_TEST_RESUME_STATE"], checkpoint_every=3)
    config = replace(CONFIG, dropout=0.5)
    out = {}
    for name in ("whole", "resumed"):
        r = train_diffusion(config, x, y, **kw)
        tdist.barrier()  # rank 0's state is out before any rank reads it
        out[name] = {
            "model": r.model.state_dict(),
            "ema": r.ema.state_dict(),
            "history": [(h["step"], h["loss"]) for h in r.history],
            "resumed_from": r.resumed_from,
        }
    return out


# Claims: 37 examples in batches of 4 (12 rows / 3 w): 9 full blocks handed out, the short one (example 36) to
# rank 9 mod world; rank 1 of two sleeps after each batch, as a rank whose GPU also trains a model runs slower
CLAIM_N, CLAIM_BLOCK = 37, 4


def _claims(d: Dist):
    import torch.distributed as dist

    kwargs = {"num_classes": 3, "image_shape": (1, 8, 8), "steps": 5, "seed": 4, "batch_size": 12}
    if d.world == 1:  # the reference: one process, no claims
        images, labels = generate_w_grid(_model(), [-1.0, 0.0, 1.5], CLAIM_N, **kwargs)
        return {"images": images, "labels": labels}
    dist.barrier()  # both start claiming together
    claims = Claims(CLAIM_N, d, CLAIM_BLOCK)
    slow = (lambda info: time.sleep(0.5)) if d.rank == 1 else None
    images, labels = generate_w_grid(_model(), [-1.0, 0.0, 1.5], 0, examples=claims, progress=slow, **kwargs)
    rows = claims.rows()
    taken = [None] * d.world
    dist.all_gather_object(taken, rows.tolist())
    try:  # every rank names its rows as 0 … len − 1: rows 0 … 3 twice, the rest missing
        gather_rows(images, d, CLAIM_N, dim=1, rows=torch.arange(len(rows)))
        refused = ""
    except RuntimeError as e:
        refused = str(e)
    try:  # rank 1 names one row too few: every rank stops with the same error, none waits for it
        gather_rows(images, d, CLAIM_N, dim=1, rows=rows[:-1] if d.rank == 1 else rows)
        mismatch = ""
    except ValueError as e:
        mismatch = str(e)
    return {
        "mismatch": mismatch,
        "images": gather_rows(images, d, CLAIM_N, dim=1, rows=rows),
        "labels": gather_rows(labels, d, CLAIM_N, rows=rows),
        "taken": taken,
        "expected": claims.expected(),
        "refused": refused,
    }


FNS = {
    "train": _train,
    "sample": _sample_and_features,
    "evaluate": _evaluate,
    "claims": _claims,
    "dropout": _dropout_masks,
    "resume": _resume,
}


def _worker(rank: int, world: int, port: int, fn: str, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    d, _ = init("cpu")
    result = FNS[fn](d)
    if d.main:
        torch.save(result, out)
    finish(d)


def _run(fn: str, world: int, tmp_path) -> dict:
    if world == 1:
        threads = torch.get_num_threads()
        # as each worker: oneDNN's convolutions round differently with other thread counts
        torch.set_num_threads(1)
        try:
            return FNS[fn](Dist())
        finally:
            torch.set_num_threads(threads)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / f"{fn}.pt")
    mp.spawn(_worker, args=(world, port, fn, out), nprocs=world, join=True)
    return torch.load(out, weights_only=True)


def test_two_processes_train_the_weights_of_one_at_the_same_global_batch(tmp_path):
    one, two = _run("train", 1, tmp_path), _run("train", 2, tmp_path)
    for part in ("model", "ema"):
        worst = max((one[part][k].float() - two[part][k].float()).abs().max().item() for k in one[part])
        moved = max(
            (one[part][k].float() - UNet(CONFIG).state_dict()[k].float()).abs().max().item()
            for k in one[part]
        )
        assert worst < WEIGHT_TOL, (part, worst)
        assert moved > 100 * WEIGHT_TOL  # the comparison is not between untrained weights
    assert one["loss"] == pytest.approx(two["loss"], rel=1e-5)


def test_ranks_draw_their_own_dropout_masks(tmp_path):
    """Each rank computes other rows of the global batch, so its dropout masks must be its own: seeded alike, the
    two ranks once drew identical masks for their halves (rows i and i + B/2 shared a mask). With p = 0.5,
    independent masks agree on about half the elements."""
    per_rank = _run("dropout", 2, tmp_path)["masks"]
    assert len(per_rank) == 2 and len(per_rank[0]) == len(per_rank[1]) > 0
    for a, b in zip(*per_rank, strict=True):
        assert a.shape == b.shape and a.any()
        assert (a == b).float().mean().item() < 0.75


def test_two_processes_resumed_between_logs_end_where_an_uninterrupted_run_does(tmp_path, monkeypatch):
    """A data-parallel resume state holds every rank's loss sum since the last log (the ranks' sums differ): with
    rank 0's alone, every rank resumed with it and the next logged loss was wrong. With dropout the ranks draw
    their own masks, which a resumed run draws again. A state of two processes is refused by one."""
    state = tmp_path / "state.pt"
    monkeypatch.setenv("CFG_TEST_RESUME_STATE", str(state))
    runs = _run("resume", 2, tmp_path)
    whole, resumed = runs["whole"], runs["resumed"]
    assert (whole["resumed_from"], resumed["resumed_from"]) == (0, 6)
    assert [s for s, _ in whole["history"]] == [4, 8]
    assert resumed["history"] == whole["history"]
    for part in ("model", "ema"):
        assert whole[part].keys() == resumed[part].keys()
        assert all(torch.equal(whole[part][k], resumed[part][k]) for k in whole[part]), part
    saved = torch.load(state, weights_only=True)
    assert saved["step"] == 6 and saved["running"].shape == (2,)
    assert saved["running"][0] != saved["running"][1]  # the ranks' own sums
    x, y = _data()
    with pytest.raises(ValueError, match=r"other settings \(\['world'\]\)"):
        train_diffusion(
            replace(CONFIG, dropout=0.5), x, y, p_uncond=0.2, steps=8, batch_size=8, lr=1e-3, warmup_steps=2,
            log_every=4, seed=3, resume_path=state, checkpoint_every=3,
        )  # fmt: skip


def test_samples_and_features_are_identical_for_one_and_two_processes(tmp_path):
    one, two = _run("sample", 1, tmp_path), _run("sample", 2, tmp_path)
    assert one["images"].dtype == torch.uint8 and one["images"].shape == (3, 11, 1, 8, 8)
    for key in one:
        assert torch.equal(one[key], two[key]), key


def test_evaluation_is_identical_for_one_and_two_processes(tmp_path):
    one, two = _run("evaluate", 1, tmp_path), _run("evaluate", 2, tmp_path)
    assert len(one["records"]) == 3 and one["records"][0]["metrics"]["fid"] > 0
    assert [w for w, _ in one["seen"]] == [
        0.0,
        0.5,
        1.0,
    ]  # every row to the callback, in order, with its images
    assert one == two


def test_batch_size_must_split_evenly_over_the_processes():
    x, y = _data()
    with pytest.raises(ValueError, match="batch_size = 9 must be a multiple of the 2 processes"):
        train_diffusion(CONFIG, x, y, steps=1, batch_size=9, dist=Dist(rank=0, world=2))


@pytest.mark.slow
def test_stages_relaunch_under_torchrun_and_match_one_process(project):
    """train.devices: 2 on CPU: the train, sample and evaluate stages re-run themselves under torchrun (2 gloo
    processes); the checkpoint matches the 1-process stage within WEIGHT_TOL, the samples are the same bytes
    and the cell records the same numbers. Resume states are written between logs (every rank's loss sum is
    gathered into them: once only rank 0 was given checkpoint_every and waited alone in that collective)."""
    import yaml

    from .conftest import run

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["eval_every"] = 0  # no FIDs during training: the stage needs no classifier here
    params["train"]["checkpoint_every"] = 15  # steps 30, logs every 10
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["dvc", "repro", "evaluate"], project)
    one_ckpt = torch.load(project / "models/p_uncond=0.1/checkpoint.pt", weights_only=True)
    one_samples = torch.load(project / "samples/p_uncond=0.1/samples.pt", weights_only=True)
    params["train"]["devices"] = params["sample"]["devices"] = 2
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    py = ["python"]
    out = run(
        [*py, "pipelines/train.py", "--p-uncond", "0.1", "--data", "data/prepared.pt", "--out-dir", "two"],
        project,
        timeout=600,  # a rank waiting in a collective the others never enter would hang here
    )
    assert "on 2 x cpu" in out.stderr  # progress and summary lines go to the log (stderr, cfg.log)
    two_ckpt = torch.load(project / "two/checkpoint.pt", weights_only=True)
    assert two_ckpt["meta"]["processes"] == 2
    a, b = one_ckpt["state_dict"], two_ckpt["state_dict"]
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < WEIGHT_TOL
    out = run(
        [*py, "pipelines/sample.py", "--checkpoint", "models/p_uncond=0.1/checkpoint.pt", "--out-dir", "s2"],
        project,
    )
    assert "2 process(es)" in out.stderr
    two_samples = torch.load(project / "s2/samples.pt", weights_only=True)
    assert torch.equal(one_samples["images"], two_samples["images"])
    assert (project / "s2/grid.png").read_bytes() == (project / "samples/p_uncond=0.1/grid.png").read_bytes()
    cmd = ["pipelines/evaluate.py", "--samples", "samples", "--classifier", "models/classifier.pt"]
    out = run([*py, *cmd, "--reference", "data/reference.pt", "--out-dir", "cells2"], project)
    for name in ("p_uncond=0.1.json", "p_uncond=0.5.json"):
        one = [
            r | {"mlflow_run_id": None} for r in json.loads((project / "results/cells" / name).read_text())
        ]
        two = [r | {"mlflow_run_id": None} for r in json.loads((project / "cells2" / name).read_text())]
        assert one == two and len(one) == 3


def test_shard_blocks_cover_every_row_once_and_gather_restores_the_order():
    for n, world, block in [(11, 2, 1), (11, 3, 4), (7, 4, 3), (2, 3, 5)]:
        parts = [shard(n, Dist(r, world), block) for r in range(world)]
        assert sorted(torch.cat(parts).tolist()) == list(range(n))
        for r, p in enumerate(parts):  # whole blocks, block k to rank k mod world
            assert all(int(i) // block % world == r for i in p)


def test_claimed_blocks_give_the_bytes_of_one_process_and_the_slow_rank_takes_fewer(tmp_path):
    one, two = _run("claims", 1, tmp_path), _run("claims", 2, tmp_path)
    assert one["images"].shape == (3, CLAIM_N, 1, 8, 8)
    assert torch.equal(one["images"], two["images"]) and torch.equal(one["labels"], two["labels"])
    fast, slow = two["taken"]
    assert sorted(fast + slow) == list(range(CLAIM_N))
    for rows in (fast, slow):  # whole blocks: each chunk of 4 one block, in the order claimed
        for i in range(0, len(rows), CLAIM_BLOCK):
            chunk = rows[i : i + CLAIM_BLOCK]
            assert chunk[0] % CLAIM_BLOCK == 0 and chunk == list(range(chunk[0], chunk[0] + len(chunk)))
    assert slow[-1] == CLAIM_N - 1, (
        "the short block (9 full ones before it) is rank 9 mod 2's, after its full ones"
    )
    fixed = len(shard(CLAIM_N, Dist(1, 2), CLAIM_BLOCK))  # 4 full blocks and the short one
    assert len(slow) < fixed < len(fast), (len(fast), len(slow))
    assert two["expected"] == len(fast), "exact once the counter has run out"
    assert "do not cover 0 … 36 once each" in two["refused"]
    assert f"[(1, {len(slow) - 1}, {len(slow)})]" in two["mismatch"]


def test_one_process_claims_every_block_in_order():
    claims = Claims(10, Dist(), 4)
    assert claims.expected() == 10
    assert [b.tolist() for b in claims] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert claims.rows().tolist() == list(range(10)) and claims.expected() == 10
    # of two ranks, before any claim: an even share of the 2 full blocks, and the short one for rank 2 mod 2 = 0
    assert [Claims(10, Dist(r, 2), 4).expected() for r in (0, 1)] == [6, 4]


def test_an_empty_cell_samples_nothing():
    seen = []
    images, labels = generate_w_grid(
        _model(), [0.0, 1.0], 0, num_classes=3, image_shape=(1, 8, 8), steps=2, progress=seen.append
    )
    assert images.shape == (2, 0, 1, 8, 8) and labels.shape == (0,) and seen == []
