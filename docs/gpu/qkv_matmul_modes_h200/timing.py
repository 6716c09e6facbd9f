# the mean µs of n back-to-back calls of fn after `warm` untimed ones, by CUDA events: mm*.py's timer (each of them
# had its own copy when they ran; mm.py and mm2.py warmed 3 calls and timed 20, mm3.py and mm4.py 2 and 10)
import torch


def event_us(fn, n, warm):
    for _ in range(warm):
        fn()
    s, e = torch.cuda.Event(True), torch.cuda.Event(True)
    torch.cuda.synchronize()
    s.record()
    for _ in range(n):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / n * 1000
