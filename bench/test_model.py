"""A whole model (CUDA and transformers only): a Llama-style model of about 1.2B parameters
with random weights, bf16, one sequence of 8k tokens, timed as a train step (forward with
the causal-LM loss, then backward), as a prefill (forward filling the cache, last logit
only) and as one decode step after the 8k prompt (the cache cropped back after each, so
every step is alike), in tokens/s, with `ropefast.integrations.transformers.patch_model`
against the same model on transformers' attn_implementation "sdpa" and "flex_attention",
in one pytest run.

Cases: "llama3.2-1b" is Llama-3.2-1B's shape (hidden 2048, 16 layers, 32 heads of 64, 8 KV
heads, intermediate 8192, vocab 128256, llama3 rope x32); "d128-yarn" the same model with
16 heads of 128 and 4 KV heads under YaRN x4. `extra_info`: median ms, tokens/s, peak memory
and, on ropefast's tests (last of each case and mode), its speedup over each peer.
Run: `pytest bench/test_model.py --benchmark-only [--benchmark-json model.json]`.
"""

import copy

import pytest
import torch

from ropefast import dispatch

from .peers import peak_mib

transformers = pytest.importorskip("transformers")

SEQ_LEN = 8192
SIZES = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, vocab_size=128256,
             max_position_embeddings=131072, tie_word_embeddings=True)
CASES = {
    "llama3.2-1b": dict(num_attention_heads=32, num_key_value_heads=8, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "d128-yarn": dict(num_attention_heads=16, num_key_value_heads=4, rope_parameters={
        "rope_type": "yarn", "rope_theta": 500000.0, "factor": 4.0, "original_max_position_embeddings": 32768}),
}
IMPLS = ("sdpa", "flex_attention", "ropefast")  # ropefast last: its speedups need the peers
PARAMS = [pytest.param(case, mode, impl, id=f"{case}-N{SEQ_LEN // 1024}k-{mode}-{impl}")
          for case in CASES for mode in ("train", "prefill", "decode") for impl in IMPLS]
_TOKENS_PER_S = {}  # (case, mode) -> {impl: tokens/s} measured in this pytest run
_MODEL = {}  # the last model built: (case, impl) -> model (one at a time: each is 2.5 GB)


def build(case, impl):
    """The case's model with the same random weights for every impl, bf16 on the GPU."""
    if (case, impl) not in _MODEL:
        _MODEL.clear()
        torch.cuda.empty_cache()
        config = transformers.LlamaConfig(**SIZES, **copy.deepcopy(CASES[case]),
                                          attn_implementation="sdpa" if impl == "ropefast" else impl)
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
        if impl == "ropefast":
            from ropefast.integrations.transformers import patch_model

            model = patch_model(model)
        _MODEL[(case, impl)] = model
    return _MODEL[(case, impl)]


def make_step(model, mode, ids):
    if mode == "train":
        model.train()

        def step():
            model.zero_grad(set_to_none=True)
            model(ids, labels=ids, use_cache=False).loss.backward()
    elif mode == "prefill":
        model.eval()

        @torch.inference_mode()
        def step():
            model(ids, use_cache=True, logits_to_keep=1)
    else:
        model.eval()
        with torch.inference_mode():
            out = model(ids, use_cache=True, logits_to_keep=1)
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        position = torch.full((1, 1), ids.shape[1], device=ids.device)

        @torch.inference_mode()
        def step():
            model(token, cache=cache, use_cache=True, position_ids=position, logits_to_keep=1)
            cache.crop(-1)
    return step


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the model benchmark runs on a CUDA GPU")
@pytest.mark.parametrize("case,mode,impl", PARAMS)
def test_model(benchmark, case, mode, impl):
    model = build(case, impl)
    ids = torch.randint(0, SIZES["vocab_size"], (1, SEQ_LEN), device="cuda",
                        generator=torch.Generator(device="cuda").manual_seed(0))
    step = make_step(model, mode, ids)
    try:
        step()  # compile / warm up
    except RuntimeError as err:
        if impl == "ropefast":
            raise
        pytest.skip(f"{impl} cannot run {case} {mode}: {str(err).splitlines()[0][:200]}")
    import triton

    ms = triton.testing.do_bench(step, warmup=500, rep=3000, return_mode="median")  # ~10 timed steps
    tokens_per_s = (1 if mode == "decode" else SEQ_LEN) / ms * 1e3
    peers = _TOKENS_PER_S.setdefault((case, mode), {})
    peers[impl] = tokens_per_s
    info = benchmark.extra_info
    path = "torch"
    if impl == "ropefast":  # the dense op's forward path at this head dim (causal)
        head_dim = SIZES["hidden_size"] // CASES[case]["num_attention_heads"]
        path = dispatch.forward_path(torch.empty(1, SEQ_LEN, 1, head_dim, device="cuda", dtype=torch.bfloat16))
    info.update(gpu=torch.cuda.get_device_name(), case=case, mode=mode, impl=impl, path=path, seq_len=SEQ_LEN, batch=1,
                params_b=sum(p.numel() for p in model.parameters()) / 1e9, median_ms=ms, tokens_per_s=tokens_per_s,
                peak_mib=peak_mib(step, "cuda"))
    if impl == "ropefast":
        info["speedup"] = {peer: tokens_per_s / value for peer, value in peers.items() if peer != impl}

    def synced():
        step()
        torch.cuda.synchronize()

    benchmark.group = f"model {case} N{SEQ_LEN // 1024}k {mode}"
    benchmark.pedantic(synced, rounds=3, warmup_rounds=0)
