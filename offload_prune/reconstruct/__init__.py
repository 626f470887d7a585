"""Block-local reconstruction: after a method's mask, the kept weights of one block (units.py: the whole
block, or its attention and its MLP one after the other) are trained so that its output matches a dense
target (targets.py), with the mask held fixed (train.py), its products in bfloat16 or float32
(precision.py); memory.py sizes it for the plan.

Imports: config, disk/, runtime/ and model/.
"""
from .memory import reconstruction_bytes
from .precision import training_dtype
from .targets import TargetBuffer
from .train import reconstruct_block
from .units import trained_parameters, training_units

__all__ = ["reconstruct_block", "reconstruction_bytes", "trained_parameters", "training_dtype", "training_units",
           "TargetBuffer"]
