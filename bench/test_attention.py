"""Forward timing of ropefast against the pipeline a user would otherwise build.

On a machine without a GPU this times small shapes on the CPU: those numbers say nothing
about GPU speed (the benchmark names carry the device).
"""

import pytest
import torch
import torch.nn.functional as F

from ropefast import scaled_rope_attention, schedules
from ropefast.reference import rotate

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(2, 256, 4, 64)] if DEVICE == "cpu" else [(16, 1024, 16, 128), (4, 4096, 16, 128), (1, 16384, 16, 128)]


def _inputs(batch, seq, heads, head_dim):
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    q, k, v = (torch.randn(batch, seq, heads, head_dim, device=DEVICE, dtype=dtype) for _ in range(3))
    return q, k, v, schedules.YaRN(head_dim, factor=4.0, original_max_position_embeddings=4096)


def _eager_rope_sdpa(q, k, v, schedule):
    pos = torch.arange(q.shape[1], device=q.device)[None]
    freq = schedule.inv_freq(device=q.device)
    m = schedule.rotary_scale()
    q_rot, k_rot = (rotate(x, pos, freq, rotary_scale=m).to(x.dtype) for x in (q, k))
    return F.scaled_dot_product_attention(q_rot.transpose(1, 2), k_rot.transpose(1, 2), v.transpose(1, 2))


IMPLS = {
    "ropefast": lambda q, k, v, s: scaled_rope_attention(q, k, v, schedule=s),
    "eager_rope+sdpa": _eager_rope_sdpa,
}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{DEVICE}-B{s[0]}-N{s[1]}-H{s[2]}-D{s[3]}")
@pytest.mark.parametrize("impl", list(IMPLS))
def test_forward(benchmark, impl, shape):
    q, k, v, s = _inputs(*shape)
    fn = IMPLS[impl]

    def run():
        fn(q, k, v, s)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info["device"] = DEVICE
    benchmark(run)
