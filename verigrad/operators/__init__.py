"""Operator kinds of verigrad's model graph, one registry (:data:`OPS`).

Each kind is one class holding its concrete semantics (forward, gradient rule) beside its
abstract ones (interval rules; the relaxations auto_LiRPA uses are plain functions next to
them, wrapped by :mod:`verigrad.bounds.lirpa_ops`). Importing this package registers them all.
"""
from verigrad.operators.base import OPS, IbpContext, Node, Shape, register
from verigrad.operators.activation import ActKind, Activation, PReLU
from verigrad.operators.affine import Conv2d, Linear, conv_transpose
from verigrad.operators.pooling import MaxPool
from verigrad.operators.shape import Add, Concat, Pad, Reshape, Sub, Transpose

__all__ = [
    "OPS", "ActKind", "Activation", "Add", "Concat", "Conv2d", "IbpContext", "Linear", "MaxPool", "Node",
    "PReLU", "Pad", "Reshape", "Shape", "Sub", "Transpose", "conv_transpose", "register",
]
