"""Hand-written Triton kernels of ropefast and their launch helpers (installed as
`ropefast.kernels`). No autograd and no schedules here: kernels take inv_freq, positions,
scales and temperatures as plain tensors and numbers."""
