"""Frequency schedules: context-extension methods as inputs of the one kernel.

See `ropefast.schedules.base` for the protocol and docs/schedules.md for the formulas.
"""

from .base import RopeSchedule
from .default import ABF, DefaultRope
from .hf import from_hf_config
from .linear import LinearScaling
from .llama3 import Llama3Scaling
from .longrope import LongRoPE
from .ntk import DynamicNTKScaling, NTKScaling
from .yarn import YaRN

__all__ = [
    "RopeSchedule",
    "DefaultRope",
    "ABF",
    "LinearScaling",
    "NTKScaling",
    "DynamicNTKScaling",
    "YaRN",
    "Llama3Scaling",
    "LongRoPE",
    "from_hf_config",
]
