"""ropefast: scaled rotary attention (RoPE with scaled frequencies + logit temperature +
flash attention) in fused Triton kernels.

    from ropefast import scaled_rope_attention, scaled_rope_attention_with_kvcache, apply_scaled_rope, schedules
"""

from . import dispatch, reference, schedules, varlen
from .attention import scaled_rope_attention
from .decode import scaled_rope_attention_with_kvcache
from .rope import apply_scaled_rope
from .varlen import scaled_rope_attention_varlen

__version__ = "0.1.0"

__all__ = ["scaled_rope_attention", "scaled_rope_attention_varlen", "scaled_rope_attention_with_kvcache",
           "apply_scaled_rope", "schedules", "reference", "dispatch", "varlen", "__version__"]
