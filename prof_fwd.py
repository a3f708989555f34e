import torch, triton, sys
from torch.profiler import profile, ProfilerActivity
from ropefast import schedules, scaled_rope_attention
from ropefast.kernels import attention_fwd
from ropefast.kernels.rotary import turn_increments
for n in (1024, 16384):
    B = 16384 // n; H, D = 16, 128
    q, k, v = (torch.randn(B, n, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    sched = schedules.YaRN(D, factor=4.0, original_max_position_embeddings=4096)
    inc = turn_increments(sched.inv_freq(device="cuda"))
    fn = lambda: attention_fwd.rope_attention_fwd(q, k, v, inc, None, None, None, rotary_dim=D, interleaved=False,
        causal=False, softmax_scale=D**-0.5, rotary_scale=1.0, layout="bshd")
    api = lambda: scaled_rope_attention(q, k, v, schedule=sched)
    fn(); api(); torch.cuda.synchronize()
    flops = 4 * B * H * n * n * D
    for name, f in (("launcher", fn), ("api", api)):
        ms = triton.testing.do_bench(f, return_mode="median")
        msg = triton.testing.do_bench_cudagraph(f, return_mode="median")
        import time; torch.cuda.synchronize(); t=time.perf_counter()
        for _ in range(20): f()
        host = (time.perf_counter()-t)/20*1e3; torch.cuda.synchronize()
        print(f"N={n} {name}: do_bench {ms:.3f} ms ({flops/ms/1e9:.0f} TF/s), cudagraph {msg:.3f} ms ({flops/msg/1e9:.0f}), host-enqueue {host:.3f} ms")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5): api()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=50))
k = attention_fwd.rope_attention_fwd_kernel
try:
    for dev, entry in k.device_caches.items():
        cache = entry[0]
        for key, c in cache.items():
            print("regs", c.n_regs, "spills", c.n_spills, "warps", c.metadata.num_warps, "stages", c.metadata.num_stages)
except Exception as e:
    print("cache introspection failed", repr(e))
