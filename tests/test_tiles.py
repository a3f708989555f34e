"""The 2-D tile views the kernels read (kernels/attention_fwd.row_view), and a compile of
the portable attention and rope kernels for Hopper (sm_90) that needs no GPU."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from ropefast.kernels.attention_fwd import row_view, sequence_major


def tiles_of(x, d_pad):
    """Every (b, h) sequence of a [B, N, H, D] view as the kernels address it in the
    row_view, [B, H, N, D]."""
    shape, stride, row_b, row_h, col_h = row_view(x, d_pad)
    flat = torch.as_strided(x, shape, (stride, 1))
    batch, n, heads, head_dim = x.shape
    return torch.stack([torch.stack([flat[b * row_b + h * row_h:][:n, h * col_h:][:, :head_dim]
                                     for h in range(heads)]) for b in range(batch)])


@pytest.mark.parametrize("make", [
    lambda: torch.randn(2, 5, 3, 16),  # heads inside a token's row
    lambda: torch.randn(2, 3, 5, 16).transpose(1, 2),  # sequence-major (SDPA's layout, as a view)
    lambda: torch.randn(2, 5, 3, 3, 16)[:, :, 1],  # v of a packed qkv tensor
])
def test_row_view_addresses_every_sequence(make):
    x = make()
    assert torch.equal(tiles_of(x, 16), x.transpose(1, 2))


def test_row_view_refuses_what_it_cannot_address():
    # Heads inside a row with D < the tile width would read the next head's features; a
    # sequence slice breaks the batch stride.
    assert row_view(torch.randn(2, 5, 3, 24), 32) is None
    assert row_view(torch.randn(2, 9, 3, 16)[:, :5], 16) is None
    # Sequence-major storage pads any D with zeros at the row's end.
    assert row_view(torch.randn(2, 3, 5, 24).transpose(1, 2), 32) is not None


def test_sequence_major_scratch_is_a_bshd_view():
    like = torch.randn(2, 5, 3, 16)
    x = sequence_major(2, 5, 3, 16, like)
    assert x.shape == like.shape and x.transpose(1, 2).is_contiguous()


COMPILE = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from ropefast.kernels import attention_bwd, attention_fwd, rope

    def desc(block, dtype="bf16"):
        return f"tensordesc<{dtype}[{','.join(map(str, block))}]>"

    def build(fn, args, config):
        block_m, block_n, num_warps, num_stages = config[:4]
        sig, constants = {}, {}
        for i, (name, spec) in enumerate(args.items()):
            sig[name] = "constexpr" if not isinstance(spec, str) else spec
            if not isinstance(spec, str):
                constants[(i,)] = spec[0]
        triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constants), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=num_warps, num_stages=num_stages))

    D = 128
    common = dict(HEAD_DIM=(D,), D_PAD=(D,), CAUSAL=(True,))

    def cu_seqlens(varlen):  # int32 document offsets (varlen), or None
        return dict(CU_SEQLENS_Q="*i32", CU_SEQLENS_K="*i32") if varlen else dict(CU_SEQLENS_Q=(None,),
                                                                                   CU_SEQLENS_K=(None,))

    for causal, varlen in ((True, False), (False, False), (True, True)):  # two block configs, and packed documents
        config = attention_fwd.fwd_config(D, causal, (9, 0))
        bm, bn, v_first = config[0], config[1], config[4]
        build(attention_fwd.rope_attention_fwd_kernel,
              dict(q_desc=desc([bm, D]), k_desc=desc([bn, D]), v_desc=desc([1, bn, 1, D]), O="*bf16", LSE="*fp32",
                   **cu_seqlens(varlen), **{n: "i32" for n in "stride_ob stride_on stride_oh NQ NK HQ GROUP".split()},
                   **dict(common, CAUSAL=(causal,)), VARLEN=(varlen,), BLOCK_M=(bm,), BLOCK_N=(bn,),
                   V_FIRST=(v_first,), DOT_PRECISION=("tf32",), STORE_LSE=(True,)), config)
    dkdv, dq = attention_bwd.bwd_config(D, (9, 0))
    for varlen in (False, True):
        for kernel, config, names in (
                (attention_bwd.rope_attention_bwd_dkdv_kernel, dkdv, "DK DV CU v_row_b v_row_h v_col_h stride_dkb "
                 "stride_dkn stride_dkh stride_dvb stride_dvn stride_dvh NQ NK HKV GROUP"),
                (attention_bwd.rope_attention_bwd_dq_kernel, dq, "DQ CU v_row_b v_row_h v_col_h stride_dqb "
                 "stride_dqn stride_dqh NQ NK HQ GROUP")):
            bm, bn = config[:2]
            args = dict(q_desc=desc([bm, D]), k_desc=desc([bn, D]), v_desc=desc([bn, D]),
                        do_desc=desc([1, bm, 1, D]), LSE2="*fp32", DELTA="*fp32")
            for n in names.split():
                if n == "CU":
                    args.update(cu_seqlens(varlen))
                else:
                    args[n] = "*bf16" if n[:2] in ("DK", "DV", "DQ") else "i32"
            build(kernel, dict(args, **common, VARLEN=(varlen,), BLOCK_M=(bm,), BLOCK_N=(bn,),
                               DOT_PRECISION=("tf32",)), config)
    for slot_half in (0, 64):  # the rope pass, natural and Hopper slot order (R = 64 of D = 128)
        build(rope.rope_kernel, dict(
            X="*bf16", OUT="*bf16", POS="*i64", INV_FREQ="*fp32", ROW_SCALE="*fp32",
            **{n: "i32" for n in "stride_xb stride_xn stride_xh stride_ob stride_on stride_oh stride_pos_b "
               "stride_pos_n stride_row_b stride_row_n N H offset".split()},
            scale="fp32", pass_scale="fp32", HEADS_PER_PROGRAM="i32", PAIRS=(32,), PAIRS_PAD=(32,), PASS=(64,),
            PASS_PAD=(64 if not slot_half else 32,), ROTARY_DIM=(64,), INTERLEAVED=(False,), HAS_POS=(True,),
            HAS_ROW_SCALE=(True,), INVERSE=(False,), SLOT_HALF=(slot_half,), BLOCK_N=(16,)), (16, 4, 4, 1))
    print("compiled")
""")


def test_attention_kernels_compile_for_hopper():
    # The interpreter runs kernels as Python and misses what only the compiler rejects
    # (a non-constexpr global, an unsupported layout), so compile the GPU kernels for
    # sm_90 too, in a process without TRITON_INTERPRET. Needs Triton's bundled ptxas.
    pytest.importorskip("triton.compiler")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True, timeout=600)
    if "ptxas" in result.stderr and "not found" in result.stderr.lower():
        pytest.skip("Triton ships no ptxas here")
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]
