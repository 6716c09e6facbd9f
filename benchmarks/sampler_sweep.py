"""FID and IS of a trained model against the number of network evaluations, for every sampler (or a grid of
one sampler's steps and options): the few-step table of the README and the paper's Table 2 analogue.

    python benchmarks/sampler_sweep.py --checkpoint models/p_uncond=0.1/checkpoint.pt \
        --classifier models/classifier.pt --reference data/reference.pt --out results/sweep [--nfe 8,16,32,64,128]
    python benchmarks/sampler_sweep.py ... --sampler ancestral --steps 32,64,128,256 --v 0.1,0.3,1.0

Every setting samples the same examples (per-example noise streams: the same initial noise for every sampler)
at every w of --w in one batch, then scores them like the evaluate stage (`cfg.eval.cells.evaluate_samples`:
FID, IS and class accuracy on the evaluation classifier, with the spread over --seed-ranges disjoint example
ranges). NFE counts network evaluations per trajectory: T for ancestral, DDIM and DPM-Solver++(2M), 2T − 3 for
Heun (so Heun runs (NFE + 3) / 2 steps). A w = 0 row costs one network pass per evaluation, any other w two
(the conditional and unconditional pass).

Prints one table and writes <out>/sweep.csv and <out>/sweep.png (FID and IS against NFE, a panel per w). With
--reference-setting (default: ancestral at the largest NFE), the table marks each setting whose FID at every w
is within the reference's seed spread (FID − FID_ref ≤ sd of the reference's per-range FIDs) and names the
cheapest such setting: how the Fashion-MNIST preset's sampler was chosen.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cfg.engine.device import resolve_device  # noqa: E402
from cfg.engine.generate import generate_w_grid  # noqa: E402
from cfg.eval.cells import evaluate_samples  # noqa: E402
from cfg.eval.stats import load_reference_stats  # noqa: E402
from cfg.io import write_csv  # noqa: E402
from cfg.maths.samplers import SAMPLERS  # noqa: E402
from cfg.nets.unet import load_checkpoint  # noqa: E402
from cfg.study.records import SampleSet  # noqa: E402
from cfg.study.stage import make_extractor  # noqa: E402


def steps_for(sampler: str, nfe: int) -> int:
    """Sampling steps T that spend at most `nfe` network evaluations (Heun: 2T − 3, its first and last moves
    being Euler steps; `cfg.maths.samplers.sample_heun`)."""
    return max(2, (nfe + 3) // 2) if sampler == "heun" else nfe


def nfe_of(sampler: str, steps: int) -> int:
    """Network evaluations of one trajectory of `steps` steps."""
    if sampler == "heun":
        return 2 if steps == 2 else 2 * steps - 3
    return steps


def settings_from_args(args) -> list[tuple[str, int, dict]]:
    """(sampler, steps, options) to run, in order."""
    out = []
    if args.steps:  # one sampler's steps × v grid
        vs = [float(v) for v in args.v.split(",")] if args.v else [None]
        for v in vs:
            for t in (int(s) for s in args.steps.split(",")):
                out.append((args.sampler, t, {} if v is None else {"v": v}))
        return out
    for name in args.samplers.split(","):
        if name not in SAMPLERS:
            raise SystemExit(f"--samplers: {name!r} is no sampler; choose from {', '.join(SAMPLERS.names())}")
        for nfe in (int(n) for n in args.nfe.split(",")):
            if name != "ancestral" and nfe > args.max_nfe_others:
                continue
            opts = {"v": args.ancestral_v} if name == "ancestral" else {}
            out.append((name, steps_for(name, nfe), opts))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--classifier", required=True)
    ap.add_argument("--reference", required=True)
    ap.add_argument("--out", required=True, help="folder for sweep.csv and sweep.png")
    ap.add_argument("--w", default="0,0.3,1", help="guidance strengths, the paper's w")
    ap.add_argument("--samplers", default="ancestral,ddim,dpmpp_2m,heun")
    ap.add_argument("--nfe", default="8,16,32,64,128", help="network evaluations per trajectory")
    ap.add_argument(
        "--max-nfe-others", type=int, default=10**9, help="skip non-ancestral samplers above this"
    )
    ap.add_argument("--ancestral-v", type=float, default=0.3)
    ap.add_argument(
        "--sampler", default="ancestral", help="with --steps: the one sampler of a steps × v grid"
    )
    ap.add_argument("--steps", default=None, help="steps T of a one-sampler grid, e.g. 32,64,128,256")
    ap.add_argument(
        "--v", default=None, help="with --steps: the ancestral sampler's v values, e.g. 0.1,0.3,1.0"
    )
    ap.add_argument("--n-samples", type=int, default=3000, help="images per (setting, w)")
    ap.add_argument("--seed-ranges", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=7500, help="network rows per batch (before doubling)")
    ap.add_argument("--clip-denoised", type=float, default=1.0)
    ap.add_argument("--lambda-min", type=float, default=-20.0)
    ap.add_argument("--lambda-max", type=float, default=20.0)
    ap.add_argument("--compile", action="store_true", help="torch.compile the network (CUDA)")
    ap.add_argument("--device", default="auto")
    ap.add_argument(
        "--resume", action="store_true", help="keep <out>/sweep.csv's rows and skip their settings"
    )
    args = ap.parse_args()

    w = [float(x) for x in args.w.split(",")]
    settings = settings_from_args(args)
    for name, _, opts in settings:  # every option checked before any sampling
        SAMPLERS.resolve(name, opts, f"{name} options")
    device = resolve_device(args.device)
    model, meta = load_checkpoint(args.checkpoint)
    model = model.to(device)
    cfg = model.config
    reference = load_reference_stats(args.reference)
    extractor = make_extractor("classifier", args.classifier, None, device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"[sweep] {args.checkpoint} (p_uncond {meta['p_uncond']}), {len(settings)} settings × w {w}, "
        f"{args.n_samples} samples each, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        flush=True,
    )

    rows = []
    if args.resume and (out / "sweep.csv").is_file():
        with open(out / "sweep.csv", newline="") as f:
            rows = [_typed(r) for r in csv.DictReader(f)]
    done = {(r["sampler"], r["steps"], str(r["v"])) for r in rows}
    for name, steps, opts in settings:
        if (name, steps, str(opts.get("v", ""))) in done:
            continue
        options = {"clip_denoised": args.clip_denoised} | SAMPLERS.resolve(name, opts, "options")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        images, labels = generate_w_grid(
            model,
            w,
            args.n_samples,
            num_classes=cfg.num_classes,
            image_shape=(cfg.in_channels, cfg.image_size, cfg.image_size),
            sampler=name,
            steps=steps,
            sampler_options=options,
            lambda_min=args.lambda_min,
            lambda_max=args.lambda_max,
            seed=args.seed,
            batch_size=args.batch_size,
            device=device,
            compile=args.compile,
        )
        seconds = time.perf_counter() - t0
        samples = SampleSet(
            images=images,
            labels=labels,
            w=w,
            classes=list(meta["classes"]),
            p_uncond=meta["p_uncond"],
            guidance="cfg",
            guidance_options={},
            sampler=name,
            sampler_options=options,
            steps=steps,
            seed=args.seed,
            checkpoint=args.checkpoint,
            train_run_id=None,
            checkpoint_params_hash="",
            device=str(device),
            seconds=seconds,
        )
        records = evaluate_samples(
            samples,
            extractor,
            reference,
            metrics={"fid": {}, "is": {}, "class_acc": {}},
            seed_ranges=args.seed_ranges,
            batch_size=2000,
            device=device,
        )
        for r in records:
            m = r.metrics
            rows.append(
                {
                    "sampler": name,
                    "steps": steps,
                    "nfe": nfe_of(name, steps),
                    "v": opts.get("v", ""),
                    "w": r.w,
                    "fid": m["fid"],
                    "fid_range_std": m.get("fid_range_std", math.nan),
                    "is": m["is"],
                    "is_range_std": m.get("is_range_std", math.nan),
                    "class_acc": m.get("class_acc", math.nan),
                    "n_samples": r.n_samples,
                    "seconds": seconds,
                    "images_per_s": len(w) * args.n_samples / seconds,
                }
            )
            print(
                f"[sweep] {name:9s} T={steps:3d} nfe={nfe_of(name, steps):3d} {opts} w={r.w:g}: "
                f"FID {m['fid']:.3f} ± {m.get('fid_range_std', math.nan):.3f}  IS {m['is']:.3f}  "
                f"({seconds:.1f} s, {len(w) * args.n_samples / seconds:,.0f} img/s)",
                flush=True,
            )
        # after every setting, atomically: a cut-off run keeps its rows and never a half-written file
        write_csv(out / "sweep.csv", rows, list(rows[0]))
    report(rows, settings, w, out)


def _typed(row: dict) -> dict:
    """A sweep.csv row with its numbers back as numbers (v stays as written: '' for samplers without it)."""
    out = dict(row)
    for k in ("steps", "nfe", "n_samples"):
        out[k] = int(row[k])
    for k in ("w", "fid", "fid_range_std", "is", "is_range_std", "class_acc", "seconds", "images_per_s"):
        out[k] = float(row[k])
    out["v"] = float(row["v"]) if row["v"] != "" else ""
    return out


def report(rows: list[dict], settings, w: list[float], out: Path) -> None:
    keyed = {(r["sampler"], r["steps"], str(r["v"]), r["w"]): r for r in rows}
    key = lambda s: (s[0], s[1], str(s[2].get("v", "")))  # noqa: E731
    anc = [s for s in settings if s[0] == "ancestral"]
    ref = max(anc, key=lambda s: s[1]) if anc else None
    print(
        "\n| sampler | v | T | NFE | "
        + " | ".join(f"FID w={x:g} | IS w={x:g}" for x in w)
        + " | img/s | within ref spread |"
    )
    print("|" + " --- |" * (5 + 2 * len(w) + 1))
    ok_settings = []
    for s in settings:
        cells = [keyed[(*key(s), x)] for x in w]
        ok = ""
        if ref is not None:
            refs = [keyed[(*key(ref), x)] for x in w]
            ok = all(c["fid"] - r["fid"] <= r["fid_range_std"] for c, r in zip(cells, refs, strict=True))
            if ok:
                ok_settings.append((nfe_of(s[0], s[1]), s))
            ok = "yes" if ok else "no"
        print(
            f"| {s[0]} | {s[2].get('v', '')} | {s[1]} | {nfe_of(s[0], s[1])} | "
            + " | ".join(f"{c['fid']:.2f} ± {c['fid_range_std']:.2f} | {c['is']:.2f}" for c in cells)
            + f" | {cells[0]['images_per_s']:,.0f} | {ok} |"
        )
    if ok_settings:
        nfe, best = min(ok_settings, key=lambda t: t[0])
        print(
            f"\n[sweep] cheapest setting within the seed spread of {ref[0]} T={ref[1]}: {best[0]} T={best[1]} "
            f"(NFE {nfe}) {best[2]}"
        )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(2, len(w), figsize=(4 * len(w), 6.5), squeeze=False)
    groups = sorted({(r["sampler"], str(r["v"])) for r in rows})
    for j, x in enumerate(w):
        for sampler, v in groups:
            pts = sorted(
                (r["nfe"], r["fid"], r["fid_range_std"], r["is"])
                for r in rows
                if r["sampler"] == sampler and str(r["v"]) == v and r["w"] == x
            )
            label = sampler + (f" v={v}" if v != "" else "")
            nf = [p[0] for p in pts]
            axes[0][j].errorbar(
                nf, [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=2, label=label
            )
            axes[1][j].plot(nf, [p[3] for p in pts], marker="o", label=label)
        for i, what in enumerate(("FID", "IS")):
            axes[i][j].set_xscale("log", base=2)
            axes[i][j].set_xlabel("network evaluations per sample (NFE)")
            axes[i][j].set_ylabel(what)
            axes[i][j].set_title(f"{what}, w = {x:g}")
        axes[0][j].set_yscale("log")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=110)


if __name__ == "__main__":
    main()
