# The script as run (on this machine, after call 1): per Triton kernel of a compiled step, the bytes Inductor
# estimates it moves (`kernel_num_gb` in its inductor_meta, written when TORCHINDUCTOR_BENCHMARK_KERNEL=1) joined
# with the device time of a profile_step --kernels-out CSV of the same process.
#   python bandwidth.py OUTPUT_CODE.py KERNELS.csv [ROWS]
# OUTPUT_CODE.py: one graph's module from TORCH_LOGS=output_code, the log prefix stripped.
import re,csv,sys
code, kcsv = sys.argv[1], sys.argv[2]
src=open(code).read()
gb={}
for m in re.finditer(r"async_compile\.triton\('(\w+)', '''(.*?)'''", src, re.S):
    g=re.search(r"'kernel_num_gb': ([0-9.e-]+)", m.group(2))
    if g: gb[m.group(1)]=float(g.group(1))
rows=list(csv.DictReader(open(kcsv)))
tot_t=tot_gb=0; out=[]; other=0
for r in rows:
    k=r['kernel']; n=float(r['launches_per_step']); us=float(r['us_per_step'])
    if k in gb:
        g=gb[k]*n; out.append((us,g,k,n)); tot_t+=us; tot_gb+=g
    else: other+=us
out.sort(reverse=True)
for us,g,k,n in out[:int(sys.argv[3]) if len(sys.argv)>3 else 40]:
    print(f"{us/1000:7.3f} ms {g:7.2f} GB {g/us*1e3 if us else 0:5.2f} TB/s n={n:.0f} {k[:100]}")
print(f"triton {tot_t/1000:.2f} ms {tot_gb:.1f} GB {tot_gb/tot_t*1e3:.2f} TB/s; at 4.2 TB/s {tot_gb/4.2:.2f} ms; non-triton {other/1000:.2f} ms; {len(gb)} kernels with num_gb")
