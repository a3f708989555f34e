import pytest
import torch

from ropefast import dispatch, repeat

# Relative-error bounds vs the float64 reference (DESIGN.md), per input dtype.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# float32 on DEVICE runs the Triton kernels (compiled, or interpreted under TRITON_INTERPRET=1).
requires_kernel = pytest.mark.skipif(dispatch.path(torch.empty(0, device=DEVICE)) == "reference",
                                     reason="needs CUDA or TRITON_INTERPRET=1")


@pytest.fixture(autouse=True)
def fresh_repeats():
    """Every test starts with no recorded calls (`ropefast.repeat`): tests patch the dispatch
    and the kernels, which a repeat's key does not hold."""
    repeat.clear()


def rel_err(x, ref):
    """||x - ref|| / ||ref|| in float64; NaN anywhere counts as failure (inf)."""
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(x).all():
        return float("inf")
    return ((x - ref).norm() / ref.norm()).item()


@pytest.fixture
def rope_passes(monkeypatch):
    """(queries, keys) flags of every `rotate_q_k` call of the backward: queries False where
    the forward saved Q^ (`ops.attention_fwd(save_q=True)`), keys False where the Hopper
    kernel rotated the keys itself (`kernels.attention_bwd`)."""
    from ropefast.kernels import attention_bwd

    calls = []
    rotate = attention_bwd.rotate_q_k

    def spy(*args, queries=True, keys=True, **kwargs):
        calls.append((queries, keys))
        return rotate(*args, queries=queries, keys=keys, **kwargs)
    monkeypatch.setattr(attention_bwd, "rotate_q_k", spy)
    return calls


@pytest.fixture
def inverse_passes(monkeypatch):
    """The shapes of the gradients that the backward's inverse rope passes rotate back: dq's,
    and dk's unless the Hopper kernel wrote dk itself (`kernels.attention_bwd`)."""
    from ropefast.kernels import attention_bwd

    shapes = []
    rope = attention_bwd.rope

    def spy(x, *args, inverse=False, **kwargs):
        if inverse:
            shapes.append(tuple(x.shape))
        return rope(x, *args, inverse=inverse, **kwargs)
    monkeypatch.setattr(attention_bwd, "rope", spy)
    return shapes
