"""Stage `train@<p_uncond>`: train one jointly conditional / unconditional diffusion model; with `--guide`, stage
`train_guide`: autoguidance's weaker guide network (params.yaml `guide`), or, when no entry of sample.guidance
needs one, only a note saying so (the stage then costs seconds)."""

import argparse
import dataclasses
import os
import shutil
from functools import partial
from pathlib import Path

from cfg.data.datasets import load_prepared
from cfg.engine.distributed import finish, init, launch, n_processes
from cfg.engine.scoring import training_curve  # the FID curve: monitoring, not a dep (dvc.yaml)
from cfg.engine.training import (
    OtherCodeState,
    check_resume_code,
    resume_state_path,
    train_diffusion,
    train_kwargs,
)
from cfg.io import write_csv, write_json
from cfg.log import get_logger, setup
from cfg.nets.unet import UNetConfig, count_parameters, save_checkpoint
from cfg.progress import Progress
from cfg.study.config import needs_guide
from cfg.study.stage import stage_code, stage_params
from cfg.study.store import flatten, project_root
from cfg.study.tracking import Tracker

# =1: continue a resume state that other code wrote (the run then names the changed files in train.json and MLflow)
RESUME_OTHER_CODE = "CFG_LAB_RESUME_OTHER_CODE"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument(
        "--p-uncond", type=float, help="label-dropout probability of this model (of train.p_uncond)"
    )
    ap.add_argument(
        "--guide", action="store_true", help="train autoguidance's guide network instead (params.yaml guide)"
    )
    ap.add_argument("--data", required=True, help="prepared data file")
    ap.add_argument(
        "--out-dir",
        required=True,
        help="folder for checkpoint.pt, loss.csv, eval.csv, train.json (--guide without autoguidance: guide.json)",
    )
    ap.add_argument("--classifier", help="evaluation classifier (FIDs during training, train.eval_every)")
    ap.add_argument("--reference", help="reference statistics of the test set (FIDs during training)")
    args = ap.parse_args()
    setup()
    params = stage_params()
    t, m = params.train, params.model
    out = Path(args.out_dir)
    if args.guide:
        if not needs_guide(params):  # nothing to train: a note that sample@<p> reads as "no guide"
            out.mkdir(parents=True, exist_ok=True)
            why = "no entry of sample.guidance uses a guide network (autoguidance)"
            write_json(out / "guide.json", {"guide": None, "why": why})
            get_logger("train guide").info(f"{why}: no guide trained")
            return
        # one guide per study, whatever the models' p_uncond: it is called with the labels only
        # the model section with guide.model's keys in their place (validated by the config's _check_guide, which
        # merges them the same way to check them; the merge that decides the network is this one, in a dep)
        m = dataclasses.replace(params.model, **params.guide.model)
        steps, p_uncond = params.guide.steps, params.guide.p_uncond
    elif args.p_uncond not in t.p_uncond:
        raise SystemExit(f"error: --p-uncond {args.p_uncond} is not in train.p_uncond = {t.p_uncond}")
    else:
        steps, p_uncond = t.steps, args.p_uncond
    name = "guide" if args.guide else f"p_uncond={p_uncond}"
    if t.eval_every and not (args.classifier and args.reference):
        raise SystemExit(
            f"error: train.eval_every = {t.eval_every} needs --classifier and --reference (0: no FIDs)"
        )
    launch(n_processes(t.devices, t.device))  # under torchrun when train.devices > 1
    d, device = init(t.device)
    out.mkdir(parents=True, exist_ok=True)

    ds = load_prepared(args.data)
    config = UNetConfig.from_params(
        m, image_size=ds.image_size, in_channels=ds.channels, num_classes=ds.num_classes
    )
    fingerprint = ds.fingerprint()
    train_params = {k: v for k, v in params.to_dict()["train"].items() if k != "p_uncond"} | {"steps": steps}
    model_params = dataclasses.asdict(m)
    params_hash = params.section_hash("data", "model", "train", *(["guide"] if args.guide else []))
    # outside the stage's outputs, which DVC deletes before the stage runs; named by the settings' hash
    resume_path = resume_state_path(
        project_root(),
        p_uncond=p_uncond,
        data_fingerprint=fingerprint,
        model=model_params,
        train=params.to_dict()["train"] | {"steps": steps},
        device=device,
        world=d.world,
    )

    # the code dvc.yaml reruns this stage for: a state of other code is not continued unless asked to, and is refused
    # before the MLflow run starts (every rank checks: each would load the state)
    code = stage_code("train_guide" if args.guide else "train", Path(__file__).resolve().parents[1])
    resume_other_code = os.environ.get(RESUME_OTHER_CODE) == "1"
    try:
        check_resume_code(resume_path, code, resume_other_code=resume_other_code)
    except OtherCodeState as e:
        raise SystemExit(f"error: {e} ({RESUME_OTHER_CODE}=1 dvc repro)") from None

    train = partial(
        train_diffusion,
        config,
        ds.train_x,
        ds.train_y,
        p_uncond=p_uncond,
        device=device,
        **train_kwargs(t) | {"steps": steps},
        log_every=t.log_every,
        resume_path=resume_path,
        # on every rank: each one's loss sum goes into the resume state (a collective all ranks must enter)
        checkpoint_every=t.checkpoint_every,
        code=code,
        resume_other_code=resume_other_code,
        dist=d,
    )
    if not d.main:  # the other ranks train and leave the outputs and the logging to rank 0
        train()
        return finish(d)
    stage = "train_guide" if args.guide else f"train@{p_uncond}"
    tracker = Tracker.open(stage, params.tracking.experiment)  # answers, or exit now
    tags = {"run_kind": "train", "data_fingerprint": fingerprint} | ({"role": "guide"} if args.guide else {})
    run_id = tracker.start_run(f"train {name}", params_hash, tags)
    tracker.log(
        run_id,
        params={
            "p_uncond": p_uncond,
            "data.name": ds.name,
            **flatten(model_params, "model."),
            **flatten(train_params, "train."),
        },
    )

    log = get_logger(f"train {name}")
    progress = Progress(f"train {name} on {device.type}", steps, "steps")
    # the convergence curve: FID / IS of the EMA weights at w = 0 and eval_w, scored as the evaluate stage does
    if t.eval_every:
        # a guide without label dropout has no unconditional branch to guide with: its curve is w = 0 alone
        w_eval = [0.0] if args.guide and p_uncond == 0 else None
        columns, curve = training_curve(params, args.classifier, args.reference, device, w_eval)

    def on_log(entry: dict) -> dict | None:
        progress.update(entry["step"], f"loss {entry['loss']:.4g}")
        tracker.log(run_id, metrics={"loss": entry["loss"], "lr": entry["lr"]}, step=entry["step"])
        step = entry["step"]
        if not t.eval_every or (step % t.eval_every and step < steps):
            return None
        values = curve(entry["ema"])
        tracker.log(run_id, metrics=values, step=step)
        log.info(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
        return values  # kept in the history: eval.csv

    # a run left open ends FAILED when the process exits, KILLED when a signal stopped it (Tracker)
    result = train(callback=on_log)
    if result.resumed_from:
        log.info(f"resumed from step {result.resumed_from}")
    if result.resumed_other_code:
        log.warning(
            f"continued a resume state of other code ({RESUME_OTHER_CODE}): {result.resumed_other_code}"
        )

    meta = {
        "p_uncond": p_uncond,
        **({"role": "guide"} if args.guide else {}),
        "train": train_params,
        "data_fingerprint": fingerprint,
        "data_name": ds.name,
        "classes": ds.classes,
        "mlflow_run_id": run_id,
        "params_hash": params_hash,
        "device": str(device),
        "processes": d.world,
        "images_per_s": result.images_per_s,
        "final_loss": result.history[-1]["loss"],
        # the code files that changed across a resume allowed by CFG_LAB_RESUME_OTHER_CODE: two versions trained it
        **({"resumed_other_code": result.resumed_other_code} if result.resumed_other_code else {}),
    }
    save_checkpoint(out / "checkpoint.pt", result.ema, meta)
    write_csv(out / "loss.csv", result.history, ["step", "loss"])
    if t.eval_every:
        write_csv(out / "eval.csv", [h for h in result.history if columns[0] in h], ["step", *columns])
    write_json(out / "train.json", {k: v for k, v in meta.items() if k != "classes"})
    # the outputs are written: the resume state (and a temporary file a killed run left beside it) is done with
    shutil.rmtree(resume_path.parent, ignore_errors=True)
    tracker.log(
        run_id,
        params={
            "n_parameters": count_parameters(result.ema),
            "resumed_from_step": result.resumed_from,
            **(
                {"resumed_other_code": " ".join(result.resumed_other_code)}
                if result.resumed_other_code
                else {}
            ),
        },
        metrics={"final_loss": meta["final_loss"], "train_images_per_s": result.images_per_s},
    )
    tracker.log_artifact(run_id, out / "checkpoint.pt")
    tracker.log_artifact(run_id, out / "loss.csv")
    tracker.finish()
    log.info(
        f"final loss {meta['final_loss']:.4f}, "
        f"{result.images_per_s:.0f} images/s on {d.world} x {device.type}, MLflow run {run_id}"
    )
    finish(d)


if __name__ == "__main__":
    main()
