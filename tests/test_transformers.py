"""The HF transformers backend (`ropefast.integrations.transformers.patch_model`) against
transformers' own eager attention, on tiny random models of each family (hidden 64, 2 layers,
4 heads of 16, 2 KV heads, vocab 128) and rope type: logits and every parameter's gradient
(float32 on the CPU, bfloat16 on a GPU), greedy generation, padded and packed batches, and
the errors for what is not supported."""

import copy

import pytest
import torch

from conftest import DEVICE, TOLERANCE, rel_err, requires_cuda

transformers = pytest.importorskip("transformers", minversion="5.24")  # setup.py's floor: outputs carry .cache
from ropefast.integrations.transformers import patch_model  # noqa: E402

SIZES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
             vocab_size=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 8}  # + factors
# (model type, rope parameters, other config fields); N = 12 tokens exceeds every original length
CASES = {
    "llama-default": ("llama", {"rope_type": "default", "rope_theta": 10000.0}, {}),
    "llama-linear": ("llama", {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}, {}),
    "llama-dynamic": ("llama", {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
                      dict(max_position_embeddings=8)),
    "llama-yarn": ("llama", {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                             "original_max_position_embeddings": 8}, {}),
    "llama-llama3": ("llama", {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8}, {}),
    "mistral-default": ("mistral", {"rope_type": "default", "rope_theta": 10000.0}, dict(sliding_window=None)),
    "qwen2-yarn": ("qwen2", {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0,
                             "original_max_position_embeddings": 8}, {}),
    "qwen3-default": ("qwen3", {"rope_type": "default", "rope_theta": 1000000.0}, dict(head_dim=16)),
    "phi3-longrope-partial": ("phi3", {**LONGROPE, "partial_rotary_factor": 0.5}, dict(max_position_embeddings=32)),
}
STATIC = ["llama-yarn", "llama-llama3", "qwen3-default", "phi3-longrope-partial"]


def tiny_model(case, dtype=torch.float32, device="cpu", **overrides):
    model_type, rope, extra = CASES[case]
    fields = {**SIZES, "max_position_embeddings": 64, **extra, **overrides}
    rope = dict(rope)
    if rope["rope_type"] == "longrope":  # a factor per rotated pair, short ones below the long ones
        pairs = int(fields["hidden_size"] // fields["num_attention_heads"] * rope["partial_rotary_factor"]) // 2
        rope.update(short_factor=[1.0 + 0.6 * i / pairs for i in range(pairs)],
                    long_factor=[1.5 + 4.5 * i / pairs for i in range(pairs)])
    config = transformers.AutoConfig.for_model(model_type, **fields, rope_parameters=rope,
                                               attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # norm weights away from 1, so a norm applied twice or not at all shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model.to(device=device, dtype=dtype)


def pair(case, **kwargs):
    """(transformers' eager model, the same weights patched)."""
    eager = tiny_model(case, **kwargs)
    return eager, patch_model(copy.deepcopy(eager))


def tokens(batch, n, device="cpu", seed=1):
    return torch.randint(3, 128, (batch, n), generator=torch.Generator().manual_seed(seed)).to(device)


def grads(model):
    return {name: p.grad for name, p in model.named_parameters()}


def check_grads(ours, theirs, tol):
    for name, grad in theirs.items():
        assert rel_err(ours[name], grad) < tol, name


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_gradients(case):
    eager, patched = pair(case)
    ids = tokens(2, 12)
    outs = [model(ids, labels=ids, use_cache=False) for model in (eager, patched)]
    for out in outs:
        out.loss.backward()
    assert rel_err(outs[1].logits, outs[0].logits) < TOLERANCE[torch.float32]
    check_grads(grads(patched), grads(eager), TOLERANCE[torch.float32])


def test_inference_mode_forwards_equal_eager():
    """Inference tensors carry no version counter (the plan memo keys them on the model's
    forwards): two forwards under torch.inference_mode, the position buffer refilled in place
    between them, each equal eager."""
    eager, patched = pair("llama-yarn")
    ids = tokens(2, 12)
    with torch.inference_mode():
        positions = torch.arange(12)[None]
        for shift in (0, 3):
            positions.copy_(torch.arange(12)[None] + shift)
            logits = [model(ids, position_ids=positions).logits for model in (eager, patched)]
            assert rel_err(logits[1], logits[0]) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("case", STATIC)
def test_greedy_generate_equals_eager(case):
    eager, patched = pair(case)
    prompt = tokens(2, 9)  # past every original length: LongRoPE stays on its long factors
    expected = eager.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False)
    got = patched.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False)
    assert torch.equal(got, expected)


def test_cache_holds_unrotated_keys_and_beam_search_equals_eager():
    eager, patched = pair("qwen3-default")
    prompt = tokens(2, 6)
    out = patched(prompt, use_cache=True)
    layer = out.cache.layers[0]
    attention = patched.model.layers[0].self_attn
    hidden = patched.model.layers[0].input_layernorm(patched.model.embed_tokens(prompt))
    keys = attention.k_norm(attention.k_proj(hidden).view(2, 6, 2, 16))  # normed, never rotated
    assert layer.get_seq_length() == 6 and torch.equal(layer.keys[:, :6], keys)
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=3, do_sample=False, num_beams=2)
    assert torch.equal(patched.generate(prompt, **kwargs), eager.generate(prompt, **kwargs))


def test_generate_keeps_dynamic_schedules_exact():
    """The cache holds unrotated keys, so each step rotates every key with the frequencies of
    the current length: in a one-layer model (where nothing else carries the past lengths'
    frequencies) each step's logits equal a forward over the whole prefix. Transformers'
    cache keeps each key rotated with the frequencies of its own step, so its steps do not."""
    eager, patched = pair("llama-dynamic", num_hidden_layers=1)
    prompt = tokens(1, 6)  # 6 tokens, then 7, 8, 9 > max_position_embeddings = 8: the base moves
    errors = {}
    for name, model in (("eager", eager), ("ropefast", patched)):
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
        errors[name] = max(rel_err(logits, model(out.sequences[:, :6 + step], use_cache=False).logits[:, -1])
                           for step, logits in enumerate(out.logits))
    assert errors["ropefast"] < TOLERANCE[torch.float32] < errors["eager"]


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch(side):
    eager, patched = pair("qwen3-default")
    ids = tokens(3, 12)
    mask = torch.ones_like(ids)
    for row, pads in ((0, 5), (2, 3)):  # row 1 unpadded
        mask[row, :pads] = 0 if side == "left" else 1
        mask[row, 12 - pads:] = 0 if side == "right" else 1
    real = mask.bool()
    outs = [model(ids, attention_mask=mask, use_cache=False) for model in (eager, patched)]
    for out in outs:  # a loss of the real rows only (padded rows' outputs differ: ropefast's are 0)
        out.logits[real].square().mean().backward()
    assert rel_err(outs[1].logits[real], outs[0].logits[real]) < TOLERANCE[torch.float32]
    check_grads(grads(patched), grads(eager), TOLERANCE[torch.float32])


def test_padded_generate_equals_eager():
    eager, patched = pair("llama-yarn")
    prompt = tokens(2, 10)
    mask = torch.ones_like(prompt)
    mask[0, :4] = 0  # left padding, as generate() expects
    expected = eager.generate(prompt, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(patched.generate(prompt, attention_mask=mask, max_new_tokens=4, do_sample=False), expected)


@pytest.mark.parametrize("collator_kwargs", [False, True], ids=["position_ids", "cu_seq_lens"])
def test_packed_rows_equal_documents_one_by_one(collator_kwargs):
    eager, patched = pair("phi3-longrope-partial")
    lengths = [4, 3, 5]
    ids = tokens(1, sum(lengths))
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    kwargs = dict(position_ids=position_ids)
    if collator_kwargs:  # as DataCollatorWithFlattening(return_flash_attn_kwargs=True) gives them
        cu = torch.tensor([0, 4, 7, 12], dtype=torch.int32)
        kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=5, max_length_k=5)
    packed = patched(ids, **kwargs)
    starts = [0, 4, 7, 12]
    one_by_one = torch.cat([patched(ids[:, a:b]).logits for a, b in zip(starts, starts[1:])], dim=1)
    assert rel_err(packed.logits, one_by_one) < TOLERANCE[torch.float32]
    # and transformers' eager, which masks packed rows when no cache is made
    packed.logits.square().mean().backward()
    eager_packed = eager(ids, position_ids=position_ids, use_cache=False).logits
    eager_packed.square().mean().backward()
    assert rel_err(packed.logits, eager_packed) < TOLERANCE[torch.float32]
    check_grads(grads(patched), grads(eager), TOLERANCE[torch.float32])


def test_positions_offset_equal_eager():
    eager, patched = pair("llama-llama3")
    ids, position_ids = tokens(2, 8), torch.arange(5, 13)[None]
    expected = eager(ids, position_ids=position_ids).logits
    assert rel_err(patched(ids, position_ids=position_ids).logits, expected) < TOLERANCE[torch.float32]


def test_patched_model_keeps_its_parameters():
    eager, patched = pair("qwen3-default")
    assert list(patched.state_dict()) == list(eager.state_dict())
    assert patched.config._attn_implementation == "ropefast"
    assert sum(p.numel() for p in patched.parameters()) == sum(p.numel() for p in eager.parameters())


def test_sliding_window_within_the_window_is_exact_and_past_it_raises():
    eager, patched = pair("mistral-default", sliding_window=12)
    ids = tokens(1, 12)
    assert rel_err(patched(ids).logits, eager(ids).logits) < TOLERANCE[torch.float32]
    with pytest.raises(ValueError, match="sliding window of 12"):
        patched(tokens(1, 13))


def test_unsupported_models_and_configs_raise():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="supports the model types llama, mistral, qwen2, qwen3, phi3"):
        patch_model(gpt2)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        patch_model(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="attention_dropout"):
        patch_model(tiny_model("llama-default", attention_dropout=0.1))
    # Llama's rotary embedding ignores a partial rotary factor for default rope: the two disagree
    with pytest.raises(ValueError, match="disagrees with the model's"):
        patch_model(tiny_model("llama-default", partial_rotary_factor=0.5))
    patched = patch_model(tiny_model("llama-default"))
    cache = transformers.StaticCache(config=patched.config, max_cache_len=16)
    with pytest.raises(ValueError, match="DynamicCache"):
        patched(tokens(1, 4), cache=cache, use_cache=True)


@requires_cuda
@pytest.mark.parametrize("case", ["llama-llama3", "qwen3-default", "phi3-longrope-partial"])
def test_bf16_logits_and_gradients_on_gpu(case):
    """bf16 on a GPU, at a size the kernels tile (head dim 64, 256 tokens): ropefast's error
    against float32 eager within bf16's tolerance, and not far above bf16 eager's own."""
    sizes = dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=2, intermediate_size=1024)
    if case == "qwen3-default":
        sizes["head_dim"] = 64
    models = {dtype: tiny_model(case, dtype=dtype, device=DEVICE, **sizes) for dtype in (torch.float32, torch.bfloat16)}
    models["ropefast"] = patch_model(copy.deepcopy(models[torch.bfloat16]))
    ids = tokens(2, 256, device=DEVICE)
    logits = {}
    for key, model in models.items():
        out = model(ids, labels=ids, use_cache=False)
        out.loss.backward()
        logits[key] = out.logits
    truth, theirs, ours = models[torch.float32], models[torch.bfloat16], models["ropefast"]
    bound = max(TOLERANCE[torch.bfloat16], 1.5 * rel_err(logits[torch.bfloat16], logits[torch.float32]))
    assert rel_err(logits["ropefast"], logits[torch.float32]) < bound
    truth_grads, their_grads = grads(truth), grads(theirs)
    for name, grad in grads(ours).items():
        bound = max(TOLERANCE[torch.bfloat16], 1.5 * rel_err(their_grads[name], truth_grads[name]))
        assert rel_err(grad, truth_grads[name]) < bound, name
