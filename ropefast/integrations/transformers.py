"""HF transformers backend: `patch_model(model)` runs the rotation and the attention of every
attention layer of a Llama-family model (Llama, Mistral, Qwen2, Qwen3, Phi-3) through ropefast.

In transformers 5.x each `XxxAttention.forward` rotates q and k itself and hands them rotated
to the attention function, and the cache stores rotated keys; a backend that fuses RoPE must
take the rotation over. So each attention module's `forward` is replaced, per instance, by a
bound method (parameters, state_dict and hooks stay as they are) that projects q, k, v,
applies the family's q/k norms (Qwen3's come before RoPE) and calls ropefast on the unrotated
q, k with their positions and the schedule `schedules.from_hf_config(model.config)` builds.
The model's attention implementation becomes "ropefast", registered with transformers'
`AttentionInterface` and `AttentionMaskInterface`: its mask is the 2-D padding mask, or None
when every token is real (as flash-attn's), and the model's rotary embedding stops running.

What a call runs (each decision is taken once per forward and shared by the layers):
- no padding: the dense op, causal, at `position_ids`; rows of documents packed together
  (position_ids that restart, or the `cu_seq_lens_*` / `max_length_*` kwargs that
  DataCollatorWithFlattening gives, which spare the host syncs) run the varlen op;
- padding: right padding runs the dense op (exact under causal: no real query sees a padded
  key); other padding unpads the tokens into the varlen op; padded rows of the output are 0.
  A call whose cache is still empty (the default use_cache=True makes one) runs as one
  without a cache: packed rows stay apart (transformers' eager mixes them then).
- generation: the cache holds UNROTATED keys. Each layer of transformers' DynamicCache
  becomes an `UnrotatedCacheLayer` (buffers [B, capacity, Hkv, D], grown by doubling) while
  it is empty; a call after the first (a decode step, or a prompt continued) runs the kvcache
  op (`scaled_rope_attention_with_kvcache`: it appends k, v and rotates every key as it
  reads it), with the frequencies of the current length: a length-dependent schedule
  (dynamic NTK, LongRoPE) stays exact, where transformers' cache of rotated keys keeps the
  frequencies each key was written with. Keys sit at positions 0..L-1 of their row; padded
  rows (generate()'s left padding) count positions over their real tokens, as generate()
  numbers them, and run the varlen op over the cache contents. With grad enabled and q
  requiring grad, a later call runs the dense op over the cache contents (the kvcache op
  is forward only); gradients never flow through the cache into earlier calls.

Length-dependent schedules see the key count (dense) or max(position_ids) + 1 (varlen), which
is transformers' length when positions count from 0; transformers' dynamic NTK also keeps
the longest length any earlier call saw, ropefast's frequencies depend on the call alone. Not supported (each
raises a ValueError naming it): other model types, attention dropout, a sliding window once
a sequence is longer than the window (shorter sequences run exact), caches other than
DynamicCache, custom 4-D masks.
"""

import types
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.masking_utils import AttentionMaskInterface

from ..attention import scaled_rope_attention
from ..decode import scaled_rope_attention_with_kvcache
from ..schedules.base import RopeSchedule
from ..schedules.hf import from_hf_config
from ..varlen import from_position_ids, scaled_rope_attention_varlen

__all__ = ["patch_model", "SUPPORTED_MODEL_TYPES", "UnrotatedCacheLayer"]

IMPLEMENTATION = "ropefast"  # the attention implementation name patched models carry


class Family(NamedTuple):
    attention_class: str  # the transformers class whose instances are patched
    fused_qkv: bool  # one qkv_proj (Phi-3) instead of q_proj, k_proj, v_proj
    qk_norm: bool  # q_norm / k_norm over each head before RoPE (Qwen3)


FAMILIES = {
    "llama": Family("LlamaAttention", fused_qkv=False, qk_norm=False),
    "mistral": Family("MistralAttention", fused_qkv=False, qk_norm=False),
    "qwen2": Family("Qwen2Attention", fused_qkv=False, qk_norm=False),
    "qwen3": Family("Qwen3Attention", fused_qkv=False, qk_norm=True),
    "phi3": Family("Phi3Attention", fused_qkv=True, qk_norm=False),
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)


def patch_model(model: nn.Module) -> nn.Module:
    """Run every attention layer of a transformers Llama-family model through ropefast, in place.

    Supported: model types llama, mistral, qwen2, qwen3, phi3 (any head class: ForCausalLM,
    the bare model, ...), every rope type `schedules.from_hf_config` reads (default, linear,
    dynamic, yarn, llama3, longrope, partial rotary). Training (forward and backward, padded
    or packed batches) and `generate()` (greedy output equals transformers' eager for the
    static schedules). The module docstring says what each call runs.

    Returns the same model. Raises ValueError for another model type, attention dropout, or a
    config whose rope ropefast reads differently from the model's rotary embedding.

    Example:
        >>> model = AutoModelForCausalLM.from_pretrained("meta-llama/Llama-3.2-1B", dtype=torch.bfloat16)
        >>> model = patch_model(model.cuda())
        >>> loss = model(input_ids, labels=input_ids).loss   # rotation and attention in ropefast
    """
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    config = model.config
    family = FAMILIES.get(getattr(config, "model_type", None))
    if family is None:
        raise ValueError(f"patch_model supports the model types {', '.join(SUPPORTED_MODEL_TYPES)} (Llama-style "
                         f"attention); got model_type {getattr(config, 'model_type', None)!r} "
                         f"({type(model).__name__})")
    if getattr(config, "attention_dropout", 0.0):
        raise ValueError(f"ropefast has no attention dropout; the config has attention_dropout="
                         f"{config.attention_dropout}: set it to 0.0 to patch this model")
    layers = [m for m in model.modules() if type(m).__name__ == family.attention_class]
    if not layers:
        raise ValueError(f"found no {family.attention_class} module in {type(model).__name__}: patch_model "
                         f"patches the attention layers of the model types {', '.join(SUPPORTED_MODEL_TYPES)}")
    schedule = from_hf_config(config, head_dim=layers[0].head_dim)
    rotary = [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")]
    for embedding in rotary:
        _check_same_rope(schedule, embedding)

    AttentionInterface.register(IMPLEMENTATION, _unpatched_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, _padding_mask)
    plans = _PlanMemo(counts_forwards=bool(rotary))
    for module in layers:
        module._ropefast = _Layer(family, schedule, plans, _sliding_window(module))
        module.forward = types.MethodType(_attention_forward, module)
    for embedding in rotary:  # its cos/sin would go unused (and dynamic types read lengths on the host)
        embedding.forward = types.MethodType(_no_position_embeddings, embedding)
        embedding.register_forward_pre_hook(lambda module, args: plans.new_forward())
    model.config._attn_implementation = IMPLEMENTATION
    return model


class _Layer(NamedTuple):
    family: Family
    schedule: RopeSchedule
    plans: "_PlanMemo"
    window: Optional[int]


def _sliding_window(module):
    """The window of this layer's attention, or None (Qwen2/Qwen3 keep it per layer, Mistral
    and Phi-3 in the config)."""
    if hasattr(module, "sliding_window"):
        return module.sliding_window
    return getattr(module.config, "sliding_window", None)


def _check_same_rope(schedule, embedding):
    """The schedule must give the model's own frequencies and amplitude (at its initial
    length): a config field that ropefast reads differently fails here, not in the logits."""
    theirs = getattr(embedding, "original_inv_freq", None)
    if theirs is None:
        return
    ours = schedule.inv_freq(None, device=theirs.device)
    scale = float(getattr(embedding, "attention_scaling", 1.0))
    rtol = max(1e-5, 2 * torch.finfo(theirs.dtype).eps)  # model.to(bfloat16) rounds the model's copy
    if ours.shape != theirs.shape or not torch.allclose(ours, theirs.float(), rtol=rtol, atol=0) or (
            abs(schedule.rotary_scale(None) - scale) > 1e-6 * scale):
        raise ValueError(f"ropefast reads this config's rope as {schedule!r}, which disagrees with the model's "
                         f"{type(embedding).__name__} (its inv_freq has {theirs.numel()} entries, attention scaling "
                         f"{scale}); the rope types supported are those of ropefast.schedules.from_hf_config")


def _no_position_embeddings(self, x, position_ids=None, *args, **kwargs):
    return None


def _unpatched_attention(module, *args, **kwargs):
    raise RuntimeError(f"{type(module).__name__} runs under the attention implementation {IMPLEMENTATION!r} "
                       f"without being patched: call ropefast.integrations.transformers.patch_model(model), which "
                       f"supports the model types {', '.join(SUPPORTED_MODEL_TYPES)}")


def _padding_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                 attention_mask=None, **kwargs):
    """The mask the patched layers receive (registered for "ropefast"): the 2-D boolean mask
    over the keys, or None when every token is real (as flash-attn's)."""
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:]
    if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):  # one host sync, per forward
        return None
    return attention_mask


def _project(self, family, hidden_states):
    """q [B, N, Hq, D], k and v [B, N, Hkv, D] (views of the projections), norms applied."""
    shape = (*hidden_states.shape[:-1], -1, self.head_dim)
    if family.fused_qkv:
        qkv = self.qkv_proj(hidden_states)
        q_size = self.config.num_attention_heads * self.head_dim
        kv_size = self.config.num_key_value_heads * self.head_dim
        q, k, v = qkv.split((q_size, kv_size, kv_size), dim=-1)
        q, k, v = q.view(shape), k.view(shape), v.view(shape)
    else:
        q = self.q_proj(hidden_states).view(shape)
        k = self.k_proj(hidden_states).view(shape)
        v = self.v_proj(hidden_states).view(shape)
    if family.qk_norm:
        q, k = self.q_norm(q), self.k_norm(k)
    return q, k, v


def _attention_forward(self, hidden_states: Tensor, position_embeddings=None, attention_mask: Optional[Tensor] = None,
                       cache=None, **kwargs):
    """The patched forward of one attention module: projections, norms, ropefast, o_proj."""
    layer = self._ropefast
    if cache is None:
        cache = kwargs.pop("past_key_values", None)
    if attention_mask is not None and (not isinstance(attention_mask, Tensor) or attention_mask.dim() != 2):
        raise ValueError(f"a model patched by ropefast takes a 2-D padding attention_mask [batch, keys]; got "
                         f"{type(attention_mask).__name__} {tuple(getattr(attention_mask, 'shape', ()))} (custom "
                         "4-D masks are not supported)")
    batch, n = hidden_states.shape[:2]
    q, k, v = _project(self, layer.family, hidden_states)
    kv = None if cache is None else _unrotated_layer(cache, self.layer_idx)
    past = 0 if kv is None else kv.length
    if layer.window is not None and past + n > layer.window:
        raise ValueError(f"layer {self.layer_idx} has a sliding window of {layer.window} tokens, and this call "
                         f"attends over {past + n}: ropefast has no sliding window (sequences up to the window "
                         "run exact)")
    # an empty cache holds nothing but this call's keys: its call runs as one without a cache
    plan = layer.plans.get(attention_mask, kwargs.get("position_ids"), kwargs, batch, n, past,
                           layer.schedule.depends_on_seq_len, q.device)
    if plan.cache_seqlens is not None and not (torch.is_grad_enabled() and q.requires_grad):
        # decoding over the cache: the kvcache op appends k, v and rotates every key as it reads it
        k_cache, v_cache = kv.reserve(k, v)
        out = scaled_rope_attention_with_kvcache(q, k_cache, v_cache, k_new=k, v_new=v,
                                                 cache_seqlens=plan.cache_seqlens, schedule=layer.schedule,
                                                 softmax_scale=self.scaling, seq_len=past + n)
        kv.length += n
        return self.o_proj(out.reshape(batch, n, -1)), None
    if kv is not None:
        k, v = kv.append(k, v)
    if plan.varlen is None:
        out = scaled_rope_attention(q, k, v, schedule=layer.schedule, q_positions=plan.q_positions,
                                    k_positions=plan.k_positions, causal=True, softmax_scale=self.scaling)
    else:
        out = _varlen_attention(q, k, v, plan.varlen, layer.schedule, self.scaling)
    return self.o_proj(out.reshape(batch, n, -1)), None


class UnrotatedCacheLayer(DynamicLayer):
    """One layer of a DynamicCache as the patched attention keeps it: UNROTATED keys and the
    values in [B, capacity, Hkv, D] buffers (the kvcache op's layout), of which the first
    `length` rows hold tokens; the capacity grows by doubling, so an append copies only the
    new tokens. Gradients do not flow through the cache into earlier calls.

    Example:
        >>> out = patch_model(model)(input_ids, use_cache=True)     # input_ids [B, N]
        >>> out.cache.layers[0].keys[:, :N]                          # layer 0's keys, never rotated
    """

    def __init__(self):
        super().__init__()
        self.length = 0

    def reserve(self, k, v):
        """Room for k's and v's [B, n, Hkv, D] tokens after the cached ones; returns the
        buffers (k_cache, v_cache), [B, capacity, Hkv, D]."""
        needed = self.length + k.shape[1]
        if self.keys is None or self.keys.shape[1] < needed:
            capacity = max(needed, 2 * (0 if self.keys is None else self.keys.shape[1]), 256)
            keys, values = (x.new_empty(x.shape[0], capacity, *x.shape[2:]) for x in (k, v))
            if self.length:
                keys[:, :self.length] = self.keys[:, :self.length]
                values[:, :self.length] = self.values[:, :self.length]
            self.keys, self.values = keys, values
            self.device, self.is_initialized = k.device, True
        return self.keys, self.values

    def append(self, k, v):
        """Write k, v [B, n, Hkv, D] after the cached tokens; return every token's keys and
        values, [B, L, Hkv, D] (this call's own k, v when the cache was empty)."""
        past, n = self.length, k.shape[1]
        self.reserve(k, v)
        with torch.no_grad():
            self.keys[:, past:past + n] = k
            self.values[:, past:past + n] = v
        self.length += n
        if past == 0:
            return k, v
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):  # gradients reach this call's k, v
            return torch.cat([self.keys[:, :past], k], 1), torch.cat([self.values[:, :past], v], 1)
        return self.keys[:, :past + n], self.values[:, :past + n]

    def update(self, key_states, value_states, *args, **kwargs):
        """transformers' interface, in its [B, H, n, D] layout (views of the buffers)."""
        keys, values = self.append(key_states.transpose(1, 2), value_states.transpose(1, 2))
        return keys.transpose(1, 2), values.transpose(1, 2)

    def get_seq_length(self):
        return self.length

    def crop(self, tokens_to_remove):
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of tokens to remove, got {tokens_to_remove}")
        self.length = max(0, self.length + tokens_to_remove)

    def reset(self):
        super().reset()
        self.length = 0


def _unrotated_layer(cache, layer_idx):
    """The cache's layer `layer_idx` as an `UnrotatedCacheLayer`, swapped in while it is empty."""
    if not isinstance(cache, DynamicCache) or getattr(cache, "offloading", False):
        raise ValueError(f"a model patched by ropefast keeps unrotated keys in a DynamicCache (generate()'s "
                         f"default, without offloading); got {type(cache).__name__}")
    while len(cache.layers) <= layer_idx:
        cache.layers.append(UnrotatedCacheLayer())
    layer = cache.layers[layer_idx]
    if not isinstance(layer, UnrotatedCacheLayer):
        if not isinstance(layer, DynamicLayer) or layer.get_seq_length() > 0:
            raise ValueError(f"layer {layer_idx} of the cache holds {type(layer).__name__} states that ropefast did "
                             "not write (they would be rotated keys): give a patched model an empty DynamicCache")
        layer = cache.layers[layer_idx] = UnrotatedCacheLayer()
    return layer


class _Varlen(NamedTuple):
    """Packed tokens: indices of the real ones in the flattened [B * N] rows (None: all),
    cumulative document lengths, the longest documents, per-token positions."""
    q_indices: Optional[Tensor]
    k_indices: Optional[Tensor]
    cu_seqlens_q: Tensor
    cu_seqlens_k: Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    q_positions: Optional[Tensor]
    k_positions: Optional[Tensor]
    seq_len: Optional[int]


class _Plan(NamedTuple):
    q_positions: Optional[Tensor] = None  # the dense op's positions, [B, N] or [N]
    k_positions: Optional[Tensor] = None
    varlen: Optional[_Varlen] = None
    cache_seqlens: Optional[Tensor] = None  # int32 [B]: decode with the kvcache op, after so many cached tokens


class _PlanMemo:
    """The last forward's plan: every layer of one forward gets the same mask and position
    tensors, so the first layer decides (with whatever host syncs that takes) and the others
    reuse it. Holding the key tensors keeps their identities unique while they are compared;
    their version counters catch a buffer refilled in place between two forwards. Inference
    tensors (`torch.inference_mode`) have no version counter: for them the key counts model
    forwards instead (`new_forward`, called by the rotary embedding module, which runs once
    per forward before the layers); without that signal each layer makes its own plan."""

    def __init__(self, counts_forwards):
        self._key, self._plan = None, None
        self._counts_forwards, self._forwards = counts_forwards, 0

    def new_forward(self):
        self._forwards += 1

    def get(self, attention_mask, position_ids, kwargs, batch, n, past, needs_seq_len, device):
        tensors = (attention_mask, position_ids, kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k"))
        stamp = ("forward", self._forwards) if self._counts_forwards else object()  # object(): equal to no key
        versions = tuple(None if t is None else stamp if t.is_inference() else t._version for t in tensors)
        key = (tensors, (batch, n, past, device, versions))
        if self._key is None or any(a is not b for a, b in zip(tensors, self._key[0])) or key[1] != self._key[1]:
            self._plan = _make_plan(attention_mask, position_ids, kwargs, batch, n, past, needs_seq_len, device)
            self._key = key
        return self._plan


def _dense_positions(position_ids):
    if position_ids is None:
        return None
    return position_ids[0] if position_ids.shape[0] == 1 else position_ids  # [1, N] is shared by the batch


def _make_plan(attention_mask, position_ids, kwargs, batch, n, past, needs_seq_len, device):
    cached = past > 0
    flat_positions = None if position_ids is None else position_ids.expand(batch, n).reshape(-1)
    if attention_mask is None:
        if cached:  # keys at 0..L-1, queries the last n (the kvcache op; the dense op where it must train)
            return _Plan(q_positions=_dense_positions(position_ids),
                         cache_seqlens=torch.full((batch,), past, dtype=torch.int32, device=device))
        given = [kwargs.get(name) for name in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")]
        if all(x is not None for x in given):  # packed by the data collator: no sync
            cu_q, cu_k, max_q, max_k = given
            return _Plan(varlen=_Varlen(None, None, cu_q.int(), cu_k.int(), int(max_q), int(max_k), flat_positions,
                                        flat_positions, int(max_k)))
        if position_ids is None or n == 1:
            positions = _dense_positions(position_ids)
            return _Plan(q_positions=positions, k_positions=positions)
        restarts, offset = torch.stack([(position_ids.diff(dim=-1) != 1).any(),
                                        (position_ids[:, 0] != 0).any()]).tolist()  # one sync
        if restarts:
            return _Plan(varlen=_packed_rows(position_ids.expand(batch, n), flat_positions, needs_seq_len))
        if not offset:  # 0..n-1 in every row: the op's default, which the kernels need not load
            return _Plan()
        positions = _dense_positions(position_ids)
        return _Plan(q_positions=positions, k_positions=positions)
    if not cached and bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all()):  # right padded: one sync
        positions = _dense_positions(position_ids)
        return _Plan(q_positions=positions, k_positions=positions)
    return _Plan(varlen=_unpadded(attention_mask, flat_positions, batch, n, cached, needs_seq_len))


def _packed_rows(position_ids, flat_positions, needs_seq_len):
    cu_seqlens, max_seqlen = from_position_ids(position_ids)
    seq_len = int(position_ids.max()) + 1 if needs_seq_len else None
    return _Varlen(None, None, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, flat_positions, flat_positions, seq_len)


def _unpadded(attention_mask, flat_positions, batch, n, cached, needs_seq_len):
    """Real tokens of a padded batch: the queries are the last n of each row's keys."""
    key_mask = attention_mask.bool()
    query_mask = key_mask[:, -n:]
    q_lengths, k_lengths = query_mask.sum(-1, dtype=torch.int32), key_mask.sum(-1, dtype=torch.int32)
    q_indices = query_mask.reshape(-1).nonzero().squeeze(-1)
    k_indices = key_mask.reshape(-1).nonzero().squeeze(-1)
    q_positions = None if flat_positions is None else flat_positions[q_indices]
    if cached:  # keys at 0, 1, ... over the real tokens of their row, as generate() numbers them
        k_positions = (key_mask.cumsum(-1) - 1).reshape(-1)[k_indices]
    else:
        k_positions = q_positions
    longest = [q_lengths.max(), k_lengths.max()]
    if needs_seq_len and q_positions is not None:
        longest.append(q_positions.max() + 1)
    longest = torch.stack(longest).tolist()  # one host sync for all of them
    max_q, max_k = longest[:2]
    seq_len = (max(longest[2], max_k) if len(longest) > 2 else max_k) if needs_seq_len else None
    pad = torch.zeros(1, dtype=torch.int32, device=attention_mask.device)
    cu_q = torch.cat([pad, q_lengths.cumsum(0, dtype=torch.int32)])
    cu_k = torch.cat([pad, k_lengths.cumsum(0, dtype=torch.int32)])
    return _Varlen(q_indices, k_indices, cu_q, cu_k, max_q, max_k, q_positions, k_positions, seq_len)


def _varlen_attention(q, k, v, plan, schedule, softmax_scale):
    """q [B, N, Hq, D], k, v [B, L, Hkv, D] -> [B, N, Hq, D]: the real tokens packed, the
    varlen op, the output scattered back (padded rows 0)."""
    batch, n, hq, head_dim = q.shape
    q_flat, k_flat, v_flat = (x.reshape(-1, *x.shape[2:]) for x in (q, k, v))
    if plan.q_indices is not None:
        q_flat = q_flat.index_select(0, plan.q_indices)
    if plan.k_indices is not None:
        k_flat, v_flat = k_flat.index_select(0, plan.k_indices), v_flat.index_select(0, plan.k_indices)
    out = scaled_rope_attention_varlen(
        q_flat, k_flat, v_flat, plan.cu_seqlens_q, plan.cu_seqlens_k, plan.max_seqlen_q, plan.max_seqlen_k,
        schedule=schedule, q_positions=plan.q_positions, k_positions=plan.k_positions, causal=True,
        softmax_scale=softmax_scale, seq_len=plan.seq_len)
    if plan.q_indices is not None:
        out = out.new_zeros(batch * n, hq, head_dim).index_copy(0, plan.q_indices, out)
    return out.view(batch, n, hq, head_dim)
