#!/usr/bin/env bash
# The converged Fashion-MNIST study on a lent GPU machine, in calls of under 10 minutes that resume each other.
# Run from the synced project root with `bash scripts/gpu_fmnist.sh PHASE [key=value ...]`; the work happens in a
# copy of HEAD (.gpu/src.tgz, made here by `git archive --format=tar.gz -o .gpu/src.tgz HEAD`) under /tmp/study,
# which the machine keeps between calls while warm, so the synced tree (and any uncommitted work in it) is never used.
#   train P       dvc repro train@P (and prepare, classifier, reference first)
#   sweep ARGS    benchmarks/sampler_sweep.py on models/p_uncond=0.1 (resumable: skips settings already in its CSV)
#   study         dvc repro: every stage, with the overrides given after the phase
# Every phase takes the preset's params plus `key=value` overrides; results land in $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
SRC=$PWD
W=/tmp/study
if [ ! -d "$W" ]; then
  mkdir -p "$W" && tar -xzf "$SRC/.gpu/src.tgz" -C "$W" && cp -r "$SRC/.whl" "$SRC/.fmnist" "$W/"
fi
cd "$W" || exit 1
. .whl/gpu-env.sh >/dev/null || exit 1
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
phase=$1
shift
case "$phase" in
  train)
    p=$1
    shift
    python scripts/gpu_study.py presets/fashion_mnist_gpu.yaml data.root=.fmnist "$@" --targets "train@$p" --out "$OUT"
    cp "models/p_uncond=$p/eval.csv" "$OUT/eval_p$p.csv" 2>/dev/null
    cp "models/p_uncond=$p/loss.csv" "$OUT/loss_p$p.csv" 2>/dev/null
    ;;
  sweep)
    python benchmarks/sampler_sweep.py --checkpoint "models/p_uncond=0.1/checkpoint.pt" \
      --classifier models/classifier.pt --reference data/reference.pt --compile --resume "$@"
    ;;
  study)
    python scripts/gpu_study.py presets/fashion_mnist_gpu.yaml data.root=.fmnist "$@" --out "$OUT"
    ;;
  *)
    echo "unknown phase $phase" >&2
    exit 2
    ;;
esac
