"""The README's Python blocks run as a user pastes them (in order, one namespace), and what
they compute agrees with the direct calls they stand for."""

import pathlib
import re

import torch

from ropefast import scaled_rope_attention

from conftest import TOLERANCE, rel_err

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def run_blocks():
    """Execute every ```python block; returns {block text: namespace right after it}."""
    namespace, after = {}, {}
    for i, block in enumerate(re.findall(r"```python\n(.*?)```", README.read_text(), re.S)):
        exec(compile(block, f"README.md python block {i}", "exec"), namespace)
        after[block] = dict(namespace)
    return after


def block_with(after, text):
    (namespace,) = [ns for block, ns in after.items() if text in block]
    return namespace


def test_readme_examples_run_and_agree():
    after = run_blocks()

    # Training: a learnable inv_freq beside the schedule keeps the schedule's rotary_scale.
    ns = block_with(after, "inv_freq=inv_freq")
    q, k, v, yarn = ns["q"], ns["k"], ns["v"], ns["yarn"]
    assert yarn.rotary_scale() > 1.1  # the amplitude a bare inv_freq= would drop
    with torch.no_grad():
        expect = scaled_rope_attention(q, k, v, schedule=yarn, causal=True)
    assert torch.equal(ns["out"].detach(), expect)
    assert ns["inv_freq"].grad is not None and ns["inv_freq"].grad.abs().sum() > 0

    # Padded batches: each row's real tokens get what the row alone, unpadded, gets.
    ns = block_with(after, "attn_mask=mask")
    q, k, v, out, yarn = ns["q"], ns["k"], ns["v"], ns["out"], ns["yarn"]
    for row, length in enumerate(ns["lengths"].tolist()):
        alone = scaled_rope_attention(*(x[row:row + 1, -length:] for x in (q, k, v)), schedule=yarn, causal=True)
        assert rel_err(out[row:row + 1, -length:], alone) < TOLERANCE[q.dtype]
