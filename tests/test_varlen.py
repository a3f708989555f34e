"""Packed documents (`scaled_rope_attention_varlen`) against the float64 reference run on
each document alone: output, lse and gradients (q, k, v, inv_freq, temperature); no
attention across documents; `from_position_ids`; the argument errors. CPU: the Triton
interpreter, fp32/fp16, small documents; GPU: bf16/fp16 on small documents through both kernel
paths (the Gluon one on Hopper, the portable one), and on the issue's shape (16k tokens of
log-uniform documents, Hq 32, Hkv 8, D 128)."""

import contextlib

import pytest
import torch

from bench.peers import log_uniform_lengths
from ropefast import dispatch, ops, scaled_rope_attention, scaled_rope_attention_varlen, schedules
from ropefast.kernels import documents
from ropefast.reference import scaled_rope_attention_reference, scaled_rope_attention_varlen_reference
from ropefast.varlen import CHECK_VALUES_ENV, document_positions, from_position_ids

from conftest import DEVICE, TOLERANCE, rel_err, requires_cuda, requires_kernel

NAMES = ("out", "lse", "dq", "dk", "dv", "dinv_freq", "dtemperature")


def cu_seqlens(lengths, device=DEVICE):
    return torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0).to(device, torch.int32)


def varlen_errors(lengths_q, lengths_k, hq, hkv, head_dim, rotary_dim, dtype, *, causal=False, interleaved=False,
                  positions=False, temperature=True, rotary_scale=1.2, freq_grad=True, device=DEVICE, seed=0):
    """Relative errors of out, lse and every gradient against the float64 reference."""
    gen = torch.Generator().manual_seed(seed)
    total_q, total_k = sum(lengths_q), sum(lengths_k)
    q = torch.randn(total_q, hq, head_dim, generator=gen).to(device, dtype).requires_grad_()
    k, v = (torch.randn(total_k, hkv, head_dim, generator=gen).to(device, dtype).requires_grad_() for _ in range(2))
    inv_freq = schedules.YaRN(rotary_dim, factor=4.0, original_max_position_embeddings=16).inv_freq(device=device)
    inv_freq.requires_grad_(freq_grad)
    temp = (torch.rand(total_q, generator=gen) + 0.5).to(device).requires_grad_() if temperature else None
    kw = dict(rotary_dim=rotary_dim, interleaved=interleaved, causal=causal, rotary_scale=rotary_scale)
    if positions:
        kw["q_positions"] = torch.randint(0, 3000, (total_q,), generator=gen).to(device)
        kw["k_positions"] = torch.randint(0, 3000, (total_k,), generator=gen).to(device)
    cu_q, cu_k = cu_seqlens(lengths_q, device), cu_seqlens(lengths_k, device)
    out, lse = scaled_rope_attention_varlen(q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), inv_freq=inv_freq,
                                            q_temperature=temp, return_lse=True, **kw)
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (hq, total_q) and lse.dtype == torch.float32
    grad_out = torch.randn(out.shape, generator=gen).to(device, dtype)
    grad_lse = torch.randn(lse.shape, generator=gen).to(device)
    seen = torch.isfinite(lse)
    tensors = dict(zip(NAMES[2:], (q, k, v, inv_freq, temp)))
    graded = [name for name, x in tensors.items() if x is not None and x.requires_grad]
    grads = torch.autograd.grad((out * grad_out).sum() + (lse[seen] * grad_lse[seen]).sum(),
                                [tensors[name] for name in graded])

    ref = {name: None if x is None else x.detach().double().requires_grad_(x.requires_grad)
           for name, x in tensors.items()}
    ref_out, ref_lse = scaled_rope_attention_varlen_reference(
        ref["dq"], ref["dk"], ref["dv"], cu_q, cu_k, inv_freq=ref["dinv_freq"], q_temperature=ref["dtemperature"],
        return_lse=True, **kw)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    ref_grads = torch.autograd.grad((ref_out * grad_out.double()).sum()
                                    + (ref_lse[seen] * grad_lse[seen].double()).sum(), [ref[name] for name in graded])
    errors = dict(out=rel_err(out, ref_out), lse=rel_err(lse[seen], ref_lse[seen]))
    errors.update((name, rel_err(g, r)) for name, g, r in zip(graded, grads, ref_grads))
    return errors


# (query lengths, key lengths, Hq, Hkv, D, R) and the features each case turns on.
CPU_CASES = [
    (((5, 17, 40), (5, 17, 40), 2, 1, 32, 32), dict(causal=True)),
    (((5, 17, 40), (5, 17, 40), 2, 2, 32, 16), dict()),  # rotary_dim < D, no causal mask
    (((5, 17, 40), (9, 11, 50), 4, 2, 24, 16), dict(causal=True, interleaved=True, positions=True)),  # D 24, rows
    # that see no key (doc 2: 17 queries, 11 keys)
    (((6, 0, 33, 1), (6, 0, 33, 1), 2, 1, 32, 32), dict(causal=True, temperature=False)),  # empty document
]


@requires_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: "-".join(map(str, c[0][2:])) + "-" + "-".join(c[1]))
def test_varlen_matches_reference_per_document(case, dtype):
    errors = varlen_errors(*case[0], dtype, **case[1])
    # fp16 gradients pass through fp16 dots twice (dS, then dS @ K): 2x the forward bound, as test_backward
    for name, err in errors.items():
        bound = TOLERANCE[dtype] * (2 if dtype == torch.float16 and name[0] == "d" else 1)
        assert err < bound, (name, err, errors)


@requires_kernel
def test_documents_do_not_see_each_other():
    # Changing every other document's q, k, v and output gradient leaves document 1's output
    # and gradients bit for bit as they were (on a GPU: bf16, D = 128, the Gluon kernels on
    # Hopper; the last query tile of document 0 adds exact zeros to document 1's dq rows).
    head_dim, dtype = (128, torch.bfloat16) if DEVICE == "cuda" else (32, torch.float32)
    lengths = (5, 17, 40)
    cu = cu_seqlens(lengths)
    doc = slice(5, 22)
    inv_freq = schedules.DefaultRope(head_dim).inv_freq(device=DEVICE)
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(62, h, head_dim, generator=gen).to(DEVICE, dtype) for h in (2, 1, 1, 2)]  # q, k, v, dout

    def doc_results(tensors):
        q, k, v = (t.clone().requires_grad_() for t in tensors[:3])
        out = scaled_rope_attention_varlen(q, k, v, cu, cu, 40, 40, inv_freq=inv_freq, causal=True)
        grads = torch.autograd.grad(out, (q, k, v), tensors[3])
        return [out[doc], *(g[doc] for g in grads)]

    before = doc_results(base)
    others = torch.ones(62, dtype=torch.bool, device=DEVICE)
    others[doc] = False
    changed = [torch.where(others[:, None, None], t * 3 + 1, t) for t in base]
    for got, expect in zip(doc_results(changed), before):
        assert torch.equal(got, expect)


# (query lengths, key lengths, Hq, Hkv, D, R) on a GPU, where the Gluon kernels (Hopper) and the
# portable ones both run: tiles that straddle documents, an empty document and one of a
# single token, documents with more queries than keys (rows that see no key), the head dims
# of the Gluon backward (64, 128, 256: its consumers split the features) and one it does not
# serve (80: the portable backward); and more items than an H100 has SMs, so that a persistent
# Gluon forward program runs several documents' items in turn.
GPU_CASES = [
    (((100, 300, 1, 700), (100, 300, 1, 700), 8, 2, 128, 128), dict(causal=True)),
    (((100, 0, 257, 64), (100, 0, 257, 64), 4, 4, 128, 64), dict()),
    (((130, 50, 300), (90, 200, 333), 4, 1, 64, 64), dict(causal=True, positions=True)),
    (((200, 190, 450), (200, 190, 450), 4, 2, 64, 64), dict()),  # D <= 64: Gluon items of 192 rows, straddling
    (((77, 200), (77, 200), 2, 1, 80, 48), dict(causal=True, interleaved=True)),
    (((129, 64), (129, 64), 2, 2, 256, 256), dict(causal=True)),
    (((1000, 37, 600, 1, 900, 450, 130), (1000, 37, 600, 1, 900, 450, 130), 8, 2, 128, 128), dict(causal=True)),
]


@requires_cuda
@pytest.mark.parametrize("path", ["default", "portable"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "-".join(map(str, c[0][2:])) + "-" + "-".join(c[1]))
def test_varlen_gpu_matches_reference(case, dtype, path):
    with dispatch.portable_kernels() if path == "portable" else contextlib.nullcontext():
        errors = varlen_errors(*case[0], dtype, device="cuda", **case[1])
    for name, err in errors.items():
        bound = TOLERANCE[dtype] * (2 if dtype == torch.float16 and name[0] == "d" else 1)
        assert err < bound, (name, err, errors)


@requires_cuda
@pytest.mark.parametrize("case", [GPU_CASES[0], GPU_CASES[2]],
                         ids=lambda c: "-".join(map(str, c[0][2:])) + "-" + "-".join(c[1]))
def test_varlen_gpu_without_frequency_gradient(case, rope_passes, inverse_passes):
    # half-split pairs filling D: the Hopper backward rotates the documents' keys, and dk back, itself
    lengths_q, lengths_k, hq, hkv, head_dim, _ = case[0]
    errors = varlen_errors(*case[0], torch.bfloat16, device="cuda", freq_grad=False, **case[1])
    assert "dinv_freq" not in errors and all(err < TOLERANCE[torch.bfloat16] for err in errors.values()), errors
    hopper = dispatch.backward_path(torch.empty(1, 1, 1, head_dim, device="cuda", dtype=torch.bfloat16)) == "hopper"
    assert rope_passes == [(False, not hopper)]
    dq_pass, dk_pass = (1, sum(lengths_q), hq, head_dim), (1, sum(lengths_k), hkv, head_dim)
    assert inverse_passes == ([dq_pass] if hopper else [dq_pass, dk_pass])


@requires_cuda
def test_varlen_deterministic_backward_is_bitwise_repeatable():
    lengths = (300, 1, 700, 129)
    cu = cu_seqlens(lengths, "cuda")
    gen = torch.Generator(device="cuda").manual_seed(5)
    q, k, v, dout = (torch.randn(sum(lengths), h, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
                     for h in (8, 2, 2, 8))
    inv_freq = schedules.DefaultRope(128).inv_freq(device="cuda")

    def grads():
        inputs = [x.clone().requires_grad_() for x in (q, k, v)]
        out = scaled_rope_attention_varlen(*inputs, cu, cu, 700, 700, inv_freq=inv_freq, causal=True,
                                           deterministic=True)
        return torch.autograd.grad(out, inputs, dout)

    first = grads()
    for _ in range(2):
        assert all(torch.equal(a, b) for a, b in zip(grads(), first))


@requires_kernel
def test_packed_outputs_hand_their_gradients_back_through_views():
    # the op runs on [1, total, H, D] views; dropping that dimension by indexing would make
    # the backward fill a zero tensor of out's size and copy the gradient into it
    q, k, v = (torch.randn(20, heads, 16, device=DEVICE, requires_grad=True) for heads in (4, 2, 2))
    cu = cu_seqlens((12, 8))
    inv_freq = schedules.YaRN(16, factor=4.0, original_max_position_embeddings=16).inv_freq(device=DEVICE)
    out, lse = scaled_rope_attention_varlen(q, k, v, cu, cu, 12, 12, inv_freq=inv_freq, causal=True, return_lse=True)
    assert all("Select" not in type(x.grad_fn).__name__ for x in (out, lse))


@requires_kernel
def test_document_tiles_lists_every_tile_once():
    # the table the Hopper kernels index: (document, tile within it), then (-1, 0) up to
    # token count / tile + document count entries; empty documents have no tile
    cu = cu_seqlens((5, 0, 300, 128, 1))
    table = documents.document_tiles(cu, 434, 128)
    tiles = [(0, 0), (2, 0), (2, 1), (2, 2), (3, 0), (4, 0)]
    assert table.dtype == torch.int32 and table.tolist() == [list(t) for t in tiles + [(-1, 0)] * 3]
    many = [3, 130, 0, 257] * 100  # more documents than one block of the kernel
    table = documents.document_tiles(cu_seqlens(many), sum(many), 128)
    expect = [[d, m] for d, n in enumerate(many) for m in range(-(-n // 128))]
    assert table.tolist() == expect + [[-1, 0]] * (table.shape[0] - len(expect))
    # decreasing offsets (checked only on request on a GPU) overlap documents: 16 tiles in
    # 8 + 3 entries, the rest dropped, never written past the table
    table = documents.document_tiles(torch.tensor([0, 1000, 0, 1000], dtype=torch.int32, device=DEVICE), 1000, 128)
    assert table.tolist() == [[0, m] for m in range(8)] + [[2, m] for m in range(3)]


@requires_kernel
@pytest.mark.parametrize("lengths_q, lengths_k", [((5, 0, 300, 128, 1), (5, 0, 300, 128, 1)),
                                                  ((5, 2, 300, 0, 1), (3, 9, 250, 4, 1)),
                                                  ((1,), (1,)), ((700, 3) * 600, (700, 3) * 600)])
def test_document_positions_kernel_matches_pytorch(lengths_q, lengths_k):
    cu_q, cu_k = cu_seqlens(lengths_q), cu_seqlens(lengths_k)
    got = documents.document_positions(cu_q, cu_k, sum(lengths_q), sum(lengths_k))
    expect = document_positions(cu_q, cu_k, sum(lengths_q), sum(lengths_k))
    assert all(g.dtype == torch.int32 and torch.equal(g, e) for g, e in zip(got, expect))


@requires_kernel
def test_varlen_matches_the_dense_op_on_each_document():
    lengths = (7, 30, 19)
    cu = cu_seqlens(lengths)
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(56, h, 32, generator=gen).to(DEVICE) for h in (4, 2, 2))
    yarn = schedules.YaRN(32, factor=4.0, original_max_position_embeddings=16)
    out = scaled_rope_attention_varlen(q, k, v, cu, cu, 30, 30, schedule=yarn, causal=True)
    for start, end in zip(cu.tolist(), cu.tolist()[1:]):
        # a length-dependent schedule aside, each document alone is the dense op
        alone = scaled_rope_attention(*(x[None, start:end] for x in (q, k, v)), schedule=yarn, causal=True)
        assert rel_err(out[start:end], alone[0]) < 1e-6


def test_default_positions_restart_per_document():
    cu_q = torch.tensor([0, 2, 2, 5], dtype=torch.int32)
    cu_k = torch.tensor([0, 3, 4, 7], dtype=torch.int32)
    q_pos, k_pos = document_positions(cu_q, cu_k, 5, 7)
    assert k_pos.tolist() == [0, 1, 2, 0, 0, 1, 2]
    assert q_pos.tolist() == [1, 2, 0, 1, 2]  # the last query of each document at its last key


def test_length_dependent_schedule_sees_max_seqlen_k_or_seq_len():
    ntk = schedules.DynamicNTKScaling(16, factor=2.0, max_position_embeddings=8)
    cu = cu_seqlens((6, 30), "cpu")
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(36, 2, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    for seq_len, length in ((None, 30), (64, 64)):
        got = scaled_rope_attention_varlen(q, k, v, cu, cu, 30, 30, schedule=ntk, seq_len=seq_len)
        expect = scaled_rope_attention_varlen(q, k, v, cu, cu, 30, 30, inv_freq=ntk.inv_freq(length),
                                              rotary_scale=ntk.rotary_scale(length))
        assert torch.equal(got, expect)


def test_cpu_without_kernels_runs_the_reference():
    # float64 always takes the reference path: the API must hand it the per-document defaults
    cu = cu_seqlens((4, 9), "cpu")
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(13, 2, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    inv_freq = schedules.DefaultRope(8).inv_freq()
    out, lse = scaled_rope_attention_varlen(q, k, v, cu, cu, 9, 9, inv_freq=inv_freq, causal=True, return_lse=True)
    for start, end in ((0, 4), (4, 13)):
        alone, alone_lse = scaled_rope_attention_reference(*(x[None, start:end] for x in (q, k, v)),
                                                           inv_freq=inv_freq, causal=True, return_lse=True)
        assert torch.allclose(out[start:end], alone[0]) and torch.allclose(lse[:, start:end], alone_lse[0])


def test_from_position_ids():
    cu, longest = from_position_ids(torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3, 0]]))
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 5, 9, 10] and longest == 4 and type(longest) is int
    # rows are packed one after another, and each row starts a document
    cu, longest = from_position_ids(torch.tensor([[0, 1, 2, 3], [0, 1, 0, 1]]))
    assert cu.tolist() == [0, 4, 6, 8] and longest == 4
    cu, _ = from_position_ids(torch.tensor([[5, 6, 7, 3, 4]]))  # a row that starts mid-document
    assert cu.tolist() == [0, 3, 5]
    with pytest.raises(TypeError, match="position_ids"):
        from_position_ids(torch.zeros(1, 4))


def test_from_position_ids_agrees_with_transformers():
    utils = pytest.importorskip("transformers.modeling_flash_attention_utils")
    if not hasattr(utils, "prepare_fa_kwargs_from_position_ids"):
        pytest.skip("this transformers has no prepare_fa_kwargs_from_position_ids")
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 0, 1, 2, 0, 1, 2, 3, 4, 5]])
    (hf_cu, _), (hf_max, _) = utils.prepare_fa_kwargs_from_position_ids(position_ids)
    cu, longest = from_position_ids(position_ids)
    assert torch.equal(cu, hf_cu) and longest == int(hf_max)


def _args(**change):
    """A valid CPU call (3 documents), with some arguments replaced."""
    q, k, v = torch.randn(10, 2, 8), torch.randn(10, 1, 8), torch.randn(10, 1, 8)
    cu = torch.tensor([0, 3, 3, 10], dtype=torch.int32)
    args = dict(q=q, k=k, v=v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=7, max_seqlen_k=7,
                inv_freq=schedules.DefaultRope(8).inv_freq())
    args.update(change)
    return args


def _meta(dtype=torch.int32):
    return torch.tensor([0, 3, 10], dtype=dtype, device="meta")


BAD = [
    (dict(cu_seqlens_q=torch.tensor([0, 3, 3, 10])), TypeError, "cu_seqlens_q must be int32"),
    (dict(cu_seqlens_k=torch.tensor([[0, 3, 3, 10]], dtype=torch.int32)), ValueError, "cu_seqlens_k must have 1"),
    (dict(cu_seqlens_q=torch.tensor([0], dtype=torch.int32)), ValueError, "documents \\+ 1 >= 2"),
    (dict(cu_seqlens_q=torch.tensor([1, 3, 3, 10], dtype=torch.int32)), ValueError, "must start at 0"),
    (dict(cu_seqlens_k=torch.tensor([0, 5, 3, 10], dtype=torch.int32)), ValueError, "must not decrease"),
    (dict(cu_seqlens_q=torch.tensor([0, 3, 3, 9], dtype=torch.int32)), ValueError, "end at the packed token count 10"),
    (dict(cu_seqlens_k=_meta()), ValueError, "cu_seqlens_k is on meta"),
    (dict(cu_seqlens_k=torch.tensor([0, 3, 10], dtype=torch.int32)), ValueError, "count the same documents"),
    (dict(max_seqlen_q=0), ValueError, "max_seqlen_q must be positive"),
    (dict(max_seqlen_k=torch.tensor(7)), TypeError, "max_seqlen_k must be a Python int"),
    (dict(max_seqlen_k=6), ValueError, "max_seqlen_k \\(6\\) is less than the longest document"),
    (dict(q=torch.randn(1, 10, 2, 8)), ValueError, "q must have 3 dimensions"),
    (dict(k=torch.randn(10, 3, 8), v=torch.randn(10, 3, 8)), ValueError, "multiple of the KV heads"),
    (dict(q_positions=torch.arange(9)), ValueError, "q_positions must be"),
    (dict(q_temperature=torch.ones(2, 10)), ValueError, "q_temperature must be \\[10\\]"),
    (dict(deterministic=1), TypeError, "deterministic must be a bool"),
]


@pytest.mark.parametrize("change,error,message", BAD, ids=[b[2][:30] for b in BAD])
def test_bad_arguments_raise(change, error, message):
    with pytest.raises(error, match=message):
        scaled_rope_attention_varlen(**_args(**change))


@requires_cuda
def test_value_checks_on_cuda_are_opt_in(monkeypatch):
    # CUDA tensors skip the checks that read cu_seqlens (a host sync) unless asked for
    args = {key: x.cuda() if isinstance(x, torch.Tensor) else x for key, x in _args().items()}
    for bad in ([-5, 3, 2, 40], [0, 3, 3, 9]):  # unchecked: wrong results, but never an access out of bounds
        args["cu_seqlens_q"] = args["cu_seqlens_k"] = torch.tensor(bad, dtype=torch.int32, device="cuda")
        scaled_rope_attention_varlen(**args)
        torch.cuda.synchronize()
    monkeypatch.setenv(CHECK_VALUES_ENV, "1")
    with pytest.raises(ValueError, match="end at the packed token count 10"):
        scaled_rope_attention_varlen(**args)


@requires_kernel
def test_varlen_op_passes_opcheck():
    gen = torch.Generator().manual_seed(5)
    cu = cu_seqlens((3, 12, 5))
    q = torch.randn(1, 20, 4, 16, generator=gen).to(DEVICE).requires_grad_()
    k, v = (torch.randn(1, 20, 2, 16, generator=gen).to(DEVICE).requires_grad_() for _ in range(2))
    inv_freq = schedules.DefaultRope(16).inv_freq(device=DEVICE).requires_grad_()
    temp = (torch.rand(1, 20, generator=gen) + 0.5).to(DEVICE).requires_grad_()
    q_pos, k_pos = document_positions(cu, cu, 20, 20)
    torch.library.opcheck(ops.attention_fwd, (q, k, v, inv_freq, q_pos[None], k_pos[None], temp, 16, False, True,
                                              0.25, 1.1, cu, cu, 12, 12))


@requires_kernel
def test_fullgraph_compile_has_no_host_sync():
    # a host sync (reading cu_seqlens) would break the graph: fullgraph raises on any break
    cu = cu_seqlens((3, 12, 5))
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(20, h, 16, generator=gen).to(DEVICE).requires_grad_() for h in (4, 2, 2))
    yarn = schedules.YaRN(16, factor=4.0, original_max_position_embeddings=8)

    def attend(q, k, v):
        return scaled_rope_attention_varlen(q, k, v, cu, cu, 12, 12, schedule=yarn, causal=True)

    def results(fn):
        out = fn(q, k, v)
        return [out, *torch.autograd.grad(out.square().sum(), (q, k, v))]

    torch._dynamo.reset()
    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    for got, expect in zip(results(compiled), results(attend)):
        assert rel_err(got, expect) < 1e-6


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_issue_shape_on_gpu(dtype):
    # 16k tokens of documents 64..8k long (log-uniform, fixed seed), Hq 32, Hkv 8, D 128,
    # causal, with a temperature and a learnable inv_freq. The float64 reference runs per
    # document and per KV head group (its score matrices would not fit at once).
    lengths = log_uniform_lengths(16384, 64, 8192, seed=0)
    total, hq, hkv, head_dim = 16384, 32, 8, 128
    group = hq // hkv
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(total, hq, head_dim, device="cuda", dtype=dtype, generator=gen).requires_grad_()
    k, v = (torch.randn(total, hkv, head_dim, device="cuda", dtype=dtype, generator=gen).requires_grad_()
            for _ in range(2))
    yarn = schedules.YaRN(head_dim, factor=4.0, original_max_position_embeddings=4096)
    inv_freq = yarn.inv_freq(device="cuda").requires_grad_()
    temp = (torch.rand(total, device="cuda", generator=gen) + 0.5).requires_grad_()
    cu = cu_seqlens(lengths, "cuda")
    kw = dict(rotary_dim=head_dim, causal=True, rotary_scale=yarn.rotary_scale())
    out, lse = scaled_rope_attention_varlen(q, k, v, cu, cu, max(lengths), max(lengths), inv_freq=inv_freq,
                                            q_temperature=temp, return_lse=True, **kw)
    grad_out = torch.randn(out.shape, device="cuda", dtype=dtype, generator=gen)
    inputs = (q, k, v, inv_freq, temp)
    grads = torch.autograd.grad((out * grad_out).sum(), inputs)

    ref_out, ref_lse = torch.empty_like(out, dtype=torch.float64), torch.empty_like(lse, dtype=torch.float64)
    ref_grads = [torch.zeros_like(x, dtype=torch.float64) for x in inputs]
    positions = torch.arange(total, device="cuda")
    for start, end in zip(cu.tolist(), cu.tolist()[1:]):
        for g in range(hkv):
            heads = slice(g * group, (g + 1) * group)
            rq = q.detach()[None, start:end, heads].double().requires_grad_()
            rk, rv = (x.detach()[None, start:end, g:g + 1].double().requires_grad_() for x in (k, v))
            rf = inv_freq.detach().double().requires_grad_()
            rt = temp.detach()[None, start:end].double().requires_grad_()
            pos = positions[None, : end - start]
            o, l_ = scaled_rope_attention_reference(rq, rk, rv, inv_freq=rf, q_positions=pos, k_positions=pos,
                                                    q_temperature=rt, return_lse=True, **kw)
            dq, dk, dv, df, dt = torch.autograd.grad((o * grad_out[None, start:end, heads].double()).sum(),
                                                     (rq, rk, rv, rf, rt))
            ref_out[start:end, heads], ref_lse[heads, start:end] = o[0], l_[0]
            ref_grads[0][start:end, heads] = dq[0]
            ref_grads[1][start:end, g:g + 1] = dk[0]
            ref_grads[2][start:end, g:g + 1] = dv[0]
            ref_grads[3] += df
            ref_grads[4][start:end] += dt[0]
    errors = dict(zip(NAMES, [rel_err(out, ref_out), rel_err(lse, ref_lse),
                              *(rel_err(g, r) for g, r in zip(grads, ref_grads))]))
    for name, err in errors.items():
        bound = TOLERANCE[dtype] * (2 if dtype == torch.float16 and name[0] == "d" else 1)
        assert err < bound, (name, err, errors)
