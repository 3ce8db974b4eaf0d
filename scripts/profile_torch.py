"""Where the torch backend's time goes on a CUDA device (a development aid)."""

import os
import time

import autogaze_wgpu as ag
import torch
from autogaze_wgpu.testing import synthetic_video

model_dir = os.path.join(os.environ["AUTOGAZE_FIXTURES"], "model")
proc = ag.AutoGazeProcessor.from_pretrained(model_dir)
clip = proc(synthetic_video(16, 224, 224, seed=7))
for sps in (4, 8, 32):
    m = ag.AutoGaze.from_pretrained(model_dir, backend="torch", device="cuda")
    m.backend.steps_per_sync = sps
    m.generate(clip)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(3):
        m.generate(clip)
    print(f"steps_per_sync={sps}: {(time.perf_counter() - t0) / 3 * 1e3:.1f} ms", flush=True)
be = m.backend
t0 = time.perf_counter(); emb = be.embed(clip); torch.cuda.synchronize(); print(f"embed {1e3*(time.perf_counter()-t0):.1f} ms")
from torch.profiler import ProfilerActivity, profile

with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    m.generate(clip)
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), flush=True)
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))
