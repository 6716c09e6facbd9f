# one process, both statistics forms one after another: the qkv matmul's mean launch by key_averages (as
# profile_step's CSV) and by the per-launch trace of the same compiled step
import contextlib, json, torch
from torch.profiler import ProfilerActivity, profile
from profile_step import preset_params, preset_unet, sample_fn, welford_statistics, cudnn_autotuning
from cfg.engine.device import configure_cuda
configure_cuda()
config = preset_unet(preset_params("presets/fashion_mnist_gpu.yaml"))
K = "nvjet_sm90_tst_192x192"
for which in ("welford", "sums", "welford"):
    torch._dynamo.reset()
    with (welford_statistics() if which == "welford" else contextlib.nullcontext()), cudnn_autotuning(True):
        step = sample_fn(config, torch.channels_last, "default", 3750)
        for _ in range(3): step()
        torch.cuda.synchronize()
        for rep in range(2):
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(3): step()
                torch.cuda.synchronize()
            ka = [e for e in prof.key_averages() if e.key.startswith(K)]
            prof.export_chrome_trace("/tmp/t.json")
            ev = [e for e in json.load(open("/tmp/t.json"))["traceEvents"] if e.get("cat") == "kernel" and e["name"].startswith(K)]
            big = [e["dur"] for e in ev if e["dur"] > 400]; small = [e["dur"] for e in ev if e["dur"] <= 400]
            grids = {str(e["args"].get("grid")) for e in ev}
            print(f"{which} rep {rep}: key_averages {ka[0].self_device_time_total / ka[0].count:.1f} us x {ka[0].count}; "
                  f"trace mean {sum(e['dur'] for e in ev) / len(ev):.1f} us x {len(ev)}, 16x16 {min(big, default=0):.0f}-{max(big, default=0):.0f} (n {len(big)}), "
                  f"8x8 {min(small, default=0):.0f}-{max(small, default=0):.0f} (n {len(small)}), grids {grids}", flush=True)
    del step
    torch.cuda.empty_cache()
