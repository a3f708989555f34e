"""The Gluon Hopper forward and backward and the decode kernels compiled for sm_90 on any machine
(Triton's bundled ptxas), in every variant the dispatcher can launch: they must compile and
keep their values in registers (a spill in a consumer warpgroup's key loop costs more than the
overlap gains; decode has no time for local-memory round trips beside its loads)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from ropefast.kernels.hopper import compat

# Shared by both compile scripts: a launch's signature from its argument specs ("type",
# ("type", divisibility), [constexpr value] or None), and ptxas's count of spilled bytes.
PRELUDE = textwrap.dedent("""
    import json, os, re, subprocess, sys, tempfile
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas

    def signature_of(args):
        signature, constexprs, attrs = {}, {}, {}
        for i, (name, spec) in enumerate(args.items()):
            if spec is None or isinstance(spec, list):
                signature[name], constexprs[(i,)] = "constexpr", None if spec is None else spec[0]
            elif isinstance(spec, tuple):
                signature[name], attrs[(i,)] = spec[0], [["tt.divisibility", spec[1]]]
            else:
                signature[name] = spec
        return dict(signature=signature, constexprs=constexprs, attrs=attrs)

    def spill_bytes(ptx):
        try:
            ptxas = get_ptxas(90).path
        except TypeError:  # triton < 3.5
            ptxas = get_ptxas().path
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "k.ptx")
            open(path, "w").write(ptx)
            report = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", path, "-o", path + ".cubin"],
                                    capture_output=True, text=True)
        found = re.findall(r"(\\d+) bytes spill stores, (\\d+) bytes spill loads", report.stdout + report.stderr)
        assert found, report.stderr[-2000:]
        return sum(int(a) + int(b) for a, b in found)

    # local-memory instructions (spills) in the kernel's innermost loops that issue wgmma: the
    # key loops, where a round trip costs more than the overlap gains
    def key_loop_local(cubin):
        nvdisasm = os.path.join(os.path.dirname(get_ptxas(90).path), "nvdisasm")
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "k.cubin")
            open(path, "wb").write(cubin)
            sass = subprocess.run([nvdisasm, "-c", path], capture_output=True, text=True, check=True).stdout
        code, labels = [], {}
        for line in sass.splitlines():
            label = re.match(r"\s*\.(L_x_\d+):", line)
            if label:
                labels[label.group(1)] = len(code)
            instruction = re.match(r"\s*/\*[0-9a-f]+\*/\s*(.*?)\s*;", line)
            if instruction:
                code.append(instruction.group(1))
        # [first, last] of each conditional backward branch's body that issues wgmma (an mbarrier
        # wait's retry, out of line, returns with an unconditional one)
        loops = set()
        for i, text in enumerate(code):
            target = re.search(r"^@!?U?P\d BRA `\(\.(L_x_\d+)\)", text)
            if target and labels.get(target.group(1), i) < i:
                first = labels[target.group(1)]
                if any("HGMMA" in x for x in code[first:i + 1]):
                    loops.add((first, i))
        inner = {i for a, b in loops if not any(a < c <= b for c, _ in loops) for i in range(a, b + 1)}
        return sum("STL" in code[i] or "LDL" in code[i] for i in inner)
""")


def compile_in_subprocess(script, cases):
    """Run a compile script on the cases in a fresh process without TRITON_INTERPRET (so
    the kernels build for a GPU); its per-case facts, or a skip where Triton ships no ptxas."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script, json.dumps(cases)], env=env, capture_output=True,
                            text=True, timeout=900)
    if "ptxas" in result.stderr and "not found" in result.stderr.lower():
        pytest.skip("Triton ships no ptxas here")
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


COMPILE = PRELUDE + textwrap.dedent("""
    from triton.experimental.gluon._runtime import GluonASTSource
    from ropefast.kernels.hopper import attention_fwd as hopper
    from ropefast.kernels.rope import slot_order

    def compile_fwd(head_dim, rotary_dim, causal, interleaved, positions, temperature, dtype, varlen=False,
                    pair_units=None, store_q=False, causal_queries=1024):
        d_pad = max(16, triton.next_power_of_2(head_dim))
        # causal: a call of causal_queries (pair units; at D = 64 two consumers up to 2k queries,
        # three up to 6k) unless pair units are off
        short = causal and not varlen and pair_units is not False
        config = hopper.fwd_config(d_pad, slot_order(d_pad, rotary_dim, interleaved), causal_queries if short else 0)
        consumers, block_n, stages, consumer_regs, maxnreg, _ = config
        if pair_units is None:
            pair_units = causal and not varlen and config.pair_units_tiles > 0
        torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        def desc(block):
            return f"tensordesc<{dtype}[{', '.join(map(str, block))}],{hopper.shared_layout(block, torch_dtype)!r}>"
        # the launch's specialization: 16-byte aligned pointers and row strides
        args = dict(Q=(f"*{dtype}", 16), stride_qb=("i64", 16), stride_qn=("i32", 16), stride_qh=("i32", 16),
                    k_desc=desc([1, block_n, d_pad]), v_desc=desc([1, block_n, 1, d_pad]),
                    o_desc=desc([1, 64, 1, d_pad]), O=(f"*{dtype}", 16), stride_ob=("i64", 16),
                    stride_on=("i32", 16), stride_oh=("i32", 16), LSE=("*fp32", 16), QR=(f"*{dtype}", 16),
                    stride_qrb=("i64", 16), stride_qrn=("i32", 16), stride_qrh=("i32", 16), INV_FREQ=("*fp32", 16),
                    Q_POS=("*i64", 16) if positions else None, stride_pos_b="i32", stride_pos_n="i32",
                    TEMP=("*fp32", 16) if temperature else None, stride_temp_b="i32", stride_temp_n="i32",
                    NQ="i32", NK="i32", HQ="i32", GROUP="i32", n_items="i32",
                    CU_SEQLENS_Q=("*i32", 16) if varlen else None, CU_SEQLENS_K=("*i32", 16) if varlen else None,
                    TILES=("*i32", 16) if varlen else None, q_pos_offset="i32", row_scale="fp32",
                    rot_scale="fp32", HEAD_DIM=[head_dim], D_PAD=[d_pad], PAIRS=[rotary_dim // 2],
                    INTERLEAVED=[interleaved], HAS_POS=[positions], HAS_TEMP=[temperature], CAUSAL=[causal],
                    VARLEN=[varlen], PAIR_UNITS=[pair_units], CONSUMERS=[consumers], BLOCK_N=[block_n],
                    STAGES=[stages],
                    CONSUMER_REGS=[consumer_regs], STORE_Q=[store_q], STORE_LSE=[True])
        source = GluonASTSource(fn=hopper.rope_attention_fwd_hopper_kernel, **signature_of(args))
        return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, maxnreg=maxnreg))

    results = {}
    for case in json.loads(sys.argv[1]):
        kernel = compile_fwd(*case)
        ptx = kernel.asm["ptx"]
        results[repr(case)] = dict(spills=spill_bytes(ptx), key_loop_local=key_loop_local(kernel.asm["cubin"]),
                                   wgmma=ptx.count("wgmma.mma_async"),
                                   setmaxnreg=ptx.count("setmaxnreg"), tma=ptx.count("cp.async.bulk.tensor"),
                                   staged=ptx.count("cp.async.cg.shared.global"))
    print(json.dumps(results))
""")

# (head dim, rotary dim, causal, interleaved, positions, temperature, dtype[, varlen[, pair units[, store Q^[,
# causal queries]]]]): the configs of fwd_config, each way the queries load (halves, interleaved, slot
# order), both causal schedules (pair units by default where the config has them: two consumers at D = 64
# and 1k queries, three at 4k; one program per tile at D = 64, with three consumers, and 128), and
# the training forward's store of Q^ (natural feature order only: the slot order runs the query pass).
CASES = [(64, 64, False, False, False, False, "bf16"), (64, 64, True, False, False, False, "bf16"),
         (64, 64, True, False, False, False, "bf16", False, False),
         (64, 64, True, False, False, False, "bf16", False, None, False, 4096),
         (128, 128, False, False, False, False, "bf16"), (128, 128, True, False, False, False, "bf16"),
         (256, 256, False, False, False, False, "bf16"), (256, 256, True, False, False, False, "bf16"),
         (80, 48, True, True, True, True, "bf16"), (128, 64, True, False, True, True, "fp16"),
         (40, 24, False, False, False, False, "fp16"),
         # packed documents (always with positions): Llama-style, D = 64 causal (three consumers), and
         # D = 256 with everything on
         (128, 128, True, False, True, False, "bf16", True), (128, 128, False, False, True, True, "fp16", True),
         (64, 64, True, False, True, False, "bf16", True),
         (256, 128, True, True, True, True, "bf16", True),
         (128, 128, True, False, False, False, "bf16", False, False),
         (128, 128, True, False, False, False, "bf16", False, None, True),
         (128, 128, False, False, True, True, "fp16", False, None, True),
         (80, 80, True, True, True, True, "bf16", False, None, True),
         (256, 256, True, False, False, False, "bf16", False, None, True),
         (128, 128, True, False, True, True, "bf16", True, None, True),
         (64, 64, False, True, True, True, "bf16", False, None, True)]


# ptxas leaves a few scalars of the item loop in local memory (a few 4-byte loads per work item,
# in the item's prologue and epilogue; the most: 96 bytes with Triton 3.6's ptxas, the GPU image's,
# 196 with 3.9's, for the training forward's store of Q^; 2026-11-27). In the key loops none with
# 3.6; 3.9 reloads up to 6 of them there (0-24 before the one-compare causal mask, 2026-11-27).
FORWARD_SPILL_BOUND = 256
KEY_LOOP_LOCAL_BOUND = 8 if compat.triton_version() >= (3, 7) else 0


@pytest.mark.skipif(not compat.SUPPORTED, reason=f"Gluon kernels need Triton >= {compat.MIN_TRITON}")
def test_hopper_forward_compiles_for_sm90_without_key_loop_spills():
    results = compile_in_subprocess(COMPILE, CASES)
    for case in CASES:
        facts = results[repr(list(case))]
        assert facts["spills"] <= FORWARD_SPILL_BOUND, (case, facts)
        assert facts["key_loop_local"] <= KEY_LOOP_LOCAL_BOUND, (case, facts)
        # warp-specialized: register reallocation, TMA loads and async wgmma are all there
        assert facts["setmaxnreg"] > 0 and facts["tma"] > 0 and facts["wgmma"] > 0, (case, facts)
        # the consumers copy their next queries in (cp.async) where half-split pairs fill a
        # head dim of 32, 64 or 128 (packed documents: 32 or 64)
        head_dim, rotary_dim, _, interleaved = case[:4]
        varlen = len(case) > 7 and case[7]
        staged = head_dim in ((32, 64) if varlen else (32, 64, 128)) and not interleaved and rotary_dim == head_dim
        assert (facts["staged"] > 0) == staged, (case, facts)


BACKWARD_COMPILE = PRELUDE + textwrap.dedent("""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource
    from ropefast.kernels.hopper import attention_bwd as hopper_bwd
    from ropefast.kernels.hopper.attention_fwd import shared_layout

    def compile_bwd(head_dim, causal, dtype, varlen=False, rotate_k=True, interleaved=False, positions=False,
                    descending=False):
        stages, consumer_regs, maxnreg, block_n = hopper_bwd.bwd_config(head_dim)
        torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        def desc(block, dtype=dtype, layout=None):
            layout = layout or shared_layout(block, torch_dtype)
            return f"tensordesc<{dtype}[{', '.join(map(str, block))}],{layout!r}>"
        rows = desc([64], "fp32", hopper_bwd.ROW_STATS_LAYOUT)
        dq_block = [64, hopper_bwd.DQ_CHUNK.value]
        args = dict(q_desc=desc([64, head_dim]), k_desc=desc([block_n, head_dim]),
                    v_desc=desc([1, block_n, 1, head_dim]),
                    do_desc=desc([1, 64, 1, head_dim]), lse2_desc=rows, delta_desc=rows,
                    dq_desc=desc(dq_block, "fp32", gl.NVMMASharedLayout.get_default_for(dq_block, gl.float32)),
                    DK=(f"*{dtype}", 16), stride_dkb=("i64", 16), stride_dkn=("i32", 16), stride_dkh=("i32", 16),
                    DV=(f"*{dtype}", 16), stride_dvb=("i64", 16), stride_dvn=("i32", 16), stride_dvh=("i32", 16),
                    K=(f"*{dtype}", 16), stride_kb=("i64", 16), stride_kn=("i32", 16), stride_kh=("i32", 16),
                    INV_FREQ=("*fp32", 16), K_POS=("*i64", 16) if positions or varlen else None,
                    stride_pos_b="i32", stride_pos_n="i32", NQ="i32", NK="i32", HQ="i32", GROUP="i32",
                    N_ITEMS="i32", CU_SEQLENS_Q=("*i32", 16) if varlen else None,
                    CU_SEQLENS_K=("*i32", 16) if varlen else None, TILES=("*i32", 16) if varlen else None,
                    TAIL_SEQUENCES="i32",
                    HEAD_DIM=[head_dim], D_PAD=[head_dim], PAIRS=[head_dim // 2], INTERLEAVED=[interleaved],
                    HAS_POS=[positions or varlen], CAUSAL=[causal], VARLEN=[varlen], ROTATE_K=[rotate_k],
                    DESCENDING=[descending], PERSISTENT=[hopper_bwd.persistent(causal, varlen, head_dim)],
                    STAGES=[stages], BLOCK_N=[block_n], CONSUMER_REGS=[consumer_regs])
        source = GluonASTSource(fn=hopper_bwd.rope_attention_bwd_hopper_kernel, **signature_of(args))
        return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, maxnreg=maxnreg))

    results = {}
    for case in json.loads(sys.argv[1]):
        compiled = compile_bwd(*case)
        ptx = compiled.asm["ptx"]
        results[repr(case)] = dict(spills=spill_bytes(ptx), wgmma=ptx.count("wgmma.mma_async"),
                                   setmaxnreg=ptx.count("setmaxnreg"), reduce=ptx.count("cp.reduce.async.bulk"),
                                   shared=compiled.metadata.shared)
    print(json.dumps(results))
""")

# (head dim, causal, dtype[, varlen[, keys rotated inside[, interleaved[, positions[, descending]]]]]):
# the head dims the Gluon backward serves (`dispatch.HOPPER_BACKWARD_HEAD_DIMS`), packed documents, keys
# from the rope pass (the frequency gradient needs K^) and rotated in the kernel (interleaved, with
# positions), and the query tiles from the last down (causal GQA)
BACKWARD_CASES = [(64, False, "bf16"), (64, True, "fp16"), (128, False, "bf16"), (128, True, "bf16"),
                  (128, True, "bf16", True), (64, False, "fp16", True), (128, True, "bf16", False, False),
                  (64, True, "fp16", True, False), (128, False, "fp16", False, True, True, True),
                  (256, True, "bf16", False, False), (256, False, "fp16", True, False),
                  (128, True, "bf16", False, True, False, False, True), (128, True, "bf16", True, True, False, False, True),
                  (64, True, "bf16", False, True, False, False, True), (256, True, "bf16", False, False, False, False, True)]
# ptxas keeps some values of the D >= 128 consumers in local memory (spill stores + loads; at
# D = 128 about 20 of each per step in the unmasked loop, 4% of a consumer's stall samples on an
# H100, bench/RESULTS.md 2026-11-27): at D = 128 136-488 bytes with Triton 3.6's (the
# GPU image's; 296 for interleaved keys rotated in the kernel at given positions), 780-1252
# with 3.9's (2026-11-26, with dk rotated back in the epilogue; three loops of steps: masked,
# unmasked, a partial last tile); at D = 256 (features split between the warpgroups, P^T and
# dS^T handed over; 2026-11-27) 108-120 with 3.6's, 632-640 with 3.9's. More means a regression.
BACKWARD_SPILL_BOUND = 1280
SM90_SHARED_BYTES = 232448  # a block's shared memory on sm_90 (227 KB)


@pytest.mark.skipif(not compat.SUPPORTED, reason=f"Gluon kernels need Triton >= {compat.MIN_TRITON}")
def test_hopper_backward_compiles_for_sm90():
    results = compile_in_subprocess(BACKWARD_COMPILE, BACKWARD_CASES)
    for case in BACKWARD_CASES:
        facts = results[repr(list(case))]
        assert facts["spills"] <= BACKWARD_SPILL_BOUND, (case, facts)
        assert facts["shared"] <= SM90_SHARED_BYTES, (case, facts)  # D = 256 leaves about 2 KB
        # warp-specialized, async wgmma, and dQ^ summed by TMA reduce-adds
        assert facts["setmaxnreg"] > 0 and facts["wgmma"] > 0 and facts["reduce"] > 0, (case, facts)


DECODE_COMPILE = PRELUDE + textwrap.dedent("""
    from triton.compiler import ASTSource
    from ropefast.kernels import decode

    def pad(n):
        return max(16, triton.next_power_of_2(n))

    def build(fn, args, num_warps, num_stages):
        return triton.compile(ASTSource(fn=fn, **signature_of(args)), target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))

    def compile_decode(dtype, head_dim, rotary_dim, group, nq, interleaved, paged, causal, temperature, splits):
        block_m = min(pad(group * nq), decode.MAX_BLOCK_M)
        block_n, num_warps, num_stages, _ = decode.decode_config((9, 0), block_m, pad(head_dim), paged)
        ptr = (f"*{dtype}", 16)
        args = dict(Q=ptr, K_CACHE=ptr, V_CACHE=ptr, CACHE_SEQLENS=("*i32", 16),
                    BLOCK_TABLE=("*i32", 16) if paged else None, INV_FREQ=("*fp32", 16),
                    TEMP=("*fp32", 16) if temperature else None, O=ptr, LSE=("*fp32", 16),
                    O_PART=("*fp32", 16) if splits > 1 else None, LSE_PART=("*fp32", 16) if splits > 1 else None,
                    **{n: ("i32", 16) for n in "stride_qb stride_qn stride_qh stride_kn stride_kh".split()},
                    stride_kb=("i64", 16), stride_vb=("i64", 16), stride_vn=("i32", 16), stride_vh=("i32", 16),
                    **{n: ("i32", 16) for n in "stride_ob stride_on stride_oh".split()},
                    **{n: "i32" for n in "stride_table_b stride_temp_b stride_temp_n NQ N_NEW HKV".split()},
                    page_size=("i32", 16) if paged else [1], num_pages="i32", capacity="i32", rot_scale="fp32",
                    pass_scale="fp32", GROUP=[group],
                    HEAD_DIM=[head_dim], D_PAD=[pad(head_dim)], ROTARY_DIM=[rotary_dim], PAIRS=[rotary_dim // 2],
                    PAIRS_PAD=[pad(rotary_dim // 2)], PASS=[head_dim - rotary_dim],
                    PASS_PAD=[pad(head_dim - rotary_dim)],
                    INTERLEAVED=[interleaved], PAGED=[paged], CAUSAL=[causal], HAS_TEMP=[temperature],
                    NUM_SPLITS=[splits], BLOCK_M=[block_m], BLOCK_N=[block_n],
                    DOT_PRECISION=["tf32"], MUFU=[True])
        return build(decode.decode_attention_kernel, args, num_warps, num_stages)

    results = {}
    for case in json.loads(sys.argv[1]):
        ptx = compile_decode(*case).asm["ptx"]
        results[repr(case)] = dict(spills=spill_bytes(ptx), mma=ptx.count("mma"))  # mma.sync or wgmma
    ptr = ("*bf16", 16)
    for paged in (False, True):
        build(decode.append_kernel, dict(
            K_NEW=ptr, V_NEW=ptr, K_CACHE=ptr, V_CACHE=ptr, CACHE_SEQLENS=("*i32", 16),
            BLOCK_TABLE=("*i32", 16) if paged else None,
            **{n: "i32" for n in "stride_knb stride_knn stride_knh stride_vnb stride_vnn stride_vnh stride_kcb "
               "stride_kcn stride_kch stride_vcb stride_vcn stride_vch stride_table_b N_NEW HKV page_size num_pages "
               "capacity".split()},
            HEAD_DIM=[128], D_PAD=[128], PAGED=[paged], BLOCK_N=[16]), 4, 1)
    build(decode.combine_kernel, dict(
        O_PART=("*fp32", 16), LSE_PART=("*fp32", 16), O=ptr, LSE=("*fp32", 16),
        **{n: "i32" for n in "stride_ob stride_on stride_oh ROWS HQ NQ".split()}, HEAD_DIM=[128], D_PAD=[128],
        NUM_SPLITS=[33], SPLITS_PAD=[64]), 4, 1)
    print(json.dumps(results))
""")

# (dtype, head dim, rotary dim, GQA group, new tokens, interleaved, paged, causal, temperature,
# splits): Llama-style decode dense and paged, split and not, a 4-token chunk, a 64-row
# block of chunked prefill, partial interleaved rotary with a temperature, D = 64 and 256.
DECODE_CASES = [("bf16", 128, 128, 4, 1, False, False, True, False, 1),
                ("bf16", 128, 128, 4, 1, False, True, True, False, 16),
                ("bf16", 128, 128, 4, 4, False, True, True, False, 4),
                ("bf16", 128, 128, 8, 16, False, False, True, False, 1),
                ("fp16", 128, 64, 4, 1, True, True, True, True, 8),
                ("bf16", 64, 64, 8, 1, False, True, False, False, 2),
                ("bf16", 256, 256, 4, 1, False, False, True, False, 8)]


def test_decode_kernels_compile_for_sm90_without_spills():
    results = compile_in_subprocess(DECODE_COMPILE, DECODE_CASES)
    for case, facts in results.items():
        assert facts["spills"] == 0 and facts["mma"] > 0, (case, facts)
