#!/usr/bin/env bash
# Train and sample stages of the Fashion-MNIST preset on 1 and on N GPUs of one host (torchrun via
# train.devices), for the scaling table: wall time, images/s and whether the samples are the same bytes.
#   . .whl/gpu-env.sh && bash scripts/gpu_scaling.sh "1 2 4" STEPS SAMPLES SAMPLE_STEPS OUT
set -euo pipefail
counts=${1:-"1 2"}; steps=${2:-1500}; samples=${3:-2000}; sample_steps=${4:-128}; out=${5:-/tmp/scaling}
mkdir -p "$out"
python3 - "$steps" "$samples" "$sample_steps" <<'PY'
import sys, yaml
from pathlib import Path
from cfg.study.config import params_from_dict
from cfg.study.presets import flat_overrides, merged_params
base = yaml.safe_load(Path("params.yaml").read_text())
changes = flat_overrides(yaml.safe_load(Path("presets/fashion_mnist_gpu.yaml").read_text()))
changes |= {"data.root": ".fmnist", "train.steps": int(sys.argv[1]), "train.p_uncond": [0.1],
            "train.eval_every": 0, "sample.n_samples": int(sys.argv[2]), "sample.w": [-1.0, 0.0, 0.3, 1.0, 4.0],
            "sample.steps": int(sys.argv[3]), "sample.batch_size": 2500}
merged = merged_params(base, changes)
params_from_dict(merged)
Path("params.yaml").write_text(yaml.safe_dump(merged, sort_keys=False))
PY
python3 pipelines/prepare.py --out data/prepared.pt --info data/prepared.json
for k in $counts; do
  sed -i "s/^  devices: .*/  devices: $k/" params.yaml
  t0=$SECONDS
  python3 pipelines/train.py --p-uncond 0.1 --data data/prepared.pt --out-dir "$out/train$k" 2>&1 | grep -v "^\[train p_uncond=0.1 on" | tail -2
  t1=$SECONDS
  python3 pipelines/sample.py --checkpoint "$out/train1/checkpoint.pt" --out-dir "$out/sample$k" 2>&1 | tail -1
  t2=$SECONDS
  echo "devices=$k train_s=$((t1 - t0)) sample_s=$((t2 - t1))" | tee -a "$out/times.txt"
done
python3 - "$out" $counts <<'PY'
import sys, torch
out, counts = sys.argv[1], sys.argv[2:]
a = torch.load(f"{out}/sample1/samples.pt", weights_only=True)["images"]
wa = torch.load(f"{out}/train1/checkpoint.pt", weights_only=True)["state_dict"]
for n in counts[1:]:
    b = torch.load(f"{out}/sample{n}/samples.pt", weights_only=True)["images"]
    print(f"samples 1 vs {n} GPUs: identical bytes {torch.equal(a, b)}; differing pixels {(a != b).sum().item()} of {a.numel()}")
    wb = torch.load(f"{out}/train{n}/checkpoint.pt", weights_only=True)["state_dict"]
    print("max |weight diff| 1 vs", n, "GPUs:", max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa))
PY
