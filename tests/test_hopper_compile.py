"""The Gluon Hopper forward compiled for sm_90 on any machine (Triton's bundled ptxas), in
every variant the dispatcher can launch: it must compile and keep every value in registers
(a spill in a consumer warpgroup costs more than the overlap gains)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from ropefast.kernels.hopper import compat

COMPILE = textwrap.dedent("""
    import json, os, re, subprocess, sys, tempfile
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.experimental.gluon._runtime import GluonASTSource
    from ropefast.kernels.hopper import attention_fwd as hopper

    def compile_fwd(head_dim, rotary_dim, causal, interleaved, positions, temperature, dtype):
        d_pad = max(16, triton.next_power_of_2(head_dim))
        block_n, stages, consumer_regs, maxnreg = hopper.fwd_config(d_pad)
        torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        def desc(block):
            return f"tensordesc<{dtype}[{', '.join(map(str, block))}],{hopper.shared_layout(block, torch_dtype)!r}>"
        # the launch's specialization: 16-byte aligned pointers and row strides
        args = dict(Q=(f"*{dtype}", 16), stride_qb=("i64", 16), stride_qn=("i32", 16), stride_qh=("i32", 16),
                    k_desc=desc([1, block_n, d_pad]), v_desc=desc([1, block_n, 1, d_pad]),
                    o_desc=desc([1, 64, 1, d_pad]), LSE=("*fp32", 16), INV_FREQ=("*fp32", 16),
                    Q_POS=("*i64", 16) if positions else None, stride_pos_b="i32", stride_pos_n="i32",
                    TEMP=("*fp32", 16) if temperature else None, stride_temp_b="i32", stride_temp_n="i32",
                    NQ="i32", NK="i32", HQ="i32", GROUP="i32", n_items="i32", q_pos_offset="i32", row_scale="fp32",
                    rot_scale="fp32", HEAD_DIM=[head_dim], D_PAD=[d_pad], PAIRS=[rotary_dim // 2],
                    INTERLEAVED=[interleaved], HAS_POS=[positions], HAS_TEMP=[temperature], CAUSAL=[causal],
                    BLOCK_N=[block_n], STAGES=[stages], CONSUMER_REGS=[consumer_regs])
        signature, constexprs, attrs = {}, {}, {}
        for i, (name, spec) in enumerate(args.items()):
            if spec is None or isinstance(spec, list):
                signature[name], constexprs[(i,)] = "constexpr", None if spec is None else spec[0]
            elif isinstance(spec, tuple):
                signature[name], attrs[(i,)] = spec[0], [["tt.divisibility", spec[1]]]
            else:
                signature[name] = spec
        source = GluonASTSource(fn=hopper.rope_attention_fwd_hopper_kernel, signature=signature,
                                constexprs=constexprs, attrs=attrs)
        return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, maxnreg=maxnreg))

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

    results = {}
    for case in json.loads(sys.argv[1]):
        kernel = compile_fwd(*case)
        ptx = kernel.asm["ptx"]
        results[repr(case)] = dict(spills=spill_bytes(ptx), wgmma=ptx.count("wgmma.mma_async"),
                                   setmaxnreg=ptx.count("setmaxnreg"), tma=ptx.count("cp.async.bulk.tensor"))
    print(json.dumps(results))
""")

# (head dim, rotary dim, causal, interleaved, positions, temperature, dtype): the configs of
# fwd_config and each way the queries load (halves, interleaved, slot order).
CASES = [(64, 64, False, False, False, False, "bf16"), (64, 64, True, False, False, False, "bf16"),
         (128, 128, False, False, False, False, "bf16"), (128, 128, True, False, False, False, "bf16"),
         (256, 256, False, False, False, False, "bf16"), (256, 256, True, False, False, False, "bf16"),
         (80, 48, True, True, True, True, "bf16"), (128, 64, True, False, True, True, "fp16"),
         (40, 24, False, False, False, False, "fp16")]


@pytest.mark.skipif(not compat.SUPPORTED, reason=f"Gluon kernels need Triton >= {compat.MIN_TRITON}")
def test_hopper_forward_compiles_for_sm90_without_spills():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", COMPILE, json.dumps(CASES)], env=env, capture_output=True,
                            text=True, timeout=900)
    if "ptxas" in result.stderr and "not found" in result.stderr.lower():
        pytest.skip("Triton ships no ptxas here")
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    for case, facts in results.items():
        assert facts["spills"] == 0, (case, facts)
        # warp-specialized: register reallocation, TMA loads and async wgmma are all there
        assert facts["setmaxnreg"] > 0 and facts["tma"] > 0 and facts["wgmma"] > 0, (case, facts)
