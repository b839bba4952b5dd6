"""Online rotations: the transform x·M inserted on one input of a node, at run time.

R2's cross-head part, R3 and R4 all insert one. A Hadamard kind becomes
``quarot_fx::hadamard_transform`` (which the lowering can fuse with activation quantization);
any other kind a dense matmul with the matrix as a constant.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from quarot_fx.numerics.rotations import rotation_kind

from .graph_utils import last_dim
from .graph_utils import value as node_value
from .matrices import CrossHead, Rotation, build

HADAMARD_OP = torch.ops.quarot_fx.hadamard_transform.default


def online_rotate(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """x·Q at run time for a rotation kind without a fast online op (a dense matmul)."""
    return x @ q


def insert_rotation(gm: fx.GraphModule, consumer: fx.Node, value: fx.Node, matrix,
                    pad_to: int | None = None) -> fx.Node:
    """Insert the online transform x·M (zero-padding first if asked) on one input of ``consumer``:
    ``quarot_fx::hadamard_transform`` for Hadamard kinds (fusable with quantization), else x @ M."""
    graph = gm.graph
    kind = rotation_kind(matrix.kind)
    with graph.inserting_before(consumer):
        x = value
        if pad_to is not None and pad_to != last_dim(value):
            x = graph.call_function(torch.nn.functional.pad, (x, (0, pad_to - last_dim(value))))
        if kind.hadamard_op and isinstance(matrix, (Rotation, CrossHead)):
            rotated = graph.call_function(HADAMARD_OP, (x, matrix.size if isinstance(matrix, CrossHead) else 1))
        else:
            dtype = node_value(value).dtype if isinstance(node_value(value), torch.Tensor) else torch.float32
            name = f"qfx_online_{len([n for n in graph.nodes if n.op == 'get_attr' and 'qfx_online_' in n.target])}"
            gm.register_buffer(name, build(matrix).to(dtype))
            rotated = graph.call_function(online_rotate, (x, graph.get_attr(name)))
    consumer.replace_input_with(value, rotated)
    return rotated
