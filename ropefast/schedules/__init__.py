"""Frequency schedules: context-extension methods as inputs of the one kernel.

See `ropefast.schedules.base` for the protocol and docs/schedules.md for the formulas.
"""

from .angle_distribution import RotaryAngleDistribution, rotary_angle_disturbance, rotary_angle_histogram
from .base import RopeSchedule
from .clex import CLEX
from .dcis import DCIS, dcis_initial_factors
from .default import ABF, DefaultRope
from .entropy_abf import EntropyABF
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
    "EntropyABF",
    "DCIS",
    "dcis_initial_factors",
    "CLEX",
    "RotaryAngleDistribution",
    "rotary_angle_histogram",
    "rotary_angle_disturbance",
    "from_hf_config",
]
