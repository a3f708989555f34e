"""Facts of a tensor's CUDA device that the launchers read on every call, queried once per
device index (a driver query costs microseconds, a dictionary lookup nanoseconds)."""

import torch

_capability = {}  # CUDA device index -> (major, minor)
_multiprocessors = {}  # CUDA device index -> SM count


def _index(device):
    return device.index if device.index is not None else torch.cuda.current_device()


def capability(device):
    """(major, minor) of a CUDA device; None for any other device (the interpreter's CPU)."""
    if device.type != "cuda":
        return None
    index = _index(device)
    if index not in _capability:
        _capability[index] = torch.cuda.get_device_capability(index)
    return _capability[index]


def multiprocessors(device):
    """The SM count of a CUDA device; 1 for any other device."""
    if device.type != "cuda":
        return 1
    index = _index(device)
    if index not in _multiprocessors:
        _multiprocessors[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _multiprocessors[index]
