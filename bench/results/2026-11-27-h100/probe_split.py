"""Probe: the shared Gluon probe's non-causal forward with key tiles of 128 (as shipped) or of
192 = 128 + 64 (FlashAttention-3 takes 176 keys a tile at D = 128, non-causal; Triton shapes
must be powers of two, so the tile is two wgmma halves: S_a [64, 128] and S_b [64, 64], their
P halves, and two PV wgmmas into one accumulator). No RoPE. N % 192 == 0 and N % 128 == 0.
python exp/probe_split.py --compile-only | python exp/probe_split.py (times both and cuDNN)."""
import math, os, re, subprocess, sys, tempfile
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (tma, mbarrier, fence_async_shared, warpgroup_mma,
                                                               warpgroup_mma_wait)
if hasattr(tma, "async_load"):
    tma_load, tma_store = tma.async_load, tma.async_store
else:
    tma_load, tma_store = tma.async_copy_global_to_shared, tma.async_copy_shared_to_global

WG_ROWS = gl.constexpr(64)
BLOCK_M = gl.constexpr(128)
NB = gl.constexpr(64)  # the second part of a split key tile


@gluon.jit
def _producer(q_desc, k_desc, v_desc, kb_desc, vb_desc, q_smem, k_smem, v_smem, kb_smem, vb_smem, q_bar, k_ready,
              k_empty, v_ready, v_empty, q_row, kv_row, n_tiles, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
              SPLIT: gl.constexpr):
    mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
    tma_load(q_desc, [q_row, 0], q_bar, q_smem.index(0))
    tma_load(q_desc, [q_row + WG_ROWS, 0], q_bar, q_smem.index(1))
    TILE: gl.constexpr = BLOCK_N + NB if SPLIT else BLOCK_N
    for i in range(n_tiles):
        s = i % STAGES
        ph = (i // STAGES) & 1
        mbarrier.wait(k_empty.index(s), ph ^ 1)
        if SPLIT:
            mbarrier.expect(k_ready.index(s), k_desc.block_type.nbytes + kb_desc.block_type.nbytes)
            tma_load(k_desc, [kv_row + i * TILE, 0], k_ready.index(s), k_smem.index(s))
            tma_load(kb_desc, [kv_row + i * TILE + BLOCK_N, 0], k_ready.index(s), kb_smem.index(s))
        else:
            mbarrier.expect(k_ready.index(s), k_desc.block_type.nbytes)
            tma_load(k_desc, [kv_row + i * TILE, 0], k_ready.index(s), k_smem.index(s))
        mbarrier.wait(v_empty.index(s), ph ^ 1)
        if SPLIT:
            mbarrier.expect(v_ready.index(s), v_desc.block_type.nbytes + vb_desc.block_type.nbytes)
            tma_load(v_desc, [kv_row + i * TILE, 0], v_ready.index(s), v_smem.index(s))
            tma_load(vb_desc, [kv_row + i * TILE + BLOCK_N, 0], v_ready.index(s), vb_smem.index(s))
        else:
            mbarrier.expect(v_ready.index(s), v_desc.block_type.nbytes)
            tma_load(v_desc, [kv_row + i * TILE, 0], v_ready.index(s), v_smem.index(s))


@gluon.jit
def _issue_s(q, k_smem, kb_smem, stage, BLOCK_N: gl.constexpr, SPLIT: gl.constexpr, S_L: gl.constexpr,
             SB_L: gl.constexpr):
    s = warpgroup_mma(q, k_smem.index(stage).permute((1, 0)), gl.zeros([WG_ROWS, BLOCK_N], gl.float32, S_L),
                      use_acc=False, is_async=True)
    if SPLIT:
        sb = warpgroup_mma(q, kb_smem.index(stage).permute((1, 0)), gl.zeros([WG_ROWS, NB], gl.float32, SB_L),
                           use_acc=False, is_async=True)
    else:
        sb = s
    return s, sb


@gluon.jit
def _softmax(s, sb, m_i, l_i, qk_scale, SPLIT: gl.constexpr, ROW_S: gl.constexpr, ROW_B: gl.constexpr):
    s = s * qk_scale
    m_new = gl.maximum(m_i, gl.max(s, axis=1))
    if SPLIT:
        sb = sb * qk_scale
        m_new = gl.maximum(m_new, gl.convert_layout(gl.max(sb, axis=1), ROW_S))
    p = gl.exp2(s - gl.expand_dims(m_new, 1))
    alpha = gl.exp2(m_i - m_new)
    rs = gl.sum(p, axis=1)
    if SPLIT:
        pb = gl.exp2(sb - gl.expand_dims(gl.convert_layout(m_new, ROW_B), 1))
        rs = rs + gl.convert_layout(gl.sum(pb, axis=1), ROW_S)
    else:
        pb = p
    return p, pb, m_new, l_i * alpha + rs, alpha


@gluon.jit
def _consumer(q_smem, k_smem, v_smem, kb_smem, vb_smem, q_bar, k_ready, k_empty, v_ready, v_empty, tok_mine,
              tok_other, o_desc, q_row, n_tiles, qk_scale, CID: gl.constexpr, HEAD_DIM: gl.constexpr,
              BLOCK_N: gl.constexpr, STAGES: gl.constexpr, SPLIT: gl.constexpr):
    S_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
    SB_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, NB, 16])
    O_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16])
    P_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=O_L, k_width=2)
    ROW_S: gl.constexpr = gl.SliceLayout(1, S_L)
    ROW_B: gl.constexpr = gl.SliceLayout(1, SB_L)
    ROW_O: gl.constexpr = gl.SliceLayout(1, O_L)
    dtype: gl.constexpr = v_smem.dtype
    q = q_smem.index(CID)
    acc = gl.zeros([WG_ROWS, HEAD_DIM], gl.float32, O_L)
    m_i = gl.full([WG_ROWS], float("-inf"), gl.float32, ROW_S)
    l_i = gl.full([WG_ROWS], 0.0, gl.float32, ROW_S)
    mbarrier.wait(q_bar, 0)
    # tile 0: S only
    mbarrier.wait(k_ready.index(0), 0)
    mbarrier.wait(tok_mine, 0)
    s, sb = _issue_s(q, k_smem, kb_smem, 0, BLOCK_N, SPLIT, S_L, SB_L)
    mbarrier.arrive(tok_other, count=1)
    if SPLIT:
        s, sb = warpgroup_mma_wait(0, deps=[s, sb])
    else:
        s = warpgroup_mma_wait(0, deps=[s])
        sb = s
    mbarrier.arrive(k_empty.index(0), count=1)
    pf, pbf, m_i, l_i, alpha = _softmax(s, sb, m_i, l_i, qk_scale, SPLIT, ROW_S, ROW_B)
    p = gl.convert_layout(pf.to(dtype), P_L)
    pb = gl.convert_layout(pbf.to(dtype), P_L)
    tok_phase = 1
    for j in range(1, n_tiles):
        stage = j % STAGES
        prev = (j - 1) % STAGES
        mbarrier.wait(k_ready.index(stage), (j // STAGES) & 1)
        mbarrier.wait(v_ready.index(prev), ((j - 1) // STAGES) & 1)
        mbarrier.wait(tok_mine, tok_phase)
        s, sb = _issue_s(q, k_smem, kb_smem, stage, BLOCK_N, SPLIT, S_L, SB_L)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, ROW_O), 1)
        acc = warpgroup_mma(p, v_smem.index(prev), acc, is_async=True)
        if SPLIT:
            acc = warpgroup_mma(pb, vb_smem.index(prev), acc, is_async=True)
        mbarrier.arrive(tok_other, count=1)
        if SPLIT:
            s, sb = warpgroup_mma_wait(2, deps=[s, sb])
        else:
            s = warpgroup_mma_wait(1, deps=[s])
            sb = s
        mbarrier.arrive(k_empty.index(stage), count=1)
        pf, pbf, m_i, l_i, alpha = _softmax(s, sb, m_i, l_i, qk_scale, SPLIT, ROW_S, ROW_B)
        if SPLIT:
            acc, p, pb = warpgroup_mma_wait(0, deps=[acc, p, pb])
        else:
            acc, p = warpgroup_mma_wait(0, deps=[acc, p])
        mbarrier.arrive(v_empty.index(prev), count=1)
        p = gl.convert_layout(pf.to(dtype), P_L)
        pb = gl.convert_layout(pbf.to(dtype), P_L)
        tok_phase ^= 1
    sl = (n_tiles - 1) % STAGES
    mbarrier.wait(v_ready.index(sl), ((n_tiles - 1) // STAGES) & 1)
    acc = acc * gl.expand_dims(gl.convert_layout(alpha, ROW_O), 1)
    acc = warpgroup_mma(p, v_smem.index(sl), acc, is_async=True)
    if SPLIT:
        acc = warpgroup_mma(pb, vb_smem.index(sl), acc, is_async=True)
    acc = warpgroup_mma_wait(0, deps=[acc])
    mbarrier.arrive(v_empty.index(sl), count=1)
    acc = acc / gl.expand_dims(gl.convert_layout(l_i, ROW_O), 1)
    q.store(acc.to(dtype))
    fence_async_shared()
    tma_store(o_desc, [q_row + CID * WG_ROWS, 0], q)
    tma.store_wait(0)


@gluon.jit
def split_fwd_kernel(q_desc, k_desc, v_desc, kb_desc, vb_desc, o_desc, N_CTX, qk_scale, HEAD_DIM: gl.constexpr,
                     BLOCK_N: gl.constexpr, STAGES: gl.constexpr, SPLIT: gl.constexpr):
    pid_m = gl.program_id(0)
    off_hz = gl.program_id(1)
    q_row = off_hz * N_CTX + pid_m * BLOCK_M
    kv_row = off_hz * N_CTX
    TILE: gl.constexpr = BLOCK_N + NB if SPLIT else BLOCK_N
    n_tiles = N_CTX // TILE
    dtype: gl.constexpr = q_desc.dtype
    q_smem = gl.allocate_shared_memory(dtype, [2, WG_ROWS, HEAD_DIM], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
    if SPLIT:
        kb_smem = gl.allocate_shared_memory(dtype, [STAGES, NB, HEAD_DIM], kb_desc.layout)
        vb_smem = gl.allocate_shared_memory(dtype, [STAGES, NB, HEAD_DIM], vb_desc.layout)
    else:
        kb_smem = k_smem
        vb_smem = v_smem
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    tok = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)
        mbarrier.init(v_empty.index(i), count=2)
    mbarrier.init(tok.index(0), count=1)
    mbarrier.init(tok.index(1), count=1)
    fence_async_shared()
    mbarrier.arrive(tok.index(0), count=1)
    gl.warp_specialize([
        (_producer, (q_desc, k_desc, v_desc, kb_desc, vb_desc, q_smem, k_smem, v_smem, kb_smem, vb_smem, q_bar,
                     k_ready, k_empty, v_ready, v_empty, q_row, kv_row, n_tiles, BLOCK_N, STAGES, SPLIT)),
        (_consumer, (q_smem, k_smem, v_smem, kb_smem, vb_smem, q_bar, k_ready, k_empty, v_ready, v_empty,
                     tok.index(0), tok.index(1), o_desc, q_row, n_tiles, qk_scale, 0, HEAD_DIM, BLOCK_N, STAGES,
                     SPLIT)),
        (_consumer, (q_smem, k_smem, v_smem, kb_smem, vb_smem, q_bar, k_ready, k_empty, v_ready, v_empty,
                     tok.index(1), tok.index(0), o_desc, q_row, n_tiles, qk_scale, 1, HEAD_DIM, BLOCK_N, STAGES,
                     SPLIT)),
    ], [4, 4], [240, 240])


def _layouts(D, gdt):
    return (gl.NVMMASharedLayout.get_default_for([64, D], gdt), gl.NVMMASharedLayout.get_default_for([128, D], gdt),
            gl.NVMMASharedLayout.get_default_for([64, D], gdt))


def attention(q, k, v, sm_scale, split):
    import torch
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    B, H, N, D = q.shape
    o = torch.empty_like(q)
    q2, k2, v2, o2 = (t.view(B * H * N, D) for t in (q, k, v, o))
    ql, kl, bl = _layouts(D, gl.bfloat16)
    qd = TensorDescriptor.from_tensor(q2, [64, D], ql)
    od = TensorDescriptor.from_tensor(o2, [64, D], ql)
    kd, vd = (TensorDescriptor.from_tensor(t, [128, D], kl) for t in (k2, v2))
    kbd, vbd = (TensorDescriptor.from_tensor(t, [64, D], bl) for t in (k2, v2))
    split_fwd_kernel[(N // 128, B * H)](qd, kd, vd, kbd, vbd, od, N, sm_scale * 1.4426950408889634, D, 128, 2, split,
                                        num_warps=4, maxnreg=168)
    return o


def compile_only(split, D=128):
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    ql, kl, bl = _layouts(D, gl.bfloat16)
    desc = lambda rows, lay: f"tensordesc<bf16[{rows}, {D}],{lay!r}>"
    args = dict(q_desc=desc(64, ql), k_desc=desc(128, kl), v_desc=desc(128, kl), kb_desc=desc(64, bl),
                vb_desc=desc(64, bl), o_desc=desc(64, ql), N_CTX="i32", qk_scale="fp32", HEAD_DIM=(D,),
                BLOCK_N=(128,), STAGES=(2,), SPLIT=(split,))
    sig, constexprs = {}, {}
    for i, (name, spec) in enumerate(args.items()):
        sig[name] = spec if isinstance(spec, str) else "constexpr"
        if not isinstance(spec, str):
            constexprs[(i,)] = spec[0]
    k = triton.compile(GluonASTSource(fn=split_fwd_kernel, signature=sig, constexprs=constexprs),
                       target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, maxnreg=168))
    from triton.backends.nvidia.compiler import get_ptxas
    ptxas = get_ptxas(90).path
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "k.ptx")
        open(p, "w").write(k.asm["ptx"])
        r = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", p, "-o", os.path.join(d, "k.cubin")],
                           capture_output=True, text=True)
        print("split" if split else "128", [l.strip() for l in (r.stdout + r.stderr).splitlines() if "spill" in l or "registers" in l])
        open(f"/tmp/split_{int(split)}.cubin", "wb").write(open(os.path.join(d, "k.cubin"), "rb").read())
    return k


def main():
    if "--compile-only" in sys.argv:
        for split in (False, True):
            compile_only(split)
        return 0
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    torch.manual_seed(0)
    ok = True
    qs, ks, vs = (torch.randn(1, 2, 768, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ref = F.scaled_dot_product_attention(qs.float(), ks.float(), vs.float(), scale=128 ** -0.5)
    for split in (False, True):
        err = (attention(qs, ks, vs, 128 ** -0.5, split).float() - ref).abs().max().item()
        print(f"split={split}: max |out - fp32 ref| = {err:.2e}")
        ok &= err < 2e-2
    shapes = [(4, 32, 3072), (2, 32, 6144), (16, 16, 768), (1, 16, 12288)]
    rounds = int(os.environ.get("ROUNDS", 3))
    rows = []
    for B, H, N in shapes:
        q, k, v = (torch.randn(B, H, N, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        flops = 4 * B * H * N * N * 128
        def cudnn():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, scale=128 ** -0.5)
        fns = {"128": lambda: attention(q, k, v, 128 ** -0.5, False), "192": lambda: attention(q, k, v, 128 ** -0.5, True),
               "cudnn": cudnn}
        res = {n: [] for n in fns}
        for r in range(rounds):
            order = list(fns) if r % 2 == 0 else list(reversed(list(fns)))
            for n in order:
                res[n].append(flops / triton.testing.do_bench(fns[n], warmup=50, rep=300) * 1e-9)
        line = f"B{B} H{H} N{N} full: " + "  ".join(f"{n} {' '.join(f'{x:.0f}' for x in v)}" for n, v in res.items())
        ratio = [b / a for a, b in zip(res["128"], res["192"])]
        vs_c = [b / c for b, c in zip(res["192"], res["cudnn"])]
        v128 = [a / c for a, c in zip(res["128"], res["cudnn"])]
        line += f" | 192/128 {min(ratio):.3f}-{max(ratio):.3f}  192/cuDNN {min(vs_c):.3f}-{max(vs_c):.3f}  128/cuDNN {min(v128):.3f}-{max(v128):.3f}"
        print(line, flush=True)
        rows.append(line)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
