"""Context parallelism on torch.distributed: ring attention with exact global positions.

    from ropefast.distributed import (ring_scaled_rope_attention, shard_for_context_parallel,
                                      gather_from_context_parallel)
"""

from .layout import context_parallel_positions, gather_from_context_parallel, shard_for_context_parallel
from .ring import ring_scaled_rope_attention

__all__ = ["ring_scaled_rope_attention", "shard_for_context_parallel", "gather_from_context_parallel",
           "context_parallel_positions"]
