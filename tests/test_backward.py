"""The fused backward (dq, dk, dv, d inv_freq, d temperature, d lse) against autograd
through the float64 reference. CPU: Triton interpreter, fp32/fp16; GPU: bf16/fp16."""

import pytest
import torch

from ropefast import dispatch, scaled_rope_attention, schedules
from ropefast.reference import scaled_rope_attention_reference

from conftest import DEVICE, TOLERANCE, rel_err, requires_cuda, requires_kernel

NAMES = ("dq", "dk", "dv", "dinv_freq", "dtemperature")


def grad_errors(B, Nq, Nk, Hq, Hkv, D, R, dtype, *, interleaved=False, causal=False, layout="bshd",
                positions=False, temperature=True, rotary_scale=1.2, lse_grad=True, freq_grad=True, deterministic=False,
                seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape_q, shape_k = ((B, Nq, Hq, D), (B, Nk, Hkv, D)) if layout == "bshd" else ((B, Hq, Nq, D), (B, Hkv, Nk, D))
    q, k, v = (torch.randn(s, generator=gen).to(DEVICE, dtype).requires_grad_() for s in (shape_q, shape_k, shape_k))
    inv_freq = schedules.YaRN(R, factor=4.0, original_max_position_embeddings=64).inv_freq(device=DEVICE)
    inv_freq.requires_grad_(freq_grad)
    kw = dict(rotary_dim=R, interleaved=interleaved, causal=causal, layout=layout, rotary_scale=rotary_scale)
    if positions:
        kw["q_positions"] = torch.randint(0, 3000, (B, Nq), generator=gen).to(DEVICE)
        kw["k_positions"] = torch.randint(0, 3000, (Nk,), generator=gen).to(DEVICE)
    temp = (torch.rand(Nq, generator=gen) + 0.5).to(DEVICE).requires_grad_() if temperature else None
    out, lse = scaled_rope_attention(q, k, v, inv_freq=inv_freq, q_temperature=temp, return_lse=True,
                                     deterministic=deterministic, **kw)
    grad_out = torch.randn(out.shape, generator=gen).to(DEVICE, dtype)
    grad_lse = torch.randn(lse.shape, generator=gen).to(DEVICE) * lse_grad
    seen = torch.isfinite(lse)
    tensors = dict(zip(NAMES, (q, k, v, inv_freq, temp)))
    graded = [name for name, x in tensors.items() if x is not None and x.requires_grad]
    grads = torch.autograd.grad((out * grad_out).sum() + (lse[seen] * grad_lse[seen]).sum(),
                                [tensors[name] for name in graded])

    ref = {name: None if x is None else x.detach().double().requires_grad_(x.requires_grad)
           for name, x in tensors.items()}
    ref_out, ref_lse = scaled_rope_attention_reference(
        ref["dq"], ref["dk"], ref["dv"], inv_freq=ref["dinv_freq"], q_temperature=ref["dtemperature"],
        return_lse=True, **kw)
    ref_grads = torch.autograd.grad((ref_out * grad_out.double()).sum()
                                    + (ref_lse[seen] * grad_lse[seen].double()).sum(), [ref[name] for name in graded])
    return {name: rel_err(g, r) for name, g, r in zip(graded, grads, ref_grads)}


CPU_CASES = [
    ((1, 40, 40, 2, 2, 32, 32), dict()),
    ((2, 40, 40, 4, 2, 32, 32), dict(causal=True)),
    ((1, 24, 70, 4, 1, 32, 32), dict(causal=True, interleaved=True)),  # Nq < Nk, MQA
    ((1, 70, 33, 2, 1, 48, 32), dict(causal=True, lse_grad=False)),  # Nq > Nk: rows that see nothing
    ((1, 33, 40, 2, 2, 64, 32), dict(positions=True)),  # partial rotary
    ((1, 33, 47, 2, 2, 40, 24), dict(interleaved=True, positions=True)),  # non-power-of-two D and R
    ((2, 35, 35, 4, 2, 32, 32), dict(layout="bhsd", causal=True, temperature=False)),
]


@requires_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: "-".join(map(str, c[0])) + "-" + "-".join(c[1]))
def test_backward_small(case, dtype):
    errors = grad_errors(*case[0], dtype, **case[1])
    # fp16 gradients pass through fp16 dots twice (dS, then dS @ K): allow 2x the forward bound.
    bound = TOLERANCE[dtype] * (2 if dtype == torch.float16 else 1)
    assert all(err < bound for err in errors.values()), errors


@requires_kernel
def test_backward_is_deterministic():
    q, k, v = (torch.randn(1, 50, 4, 32, device=DEVICE, requires_grad=True) for _ in range(3))
    f = schedules.DefaultRope(32).inv_freq(device=DEVICE).requires_grad_()
    grads = []
    for _ in range(2):
        out = scaled_rope_attention(q, k[:, :, :2], v[:, :, :2], inv_freq=f, causal=True)
        grads.append(torch.autograd.grad(out.square().sum(), (q, k, v, f)))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@requires_kernel
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_gradients_keep_the_inputs_strides(layout):
    # The kernels work on sequence-major scratch; dq, dk, dv still come back shaped and
    # strided like q, k, v (no copy later in the user's graph).
    shape = (1, 40, 2, 32) if layout == "bshd" else (1, 2, 40, 32)
    q, k, v = (torch.randn(shape, device=DEVICE, requires_grad=True) for _ in range(3))
    f = schedules.DefaultRope(32).inv_freq(device=DEVICE)
    out = scaled_rope_attention(q, k, v, inv_freq=f, causal=True, layout=layout)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert [g.stride() for g in grads] == [x.stride() for x in (q, k, v)]


# (B, N, Hq, Hkv, D, R, interleaved, layout): on the Hopper path the Gluon forward stores the Q^
# it rotated (half-split, interleaved with D < its tile width), or the query rope pass writes
# it (partial half-split pairs: the kernel's tile is in the slot order); at D = 64 the slot order
# runs the portable forward, which rotates q in a pass anyway.
SAVED_Q_CASES = {"cpu": [(1, 40, 4, 2, 32, 32, False, "bshd"), (2, 33, 2, 1, 40, 24, True, "bhsd")],
                 "cuda": [(2, 300, 8, 2, 128, 128, False, "bshd"), (1, 200, 4, 4, 80, 80, True, "bhsd"),
                          (1, 257, 4, 1, 128, 64, False, "bshd"), (2, 190, 4, 2, 64, 64, False, "bhsd")]}


@requires_kernel
@pytest.mark.parametrize("case", SAVED_Q_CASES[DEVICE], ids=lambda c: "-".join(map(str, c)))
def test_backward_reads_the_queries_the_forward_saved(case, rope_passes):
    # A forward that autograd records saves Q^ (`ops.attention_fwd(save_q=True)`) in q's place:
    # its backward rotates no queries, gives dq q's strides, and matches the backward that
    # rotates q again (bitwise where the same rope pass wrote both Q^).
    from ropefast import ops
    from ropefast.kernels.attention_fwd import rotate_q_k

    B, N, Hq, Hkv, D, R, interleaved, layout = case
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)
    shapes = [(B, N, H, D) if layout == "bshd" else (B, H, N, D) for H in (Hq, Hkv, Hkv)]
    q, k, v = (torch.randn(shape, generator=gen).to(DEVICE, dtype) for shape in shapes)
    if layout == "bhsd":  # the kernels take [B, N, H, D] views
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    inv_freq = schedules.YaRN(R, factor=4.0, original_max_position_embeddings=64).inv_freq(device=DEVICE)
    temp = (torch.rand(B, N, generator=gen) + 0.5).to(DEVICE)
    grad = torch.randn(q.shape, generator=gen).to(DEVICE, dtype)
    args = (inv_freq, None, None, temp, R, interleaved, True, D**-0.5, 1.2)
    runs = []
    for save_q in (True, False):
        out, lse, q_rot = ops.attention_fwd(q, k, v, *args, save_q=save_q)
        grads = ops.attention_bwd(grad, None, q_rot if save_q else q, k, v, out, lse, *args, True, True,
                                  q_stride=list(q.stride()) if save_q else None)
        runs.append((out, lse, *grads))
        if save_q:
            saved = q_rot
    assert [queries for queries, _ in rope_passes] == [False, True]
    assert runs[0][2].stride() == q.stride()
    # the saved Q^ is the query pass's, up to rounding where the Gluon kernel rotated it
    q_pass, _ = rotate_q_k(q, k, inv_freq, None, None, temp, rotary_dim=R, interleaved=interleaved,
                           softmax_scale=D**-0.5, rotary_scale=1.2, keys=False)
    if DEVICE == "cpu":
        assert torch.equal(saved, q_pass) and all(torch.equal(a, b) for a, b in zip(*runs))
    else:
        assert saved.stride() == q_pass.stride() and rel_err(saved, q_pass) < 4e-3
        assert all(rel_err(a, b) < 1e-2 for a, b in zip(*runs))


@requires_kernel
@pytest.mark.parametrize("inputs", ["separate", "fused_qkv", "broadcast_q"])
def test_forward_saves_the_rotated_queries_where_that_costs_no_memory(inputs, rope_passes):
    # Q^ replaces q among the saved tensors, which costs nothing where q is a dense tensor
    # that dies after the call. Where q is a view of one QKV projection's output that k and v
    # view too, or broadcast (its storage smaller than Q^), the backward rotates q again, and
    # dq gets q's gradient right (a broadcast q's rows sum).
    gen = torch.Generator().manual_seed(0)
    inv_freq = schedules.DefaultRope(32).inv_freq(device=DEVICE)
    if inputs == "fused_qkv":  # dense slices of one tensor
        leaf = torch.randn(3, 1, 40, 4, 32, generator=gen).to(DEVICE).requires_grad_()
        q, k, v = leaf.unbind(0)
    else:
        leaf = torch.randn(1, 40, 4, 32, generator=gen).to(DEVICE).requires_grad_()
        batch = 2 if inputs == "broadcast_q" else 1
        k, v = (torch.randn(batch, 40, 4, 32, generator=gen).to(DEVICE) for _ in range(2))
        q = leaf.expand(2, -1, -1, -1) if inputs == "broadcast_q" else leaf
    grad = torch.autograd.grad(scaled_rope_attention(q, k, v, inv_freq=inv_freq, causal=True).square().sum(), leaf)[0]
    assert [queries for queries, _ in rope_passes] == [inputs != "separate"]
    if inputs == "broadcast_q":  # against a dense copy of q, whose Q^ the forward saves
        dense = leaf.detach().expand(2, -1, -1, -1).contiguous().requires_grad_()
        want = torch.autograd.grad(scaled_rope_attention(dense, k, v, inv_freq=inv_freq, causal=True).square().sum(),
                                   dense)[0].sum(0, keepdim=True)
        assert rel_err(grad, want) < 1e-6


@requires_kernel
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_dq_takes_the_saved_queries_storage_unless_the_graph_is_kept(layout):
    # The saved Q^ is dead once the backward has read it: dq is written into its storage (one
    # q-sized buffer less at the peak), with q's strides. retain_graph keeps Q^ for the next
    # backward, which then gives the same gradients.
    gen = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    shape = (2, 48, 4, 64) if layout == "bshd" else (2, 4, 48, 64)
    q, k, v = (torch.randn(shape, generator=gen).to(DEVICE, dtype).requires_grad_() for _ in range(3))
    yarn = schedules.YaRN(64, factor=4.0, original_max_position_embeddings=32)

    def saved_q_and_loss():
        out = scaled_rope_attention(q, k, v, schedule=yarn, causal=True, layout=layout)
        node = out.grad_fn if layout == "bshd" else out.grad_fn.next_functions[0][0]  # past the transpose
        return node.saved_tensors[0], out.float().square().sum()

    saved, loss = saved_q_and_loss()
    kept = [torch.autograd.grad(loss, (q, k, v), retain_graph=True), torch.autograd.grad(loss, (q, k, v))]
    assert kept[0][0].untyped_storage().data_ptr() != saved.untyped_storage().data_ptr()
    assert all(torch.equal(a, b) for a, b in zip(*kept))
    saved, loss = saved_q_and_loss()
    grads = torch.autograd.grad(loss, (q, k, v))
    assert grads[0].untyped_storage().data_ptr() == saved.untyped_storage().data_ptr()
    assert grads[0].stride() == q.stride()
    assert all(torch.equal(a, b) for a, b in zip(grads, kept[0]))


@requires_kernel
@pytest.mark.parametrize("head_dim", [64, 40] if DEVICE == "cpu" else [128, 80])
def test_saved_queries_handed_back_in_another_layout(head_dim):
    # A saved-tensor hook may hand the saved Q^ back in another layout than the forward wrote
    # (save_on_cpu copies it into a contiguous pinned buffer): the gradients stay the same.
    gen = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    q, k, v = (torch.randn(2, 48, 4, head_dim, generator=gen).to(DEVICE, dtype).requires_grad_() for _ in range(3))
    yarn = schedules.YaRN(head_dim, factor=4.0, original_max_position_embeddings=32)

    def gradients(unpack):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, unpack):
            out = scaled_rope_attention(q, k, v, schedule=yarn, causal=True)
        return torch.autograd.grad(out.float().square().sum(), (q, k, v))

    want, got = gradients(lambda t: t), gradients(lambda t: t.contiguous())
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    # dq of the Hopper backward sums with float32 atomics, in no fixed order
    assert torch.equal(got[0], want[0]) if DEVICE == "cpu" else rel_err(got[0], want[0]) < 1e-2


@requires_kernel
@pytest.mark.parametrize("dlse", [False, True])
def test_preprocess_pads_the_row_statistics_and_zeroes_the_dq_sums(dlse):
    # the Hopper backward reads lse2 and delta in whole 128-row tiles and sums dQ^ into a
    # float32 buffer: the preprocess writes both padded and zeroes the buffer in its launch
    from ropefast.kernels.attention_bwd import preprocess

    gen = torch.Generator().manual_seed(0)
    batch, nq, heads, head_dim, rows = 2, 70, 3, 40, 128
    out, do = (torch.randn(batch, nq, heads, head_dim, generator=gen).to(DEVICE) for _ in range(2))
    lse = torch.randn(batch, heads, nq, generator=gen).to(DEVICE)
    lse[0, 1, 5] = float("-inf")  # a row that saw no key
    grad_lse = torch.randn(batch, heads, nq, generator=gen).to(DEVICE) if dlse else None
    dq_sums = torch.full((batch, heads, rows, 64), float("nan"), device=DEVICE)
    delta, lse2 = preprocess(out, do, lse, grad_lse, rows=rows, dq_acc=dq_sums)
    want_delta = (out * do).sum(-1).transpose(1, 2) - (grad_lse if dlse else 0)
    want_lse2 = torch.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    assert delta.shape == lse2.shape == (batch, heads, rows)
    assert rel_err(delta[..., :nq], want_delta) < 1e-5 and not delta[..., nq:].any()
    assert rel_err(lse2[..., :nq][lse.isfinite()], want_lse2[lse.isfinite()]) < 1e-6
    assert lse2[0, 1, 5] == float("inf") and not lse2[..., nq:].any()
    assert not dq_sums.any()


def test_gradcheck_float64_reference_path():
    # float64 inputs take the reference (the kernels serve fp16/bf16/fp32): gradcheck the
    # ground truth itself, inv_freq and temperature included.
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 5, 2, 16, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(3))
    f = torch.tensor([1.0, 0.3, 0.1, 0.01], dtype=torch.float64, requires_grad=True)
    t = (torch.rand(5, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()

    def fn(q, k, v, f, t):
        return scaled_rope_attention(q, k, v, inv_freq=f, q_temperature=t, rotary_dim=8, causal=True,
                                     rotary_scale=1.1)

    assert torch.autograd.gradcheck(fn, (q, k, v, f, t))


GPU_CASES = [
    ((2, 1024, 1024, 16, 16, 128, 128), dict(causal=True)),
    ((2, 1024, 1024, 16, 16, 128, 128), dict()),
    ((1, 512, 2048, 32, 4, 128, 128), dict(causal=True)),  # Nq != Nk, GQA 8:1
    ((2, 777, 777, 8, 1, 64, 64), dict(causal=True, interleaved=True)),
    ((2, 1000, 1000, 8, 4, 64, 64), dict()),  # the Gluon forward's 192-row items save Q^
    ((1, 512, 512, 8, 2, 256, 256), dict(causal=True)),
    ((2, 1000, 1000, 8, 4, 256, 256), dict()),  # D = 256: the Gluon warpgroups split the features
    ((1, 300, 1100, 4, 2, 256, 128), dict(causal=True, interleaved=True, layout="bhsd")),
    ((1, 700, 300, 4, 1, 256, 192), dict(causal=True, positions=True)),
    ((2, 1000, 1000, 8, 8, 128, 64), dict(positions=True)),  # rotary_dim = D/2
    ((1, 700, 300, 4, 2, 128, 96), dict(causal=True)),  # Nq > Nk: rows that see nothing; partial rotary
    ((1, 300, 1100, 8, 2, 128, 128), dict(causal=True, layout="bhsd")),  # Nq < Nk, partial tiles
    ((3, 129, 129, 2, 2, 80, 80), dict(causal=True, interleaved=True)),  # D no power of two, one row past a tile
    ((2, 333, 333, 4, 2, 128, 128), dict(causal=True)),  # odd N: per-head rows of lse and delta unaligned
    ((4, 832, 832, 24, 8, 128, 128), dict(causal=True)),  # Gluon forward: 3 rounds of pair units, odd tile count
    ((4, 1024, 1024, 32, 8, 64, 64), dict()),  # full attention: the Hopper backward's programs run 1-2 items each
]


@requires_cuda
@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "-".join(map(str, c[0])) + "-" + "-".join(c[1]))
def test_backward_gpu(case, dtype, deterministic):
    errors = grad_errors(*case[0], dtype, deterministic=deterministic, **case[1])
    assert all(err < 2 * TOLERANCE[dtype] for err in errors.values()), errors


# Without the frequency gradient the Hopper backward rotates the keys itself, and dK^ back,
# where K^ is in the natural feature order (`kernels.rope.slot_order`): half-split pairs
# filling D (with positions too), or interleaved ones (partial, with positions; partial at
# D = 64); GQA with Nq != Nk, rows that see no key, fewer keys than a warpgroup's 64, D = 64.
# At D = 256 (last) it takes K^ from the rope pass: its warpgroups split each key's features.
KEYS_INSIDE_CASES = [
    ((2, 1024, 1024, 16, 16, 128, 128), dict(causal=True)),
    ((1, 512, 2048, 32, 4, 128, 128), dict(causal=True)),
    ((2, 1000, 1000, 8, 8, 128, 64), dict(interleaved=True, positions=True)),
    ((2, 600, 600, 8, 2, 128, 128), dict(positions=True)),
    ((4, 1024, 1024, 16, 8, 128, 128), dict(positions=True)),  # 256 full-attention items on the SMs' programs
    ((1, 700, 300, 4, 2, 128, 128), dict(causal=True)),
    ((2, 90, 50, 4, 2, 128, 128), dict()),
    ((2, 777, 777, 8, 1, 64, 64), dict(causal=True, layout="bhsd")),
    ((2, 300, 300, 4, 2, 64, 32), dict(causal=True, interleaved=True)),
    ((1, 512, 1024, 8, 2, 256, 256), dict(causal=True)),
]


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", KEYS_INSIDE_CASES, ids=lambda c: "-".join(map(str, c[0])) + "-" + "-".join(c[1]))
def test_backward_gpu_without_frequency_gradient(case, dtype, rope_passes, inverse_passes):
    B, Nq, Nk, Hq, Hkv, D, _ = case[0]
    errors = grad_errors(*case[0], dtype, freq_grad=False, **case[1])
    assert "dinv_freq" not in errors and all(err < 2 * TOLERANCE[dtype] for err in errors.values()), errors
    inside = D <= 128 and dispatch.backward_path(torch.empty(1, 1, 1, D, device="cuda", dtype=dtype)) == "hopper"
    assert rope_passes == [(False, not inside)]
    dq_pass, dk_pass = (B, Nq, Hq, D), (B, Nk, Hkv, D)  # dQ^ and dK^ sequence-major, whatever the layout
    assert inverse_passes == ([dq_pass] if inside else [dq_pass, dk_pass])  # the kernel wrote dk itself


@requires_cuda
def test_deterministic_backward_is_bitwise_repeatable_on_gpu():
    # the default Hopper backward sums dq with atomics; deterministic=True must not
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 1024, 16, 128, generator=gen).cuda().bfloat16().requires_grad_()
    k, v = (torch.randn(2, 1024, 4, 128, generator=gen).cuda().bfloat16().requires_grad_() for _ in range(2))
    f = schedules.YaRN(128, factor=4.0, original_max_position_embeddings=256).inv_freq(device="cuda").requires_grad_()
    grads = []
    for _ in range(3):
        out = scaled_rope_attention(q, k, v, inv_freq=f, causal=True, deterministic=True)
        grads.append(torch.autograd.grad(out.float().square().sum(), (q, k, v, f)))
    assert all(torch.equal(a, b) for run in grads[1:] for a, b in zip(grads[0], run))
