"""`scaled_rope_attention_with_kvcache` against the float64 reference of full attention.

A generation loop (a prefill chunk, then decode steps of one and several tokens) writes
unrotated keys into a dense or paged cache through the op; at every step the output must
equal `scaled_rope_attention_reference` over the sequence's whole prefix (its last Nq
queries). CPU: the decode kernels under TRITON_INTERPRET=1 (float32, float16), or the
reference path (float64). GPU: bfloat16 at Llama sizes.
"""

import pytest
import torch

from ropefast import dispatch, scaled_rope_attention_with_kvcache, schedules
from ropefast.kernels.decode import INTERPRETER_CONFIG, decode_config, decode_splits
from ropefast.reference import rotate, scaled_rope_attention_reference

from conftest import DEVICE, TOLERANCE, rel_err, requires_cuda, requires_kernel


class Generation:
    """A batch of sequences with their keys and values kept on the side (unrotated, float64)
    and a cache, dense [B, capacity, Hkv, D] or paged (page_size rows a page, pages in a
    shuffled order, a spare page). Unused cache rows hold NaN: a kernel that reads one fails."""

    def __init__(self, batch, hq, hkv, head_dim, dtype, device, *, capacity=64, paged=False, page_size=16,
                 start=(0,), seed=0):
        self.gen = torch.Generator().manual_seed(seed)
        self.shape, self.dtype, self.device = (batch, hq, hkv, head_dim), dtype, device
        self.block_table = None
        if paged:
            pages = capacity // page_size
            order = torch.randperm(batch * pages + 1, generator=self.gen)[:batch * pages]
            self.block_table = order.view(batch, pages).to(device, torch.int32)
            cache_shape = (batch * pages + 1, page_size, hkv, head_dim)
        else:
            cache_shape = (batch, capacity, hkv, head_dim)
        self.k_cache = torch.full(cache_shape, float("nan"), device=device, dtype=dtype)
        self.v_cache = torch.full(cache_shape, float("nan"), device=device, dtype=dtype)
        self.keys = [torch.zeros(0, hkv, head_dim, dtype=torch.float64) for _ in range(batch)]
        self.values = [torch.zeros(0, hkv, head_dim, dtype=torch.float64) for _ in range(batch)]
        self.lens = torch.zeros(batch, dtype=torch.int32, device=device)
        lengths = [start[b % len(start)] for b in range(batch)]
        if max(lengths):  # rows written directly, as another writer of the cache would
            for b, n in enumerate(lengths):
                k, v = self.randn(n, hkv, head_dim), self.randn(n, hkv, head_dim)
                self._write(b, 0, k, v)
            self.lens += torch.tensor(lengths, dtype=torch.int32, device=device)

    def randn(self, *shape):
        return torch.randn(*shape, generator=self.gen).to(self.device, self.dtype)

    def _write(self, b, at, k, v):
        for j in range(k.shape[0]):
            row = at + j
            if self.block_table is None:
                index = (b, row)
            else:
                page_size = self.k_cache.shape[1]
                index = (int(self.block_table[b, row // page_size]), row % page_size)
            self.k_cache[index], self.v_cache[index] = k[j], v[j]
        self.keys[b] = torch.cat((self.keys[b], k.cpu().double()))
        self.values[b] = torch.cat((self.values[b], v.cpu().double()))

    def step(self, nq, *, ref_inv_freq=None, ref_temperature=None, **kw):
        """One call with nq new tokens per sequence and arguments kw; returns the errors of
        out and lse against the reference over each whole prefix, and (q, out, lse). The
        reference takes kw's inv_freq and q_temperature, or those a schedule gives
        (ref_inv_freq, ref_temperature)."""
        batch, hq, hkv, head_dim = self.shape
        q = self.randn(batch, nq, hq, head_dim)
        k_new, v_new = self.randn(batch, nq, hkv, head_dim), self.randn(batch, nq, hkv, head_dim)
        out, lse = scaled_rope_attention_with_kvcache(
            q, self.k_cache, self.v_cache, k_new=k_new, v_new=v_new, cache_seqlens=self.lens,
            block_table=self.block_table, return_lse=True, **kw)
        for b in range(batch):
            self.keys[b] = torch.cat((self.keys[b], k_new[b].cpu().double()))
            self.values[b] = torch.cat((self.values[b], v_new[b].cpu().double()))
        self.lens += nq
        if ref_temperature is not None:
            kw["q_temperature"] = ref_temperature
        ref_out, ref_lse = self.reference(q, kw, ref_inv_freq)
        assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (batch, hq, nq)
        return rel_err(out, ref_out), rel_err(lse, ref_lse), (q, out, lse)

    def reference(self, q, kw, inv_freq=None):
        """Full attention over each sequence's whole prefix, float64, last Nq queries."""
        rope = {key: kw[key] for key in ("rotary_dim", "interleaved", "rotary_scale", "softmax_scale", "causal")
                if key in kw}
        rope.setdefault("causal", True)
        temperature = kw.get("q_temperature")
        outs, lses = [], []
        for b in range(q.shape[0]):
            t = None if temperature is None else temperature.expand(q.shape[0], -1)[b:b + 1].cpu().double()
            out, lse = scaled_rope_attention_reference(
                q[b:b + 1].cpu().double(), self.keys[b][None], self.values[b][None],
                inv_freq=(kw["inv_freq"] if inv_freq is None else inv_freq).cpu(), q_temperature=t,
                return_lse=True, **rope)
            outs.append(out)
            lses.append(lse)
        return torch.cat(outs), torch.cat(lses)


def inv_freq_for(rotary_dim, device):
    return schedules.YaRN(rotary_dim, factor=4.0, original_max_position_embeddings=16).inv_freq(device=device)


# (Hq, Hkv, D, R, cache and call options) for the generation loop; every loop runs a prefill
# chunk of 8, three single-token steps and a 3-token step, from unequal starting lengths.
LOOP_CASES = {
    "dense-gqa2-split1": (4, 2, 32, 32, dict(paged=False), dict(num_splits=1)),
    "paged16-gqa4-partial-interleaved-split3": (4, 1, 32, 16, dict(paged=True), dict(num_splits=3, interleaved=True)),
    "paged16-gqa2-temperature-scale-default-splits": (4, 2, 48, 32, dict(paged=True),
                                                       dict(rotary_scale=1.3, temperature=True)),
    "dense-mha-noncausal-split2": (2, 2, 32, 32, dict(paged=False), dict(num_splits=2, causal=False)),
}


@requires_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", LOOP_CASES)
def test_generation_loop_equals_full_attention(name, dtype):
    hq, hkv, head_dim, rotary_dim, cache_kw, call_kw = LOOP_CASES[name]
    assert dispatch.path(torch.empty(0, device=DEVICE, dtype=dtype)) in ("interpreter", "kernel", "hopper")
    run = Generation(2, hq, hkv, head_dim, dtype, DEVICE, start=(5, 13), **cache_kw)
    call_kw = dict(call_kw, inv_freq=inv_freq_for(rotary_dim, DEVICE), rotary_dim=rotary_dim)
    temperature = call_kw.pop("temperature", False)
    for nq in (8, 1, 1, 1, 3):
        if temperature:
            call_kw["q_temperature"] = (torch.rand(2, nq, generator=run.gen) + 0.5).to(DEVICE)
        err_out, err_lse, _ = run.step(nq, **call_kw)
        assert err_out < TOLERANCE[dtype], (nq, err_out)
        assert err_lse < TOLERANCE[dtype], (nq, err_lse)


@requires_kernel
@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged16"])
def test_dynamic_ntk_stays_exact_where_a_rotated_cache_drifts(paged):
    # Dynamic NTK changes every frequency once the length passes max_position_embeddings. A
    # cache of keys rotated when written keeps the old angles; ours rotates them at each read.
    head_dim, threshold = 32, 24
    sched = schedules.DynamicNTKScaling(head_dim, factor=4.0, max_position_embeddings=threshold)
    run = Generation(1, 4, 2, head_dim, torch.float32, DEVICE, paged=paged)
    stale_keys = torch.zeros(0, 2, head_dim, dtype=torch.float64)  # what a rotated cache would hold
    for step, nq in enumerate((16, 4, 4, 1, 1, 1, 3)):
        length = int(run.lens[0]) + nq
        inv_freq = sched.inv_freq(seq_len=length)
        kw = dict(schedule=sched, ref_inv_freq=inv_freq)
        if step % 2:  # the length given, or read off cache_seqlens (the default)
            kw["seq_len"] = length
        err_out, err_lse, (q, out, _) = run.step(nq, **kw)
        assert err_out < 1e-5 and err_lse < 1e-5, (length, err_out, err_lse)
        # the stale cache: new keys rotated now, older ones at the frequencies of their own step
        new_keys = run.keys[0][-nq:]
        positions = torch.arange(length - nq, length)[None]
        stale_keys = torch.cat((stale_keys, rotate(new_keys[None], positions, inv_freq)[0]))
        q_rot = rotate(q.cpu().double(), positions, inv_freq)
        scores = torch.einsum("bihd,bjhd->bhij", q_rot, stale_keys[None].repeat_interleave(2, 2)) * head_dim**-0.5
        visible = torch.arange(length)[None] <= positions[0][:, None]
        probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        stale = torch.einsum("bhij,bjhd->bihd", probs, run.values[0][None].repeat_interleave(2, 2))
        if length > threshold + 2:  # the frequencies have moved: the stale cache is visibly off
            assert rel_err(stale, out) > 1e-3, (length, rel_err(stale, out))
    assert int(run.lens[0]) > threshold


@requires_kernel
def test_schedule_temperature_at_cache_positions():
    # Entropy-ABF scales each query's logits by log_L(p + 1) past L: the op takes the
    # positions from cache_seqlens, per sequence, on the device.
    sched = schedules.EntropyABF(32, original_max_position_embeddings=8)
    run = Generation(2, 4, 2, 32, torch.float32, DEVICE, start=(3, 20), paged=True)
    for nq in (6, 1):
        positions = run.lens.long()[:, None] + torch.arange(nq, device=DEVICE)
        temperature = sched.q_temperature(positions)
        assert temperature.max() > 1.2  # past L: the scaling is on
        err_out, err_lse, _ = run.step(nq, schedule=sched, ref_inv_freq=sched.inv_freq(), ref_temperature=temperature)
        assert err_out < 1e-5 and err_lse < 1e-5, (nq, err_out, err_lse)


@requires_kernel
def test_splits_agree_and_short_sequences_leave_splits_empty():
    # lengths 1 and 40 with up to 7 splits: most of the short sequence's splits hold no key
    results = []
    for splits in (1, 2, 7):  # the same inputs each time
        run = Generation(2, 4, 2, 32, torch.float32, DEVICE, start=(0, 39), paged=True)
        err_out, err_lse, (_, out, lse) = run.step(1, inv_freq=inv_freq_for(32, DEVICE), num_splits=splits)
        assert err_out < 1e-5 and err_lse < 1e-5, (splits, err_out, err_lse)
        results.append((out, lse))
    for out, lse in results[1:]:
        assert rel_err(out, results[0][0]) < 1e-6 and rel_err(lse, results[0][1]) < 1e-6


@requires_kernel
@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged16"])
def test_append_writes_only_the_new_rows(paged):
    run = Generation(2, 4, 2, 32, torch.float16, DEVICE, paged=paged, start=(3, 17))
    before_k, before_v = run.k_cache.clone(), run.v_cache.clone()
    err_out, _, _ = run.step(5, inv_freq=inv_freq_for(32, DEVICE))
    assert err_out < TOLERANCE[torch.float16]
    written = torch.zeros(run.k_cache.shape[:2], dtype=torch.bool, device=DEVICE)
    for b, start in enumerate((3, 17)):
        for j in range(5):
            row = start + j
            index = (b, row) if not paged else (int(run.block_table[b, row // 16]), row % 16)
            written[index] = True
            # bit-exact copies of the unrotated new rows
            assert torch.equal(run.k_cache[index].cpu().double(), run.keys[b][row])
            assert torch.equal(run.v_cache[index].cpu().double(), run.values[b][row])
    for after, before in ((run.k_cache, before_k), (run.v_cache, before_v)):
        assert torch.equal(after[~written].isnan(), before[~written].isnan())
        assert torch.equal(after[~written].nan_to_num(), before[~written].nan_to_num())


@requires_kernel
def test_without_k_new_the_cache_holds_the_queries_tokens():
    # flash-attn's convention: no k_new, the first cache_seqlens rows are the keys and the
    # queries are the last Nq of them; a query with no visible key gets 0 and lse = -inf.
    run = Generation(2, 2, 1, 32, torch.float32, DEVICE, start=(2, 9))
    q = run.randn(2, 4, 2, 32)
    f = inv_freq_for(32, DEVICE)
    out, lse = scaled_rope_attention_with_kvcache(q, run.k_cache, run.v_cache, cache_seqlens=run.lens, inv_freq=f,
                                                  return_lse=True, num_splits=2)
    ref_out, ref_lse = run.reference(q, dict(inv_freq=f))
    assert torch.isneginf(lse[0, :, :2]).all() and (out[0, :2] == 0).all()
    seen = torch.isfinite(ref_lse)
    lse = lse.cpu()
    assert torch.equal(seen, torch.isfinite(lse))
    assert rel_err(out, ref_out) < 1e-5 and rel_err(lse[seen], ref_lse[seen]) < 1e-5


def test_float64_runs_the_reference_exactly():
    run = Generation(2, 4, 2, 16, torch.float64, "cpu", paged=True, start=(1, 6))
    for nq in (4, 1):
        err_out, err_lse, _ = run.step(nq, inv_freq=inv_freq_for(16, "cpu"))
        assert err_out < 1e-12 and err_lse < 1e-12


def test_num_splits_heuristic():
    assert decode_splits(programs=64, capacity=32768, sms=132, programs_per_sm=1) == 2  # B = 8, Hkv = 8: one wave
    assert decode_splits(programs=64, capacity=32768, sms=132, programs_per_sm=2) == 4
    assert decode_splits(programs=8, capacity=1024, sms=132, programs_per_sm=1) == 4  # at least 256 keys a split
    assert decode_splits(programs=1024, capacity=32768, sms=132, programs_per_sm=2) == 1  # a large batch fills it
    assert decode_splits(programs=8, capacity=32768, sms=132, programs_per_sm=1) == 16  # B = 1
    assert decode_splits(programs=1, capacity=65536, sms=132, programs_per_sm=1) == 64  # at most MAX_SPLITS
    assert decode_splits(programs=200, capacity=32768, sms=132, programs_per_sm=1) == 1  # past a wave: no split


def test_decode_configs_by_gpu_and_cache():
    assert decode_config(None, 16, 128, paged=False) == INTERPRETER_CONFIG
    assert decode_config((9, 0), 16, 128, paged=False).block_n == 128  # one program an SM
    assert decode_config((9, 0), 16, 128, paged=True) == decode_config((8, 0), 16, 128, paged=False)
    assert decode_config((9, 0), 64, 128, paged=False) == decode_config((9, 0), 16, 256, paged=False)  # prefill


def _bad(**changes):
    """Arguments of a valid call (dense cache of 32 rows, 2 sequences at lengths 3 and 30,
    one new token), with `changes` applied; values None are removed."""
    k_cache = torch.zeros(2, 32, 2, 16)
    args = dict(q=torch.randn(2, 1, 4, 16), k_cache=k_cache, v_cache=torch.zeros_like(k_cache),
                k_new=torch.randn(2, 1, 2, 16), v_new=torch.randn(2, 1, 2, 16),
                cache_seqlens=torch.tensor([3, 30], dtype=torch.int32), inv_freq=inv_freq_for(16, "cpu"))
    args.update(changes)
    return {key: value for key, value in args.items() if value is not None}


PAGED = dict(k_cache=torch.zeros(5, 16, 2, 16), v_cache=torch.zeros(5, 16, 2, 16),
             block_table=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32))
BAD_CALLS = {
    "past capacity": (_bad(cache_seqlens=torch.tensor([3, 32], dtype=torch.int32)), ValueError, "capacity of 32"),
    "negative length": (_bad(cache_seqlens=torch.tensor([-1, 3], dtype=torch.int32)), ValueError, ">= 0"),
    "int64 lengths": (_bad(cache_seqlens=torch.tensor([3, 3])), TypeError, "cache_seqlens must be int32"),
    "lengths shape": (_bad(cache_seqlens=torch.tensor([3], dtype=torch.int32)), ValueError, "cache_seqlens must be"),
    "k_new alone": (_bad(v_new=None), ValueError, "k_new and v_new together"),
    "k_new shape": (_bad(k_new=torch.randn(2, 2, 2, 16)), ValueError, "k_new must be"),
    "cache dtype": (_bad(v_cache=torch.zeros(2, 32, 2, 16, dtype=torch.float16)), TypeError, "share one dtype"),
    "cache shapes": (_bad(v_cache=torch.zeros(2, 31, 2, 16)), ValueError, "same shape"),
    "gqa": (_bad(q=torch.randn(2, 1, 3, 16)), ValueError, "multiple of the cache's KV heads"),
    "dense batch": (_bad(k_cache=torch.zeros(3, 32, 2, 16), v_cache=torch.zeros(3, 32, 2, 16)), ValueError,
                    "needs block_table"),
    "page out of range": (_bad(**dict(PAGED, cache_seqlens=torch.tensor([3, 20], dtype=torch.int32),
                                      block_table=torch.tensor([[0, 1], [2, 5]], dtype=torch.int32))),
                          ValueError, "outside \\[0, 5\\)"),
    "paged past capacity": (_bad(**PAGED, cache_seqlens=torch.tensor([3, 32], dtype=torch.int32)), ValueError,
                            "capacity of 32"),
    "block_table int64": (_bad(**dict(PAGED, block_table=PAGED["block_table"].long())), TypeError,
                          "block_table must be int32"),
    "num_splits": (_bad(num_splits=0), ValueError, "num_splits"),
    "requires grad": (_bad(q=torch.randn(2, 1, 4, 16, requires_grad=True)), ValueError, "forward only"),
    "no frequencies": (_bad(inv_freq=None), ValueError, "schedule= or inv_freq="),
}


@pytest.mark.parametrize("name", BAD_CALLS)
def test_bad_inputs_raise(name):
    kwargs, error, match = BAD_CALLS[name]
    q, k_cache, v_cache = kwargs.pop("q"), kwargs.pop("k_cache"), kwargs.pop("v_cache")
    with pytest.raises(error, match=match):
        scaled_rope_attention_with_kvcache(q, k_cache, v_cache, **kwargs)


def test_page_out_of_range_only_counts_pages_in_use():
    # sequence 0 uses one page: a stale entry past it is no error (vLLM pads tables so)
    kwargs = _bad(**dict(PAGED, cache_seqlens=torch.tensor([3, 20], dtype=torch.int32),
                         block_table=torch.tensor([[0, -1], [2, 3]], dtype=torch.int32)))
    q, k_cache, v_cache = kwargs.pop("q"), kwargs.pop("k_cache"), kwargs.pop("v_cache")
    scaled_rope_attention_with_kvcache(q, k_cache, v_cache, **kwargs)


@requires_kernel
@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged16"])
def test_unchecked_bad_values_stay_inside_the_cache(paged):
    # check_values=False (a GPU's default): a length past the capacity or a page past the
    # cache gives wrong numbers for that sequence, but no access outside the caches
    run = Generation(2, 4, 2, 32, torch.float32, DEVICE, paged=paged, capacity=32, start=(3, 20))
    if paged:
        run.block_table[1, 1] = 1000  # sequence 1's second page
        lengths = torch.tensor([3, 20], dtype=torch.int32, device=DEVICE)
    else:
        lengths = torch.tensor([3, 31], dtype=torch.int32, device=DEVICE)  # 31 + 2 new rows > 32
    before = run.k_cache.clone()
    q, k_new = run.randn(2, 2, 4, 32), run.randn(2, 2, 2, 32)
    out = scaled_rope_attention_with_kvcache(q, run.k_cache, run.v_cache, k_new=k_new, v_new=k_new,
                                             cache_seqlens=lengths, block_table=run.block_table,
                                             inv_freq=inv_freq_for(32, DEVICE), check_values=False)
    assert torch.isfinite(out[0]).all()  # sequence 0 is intact
    changed = (run.k_cache.nan_to_num(7.0) != before.nan_to_num(7.0)).flatten(2).any(-1)
    expect = torch.zeros_like(changed)
    for b, rows in ((0, (3, 4)), (1, (31,) if not paged else ())):
        for row in rows:
            expect[(b, row) if not paged else (int(run.block_table[b, row // 16]), row % 16)] = True
    assert torch.equal(changed, expect)


# ---- GPU: bf16 at Llama-3-8B's attention shape ----

GPU_SCHEDULES = {
    "dynamic_ntk": lambda: schedules.DynamicNTKScaling(128, factor=4.0, max_position_embeddings=4096),
    "yarn": lambda: schedules.YaRN(128, factor=8.0, original_max_position_embeddings=4096),
    "llama3": lambda: schedules.Llama3Scaling(128, base=500000.0, factor=8.0, original_max_position_embeddings=8192),
}


@requires_cuda
@pytest.mark.parametrize("sched", GPU_SCHEDULES)
@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged256"])
@pytest.mark.parametrize("batch,capacity", [(1, 32768), (8, 8192)], ids=["B1-32k", "B8-8k"])
def test_gpu_bf16_decode_and_chunk(batch, capacity, paged, sched):
    hq, hkv, head_dim = 32, 8, 128
    schedule = GPU_SCHEDULES[sched]()
    gen = torch.Generator(device="cuda").manual_seed(0)
    page_size = 256
    if paged:
        pages = capacity // page_size
        block_table = torch.randperm(batch * pages, device="cuda", generator=gen).view(batch, pages).int()
        cache_shape = (batch * pages, page_size, hkv, head_dim)
    else:
        block_table, cache_shape = None, (batch, capacity, hkv, head_dim)
    k_cache = torch.randn(cache_shape, device="cuda", dtype=torch.bfloat16, generator=gen)
    v_cache = torch.randn(cache_shape, device="cuda", dtype=torch.bfloat16, generator=gen)
    # lengths spread over the cache, the longest filling it but for the new tokens
    lens = torch.linspace(capacity - 8, capacity // 3, batch).int().cuda()
    for nq in (1, 4):  # a decode step, then a 4-token chunk (speculative decoding's shape)
        q = torch.randn(batch, nq, hq, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
        k_new, v_new = (torch.randn(batch, nq, hkv, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
                        for _ in range(2))
        out, lse = scaled_rope_attention_with_kvcache(q, k_cache, v_cache, k_new=k_new, v_new=v_new,
                                                      cache_seqlens=lens, block_table=block_table, schedule=schedule,
                                                      return_lse=True)
        length = int(lens.max()) + nq
        inv_freq = schedule.inv_freq(seq_len=length, device="cuda")
        for b in range(batch):
            n = int(lens[b]) + nq
            if paged:
                rows = block_table[b, :-(-n // page_size)].long()
                k, v = (c[rows].flatten(0, 1)[:n] for c in (k_cache, v_cache))
            else:
                k, v = k_cache[b, :n], v_cache[b, :n]
            assert torch.equal(k[-nq:], k_new[b]) and torch.equal(v[-nq:], v_new[b])
            ref, ref_lse = scaled_rope_attention_reference(
                q[b:b + 1].double(), k[None].double(), v[None].double(), inv_freq=inv_freq, causal=True,
                rotary_scale=schedule.rotary_scale(length), return_lse=True)
            assert rel_err(out[b:b + 1], ref) < TOLERANCE[torch.bfloat16], (b, nq)
            assert rel_err(lse[b:b + 1], ref_lse) < 1e-3, (b, nq)
        lens += nq
