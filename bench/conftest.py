import torch

from ropefast import dispatch


def pytest_report_header(config):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = dispatch.path(torch.empty(0, device=device))
    what = {"kernel": "the Triton kernels", "interpreter": "Triton's interpreter (slow: TRITON_INTERPRET is set)",
            "reference": "ropefast.reference (plain PyTorch)"}[path]
    return f"ropefast on {device} (fp16/fp32) runs {what}"
