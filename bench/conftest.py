import torch

from ropefast import dispatch


WHAT = {"hopper": "the Gluon kernels (Hopper; D <= 64: causal packed documents take the portable forward)",
        "kernel": "the portable Triton kernels",
        "interpreter": "Triton's interpreter (slow: TRITON_INTERPRET is set)",
        "reference": "ropefast.reference (plain PyTorch)"}


def pytest_report_header(config):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    paths = {d: dispatch.path(torch.empty(1, 1, 1, d, device=device, dtype=dtype)) for d in (64, 128)}
    return f"ropefast on {device} ({dtype}) runs " + "; ".join(f"at D={d} {WHAT[p]}" for d, p in paths.items())
