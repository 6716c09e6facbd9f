export PYTHONPATH=$PWD:$PWD/benchmarks TORCHINDUCTOR_CACHE_DIR=/tmp/ind TRITON_CACHE_DIR=/tmp/tri
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/modes.txt
r() { timeout $1 python -u .gpu/modes.py $2 2>&1 | grep -E "us x|Error" | tee -a $OUT/modes.txt; }
r 150 base
CUBLASLT_WORKSPACE_SIZE=65536 r 90 lt-64mib
CUBLASLT_WORKSPACE_SIZE=1024 r 90 lt-1mib
TORCH_CUBLAS_WORKSPACE_CACHE=1 r 90 ws-cache
r 90 plain-mm-first
r 90 clear-workspaces
r 120 recompile
r 90 base
