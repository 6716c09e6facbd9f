#!/usr/bin/env bash
# The converged Fashion-MNIST study on a lent GPU machine, in calls of under 10 minutes that resume each other.
# Run from the synced project root with `bash scripts/gpu_fmnist.sh PHASE [key=value ...]`; the work happens in a
# copy of HEAD (.gpu/src.tgz, made here by `git archive --format=tar.gz -o .gpu/src.tgz HEAD`) under /tmp/study,
# which the machine keeps between calls while warm, so the synced tree (and any uncommitted work in it) is never used.
#   train P       dvc repro train@P (and prepare, classifier, reference first)
#   sweep ARGS    benchmarks/sampler_sweep.py on models/p_uncond=0.1 (resumable: skips settings already in its CSV)
#   study         dvc repro: every stage, with the overrides given after the phase
#   gate          the CUDA-graph training test (fp32, eager network) on the last GPU: writes true/false to cg
#   start ARGS    cfg-lab repro --parallel of the preset + ARGS (key=value or more preset files) in a new process
#                 session (it outlives the call while the machine stays warm); its log in run.log, its exit status
#                 in run.rc, each GPU's utilisation every 5 s in gpu_util.csv; GPUS=0,1,2 limits its GPUs
#   benchmarks G  in a new process session on GPU G alone: benchmarks/bench_throughput.py (with its diffusers peer
#                 rows once a call has carried .whl_extra/, waiting up to 3 min for it), benchmarks/profile_step.py's
#                 kernels + cell + copies parts, its kernels part with flash attention only, the GPU tests, its loop
#                 and variants parts; log bench.log, exit status bench.rc
#   profile G ARGS  in a new process session on GPU G alone, at NICE (default 19: beside a measured study):
#                 benchmarks/profile_step.py ARGS; log bench.log, exit status bench.rc. Beside a study give it a
#                 STUDY_DIR of its own (e.g. STUDY_DIR=/tmp/prof): the same dir would share the study's Inductor
#                 cache (warming what the study should compile cold) and its bench.log
#   prep          only make the study dir (the copy of HEAD, the data): a later call may then start it carrying nothing
#   wait N        wait up to N seconds for the started run, then bundle what exists into $OUT/<study dir's name>.tgz;
#                 `wait @EPOCH` waits until that Unix time instead: a call that starts a study and waits in one
#                 command fixes its end before the start (`D=$(($(date +%s) + 560)); ... start ...; ... wait @$D`),
#                 since each phase spends tens of seconds setting up first (a `start` then `wait 555` ran past a
#                 call's 600 s and returned nothing)
# Every phase takes the preset's params plus `key=value` overrides; results land in $OUT. A call carries any of .whl/
# (the wheels of ../shared/device/wheels.sh), .fmnist/ (the IDX files) or .fmnist_xz/ (the same, smaller) and
# .whl_extra/ (diffusers and its dependencies, py3.12 wheels, for the peer rows); the first call needs .gpu/src.tgz
# and .whl. NICE=19 starts a study at low CPU priority (a side run that must not slow the one measured).
set -uo pipefail
export PYTHONUNBUFFERED=1
SRC=$PWD
# STUDY_DIR=/tmp/s2 keeps a second study apart (two can run side by side on one host's GPUs, e.g. GPUS=0,1 and
# GPUS=2); each study dir has its own Inductor cache, so each study compiles from an empty cache as a fresh
# machine does, whatever ran before it on the host
W=${STUDY_DIR:-/tmp/study}
# outside the study dir: DVC's git sees none of it. INDUCTOR_OF=/tmp/s4 uses that study dir's cache instead: a second
# study with the first one's compiled graphs, as on a lab machine that keeps its cache (a warm run)
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor_$(basename "${INDUCTOR_OF:-$W}")
# What a call carries (.gpu/src.tgz and the ignored folders below) is kept in $KEEP on the machine, since the synced
# tree of a later call may no longer hold it: a study dir made in a later call (a second STUDY_DIR) is made from there
KEEP=/tmp/cfg_carried
mkdir -p "$KEEP"
# $1 copied to $2, replacing it, under a temporary name first: a run waiting for $2 never reads it half-copied
copy_whole() {
  rm -rf "$2.tmp" && cp -r "$1" "$2.tmp" && rm -rf "$2" && mv "$2.tmp" "$2"
}
[ -f "$SRC/.gpu/src.tgz" ] && copy_whole "$SRC/.gpu/src.tgz" "$KEEP/src.tgz"
# the ignored helper folders this call carried (all of them may not fit one call's 64 MiB: they can come in turns),
# each replacing what an earlier call kept
for d in .whl .fmnist .whl_extra; do
  [ -d "$SRC/$d" ] && copy_whole "$SRC/$d" "$KEEP/$d"
done
# or the IDX files xz-compressed (.fmnist_xz/*.xz, 26 MB against the original .gz files' 31 MB), so that .whl, the
# data and the tree fit one call; made here by
#   mkdir -p .fmnist_xz && for f in .fmnist/*.gz; do zcat "$f" | xz -9e >".fmnist_xz/$(basename "${f%.gz}").xz"; done
if [ -d "$SRC/.fmnist_xz" ] && [ ! -d "$KEEP/.fmnist" ]; then
  mkdir -p "$KEEP/.fmnist.tmp" && for f in "$SRC"/.fmnist_xz/*.xz; do
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
      "$f" "$KEEP/.fmnist.tmp/$(basename "${f%.xz}")" || exit 1
  done && mv "$KEEP/.fmnist.tmp" "$KEEP/.fmnist"
fi
if [ ! -d "$W" ]; then
  [ -f "$KEEP/src.tgz" ] || { echo "no .gpu/src.tgz carried to this machine yet" >&2; exit 1; }
  mkdir -p "$W" && tar -xzf "$KEEP/src.tgz" -C "$W" || exit 1
fi
for d in .whl .fmnist .whl_extra; do
  [ -d "$KEEP/$d" ] && [ ! -d "$W/$d" ] && copy_whole "$KEEP/$d" "$W/$d"
done
cd "$W" || exit 1
. .whl/gpu-env.sh >/dev/null || exit 1
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
phase=$1
shift
bundle() {  # a lent machine returns at most 8 files: everything worth keeping goes into one
  tar -czf "$OUT/$(basename "$W").tgz" --ignore-failed-read params.yaml dvc.lock run.log bench.log gpu_util.csv results/tradeoff.csv \
    results/metrics.json results/report.md results/plots results/cells results/classifier.json \
    samples/*/grid.png samples/*/sample.json models/*/eval.csv models/*/loss.csv models/*/train.json 2>/dev/null
  ls -la "$OUT"
}
case "$phase" in
  gate)
    gpu=$(($(nvidia-smi -L | wc -l) - 1))
    if CUDA_VISIBLE_DEVICES=$gpu python -m pytest -q -x -p no:cacheprovider -m gpu tests/test_gpu.py -k "cuda_graph and eager_net"; then
      echo true >cg
    else
      echo false >cg
    fi
    echo "cuda_graph gate: $(cat cg)"
    ;;
  start)
    [ -d .fmnist ] || { echo "no .fmnist/ in $W: carry it with this call" >&2; exit 1; }
    rm -f run.rc
    [ -n "${GPUS:-}" ] && export CUDA_VISIBLE_DEVICES=$GPUS
    setsid nice -n "${NICE:-0}" bash -c "python scripts/gpu_study.py presets/fashion_mnist_gpu.yaml data.root=.fmnist $* --out gpu_out --parallel >run.log 2>&1; echo \$? >run.rc" </dev/null >/dev/null 2>&1 &
    # how busy each GPU was every 5 s while the study ran (where its schedule leaves a GPU idle), until run.rc exists
    setsid bash -c "while [ ! -f run.rc ]; do nvidia-smi --query-gpu=timestamp,index,utilization.gpu,memory.used --format=csv,noheader; sleep 5; done >gpu_util.csv 2>&1" </dev/null >/dev/null 2>&1 &
    echo "started: $*"
    ;;
  benchmarks)
    rm -f bench.rc
    setsid bash -c "CUDA_VISIBLE_DEVICES=$1 bash scripts/gpu_fmnist.sh benchmarks-run >bench.log 2>&1; echo \$? >bench.rc" </dev/null >/dev/null 2>&1 &
    echo "benchmarks started on GPU $1"
    ;;
  profile)
    rm -f bench.rc
    g=$1
    shift
    setsid nice -n "${NICE:-19}" bash -c "CUDA_VISIBLE_DEVICES=$g timeout 1700 python benchmarks/profile_step.py $* >bench.log 2>&1; echo \$? >bench.rc" </dev/null >/dev/null 2>&1 &
    echo "profile_step.py $* started on GPU $g"
    ;;
  benchmarks-run)  # what `benchmarks` runs in the background
    for _ in $(seq 36); do [ -d .whl_extra ] && break; sleep 5; done
    # diffusers' own versions of its dependencies, first on the path of this run only
    [ -d .whl_extra ] && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site2 .whl_extra/*.whl
    PYTHONPATH=/tmp/site2:$PYTHONPATH timeout 900 python benchmarks/bench_throughput.py --preset presets/fashion_mnist_gpu.yaml --seconds 3
    timeout 600 python benchmarks/profile_step.py --only kernels,cell,copies --seconds 2
    timeout 600 python benchmarks/profile_step.py --only kernels --sdpa flash --seconds 2
    timeout 600 python -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py
    timeout 600 python benchmarks/profile_step.py --only loop --loop-steps 300 --seconds 2
    timeout 1200 python benchmarks/profile_step.py --only variants --autotune --seconds 2
    ;;
  wait)
    arg=${1:-540}
    if [ "${arg#@}" != "$arg" ]; then end=$((SECONDS + ${arg#@} - $(date +%s))); else end=$((SECONDS + arg)); fi
    while [ ! -f run.rc ] && [ $SECONDS -lt $end ]; do sleep 5; done
    grep -v " ETA " run.log | tail -n 60
    [ -f run.rc ] && echo "run exit $(cat run.rc)"
    [ -f bench.log ] && { echo "--- bench.log (rc $(cat bench.rc 2>/dev/null))"; grep -v "^\[\|ETA\|it/s" bench.log | tail -n 40; }
    bundle
    ;;
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
  prep)
    echo "study dir $W ready"
    ;;
  *)
    echo "unknown phase $phase" >&2
    exit 2
    ;;
esac
