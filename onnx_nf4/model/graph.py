"""Graph helpers shared by the passes and :mod:`onnx_nf4.model.summary`: constants, names, initializers, cleanup."""

from __future__ import annotations

import contextlib

import numpy as np
import onnx_ir as ir

from ..op.contract import ONNX_DOMAINS

__all__ = [
    "Initializers",
    "UniqueNames",
    "constant_bytes",
    "constant_tensor",
    "float_attr",
    "int_attr",
    "node_label",
    "owner_graph",
    "release",
    "remove_unused_initializers",
]


def node_label(node: ir.Node) -> str:
    """The node's name, or ``<op_type -> first output>`` for an unnamed node (as reports and messages show it)."""
    return node.name or f"<{node.op_type} -> {node.outputs[0].name}>"


def constant_tensor(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The tensor of an initializer (not a graph input) or of a ``Constant`` node's ``value``, else ``None``."""
    if value is None or value.is_graph_input():
        return None
    if value.is_initializer() and value.const_value is not None:
        return value.const_value
    producer = value.producer()
    if (
        producer is not None
        and producer.op_type == "Constant"
        and producer.domain in ONNX_DOMAINS
        and "value" in producer.attributes
    ):
        return producer.attributes["value"].as_tensor()
    return None


def owner_graph(value: ir.Value) -> ir.Graph:
    """The graph where tensors replacing the constant ``value`` go (visible wherever ``value`` is)."""
    graph = value.graph if value.is_initializer() else value.producer().graph  # type: ignore[union-attr]
    assert isinstance(graph, ir.Graph)
    return graph


def float_attr(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return default if attr is None else float(attr.as_float())


def int_attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else int(attr.as_int())


def release(tensor: ir.TensorProtocol) -> None:
    """Unmap an external tensor's file: its pages would otherwise count as resident memory until the pass ends.

    The tensor stays usable (it is mapped again when read). A tensor still viewed by a live array stays mapped.
    """
    if isinstance(tensor, ir.ExternalTensor):
        with contextlib.suppress(BufferError):
            tensor.release()


class UniqueNames:
    """Fresh value names, unique in the whole model (``fresh(base)`` returns ``base`` or ``base_<i>``)."""

    def __init__(self, model: ir.Model):
        self._used: set[str] = set()
        for graph in model.graphs():
            values = [*graph.inputs, *graph.outputs, *graph.initializers.values()]
            values += [out for node in graph for out in node.outputs]
            self._used.update(v.name for v in values if v.name)

    def fresh(self, base: str) -> str:
        name, i = base, 0
        while name in self._used:
            i += 1
            name = f"{base}_{i}"
        self._used.add(name)
        return name


class Initializers:
    """Adds initializers with fresh names to the graphs of one model; :meth:`shared` adds a tensor once per graph."""

    def __init__(self, model: ir.Model):
        self.names = UniqueNames(model)
        self._shared: dict[tuple[int, str, bytes], ir.Value] = {}

    def add(self, graph: ir.Graph, base: str, array: np.ndarray) -> ir.Value:
        """Register ``array`` (C-contiguous copy if needed) in ``graph`` as ``base`` or ``base_<i>``."""
        name = self.names.fresh(base)
        tensor = ir.tensor(np.asarray(array, order="C"), name=name)
        value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
        graph.register_initializer(value)
        return value

    def scalar(self, graph: ir.Graph, base: str, value: float, dtype: ir.DataType) -> ir.Value:
        """A 0-D initializer of ``dtype`` holding ``value`` (rounded through float32)."""
        return self.add(graph, base, np.array(value, dtype=np.float32).astype(dtype.numpy()))

    def shared(self, graph: ir.Graph, base: str, array: np.ndarray) -> ir.Value:
        """One initializer per graph for each distinct ``array`` (by dtype and bytes) added under ``base``."""
        key = (id(graph), array.dtype.str, array.tobytes())
        if key not in self._shared:
            self._shared[key] = self.add(graph, base, array)
        return self._shared[key]

    @property
    def shared_bytes(self) -> int:
        """Bytes of the tensors added through :meth:`shared`."""
        return sum(value.const_value.nbytes for value in self._shared.values())  # type: ignore[union-attr]

    def value(self, base: str) -> ir.Value:
        """A new, unconnected value with a fresh name."""
        return ir.Value(name=self.names.fresh(base))


def remove_unused_initializers(model: ir.Model) -> None:
    """Delete, in every graph, the initializers that no node uses and that are no graph input or output."""
    for graph in model.graphs():
        for name, value in list(graph.initializers.items()):
            if not value.uses() and not value.is_graph_output() and not value.is_graph_input():
                del graph.initializers[name]


def constant_bytes(model: ir.Model) -> int:
    """Bytes of every constant tensor of ``model``: the initializers of every graph and the ``value`` of every
    ``Constant`` node (in graphs and functions), from shapes and types (external data is not read)."""
    total = sum(value.const_value.nbytes for graph in model.graphs() for value in graph.initializers.values()
                if value.const_value is not None)  # fmt: skip
    nodes = [*ir.traversal.RecursiveGraphIterator(model.graph)]
    nodes += [node for function in model.functions.values() for node in ir.traversal.RecursiveGraphIterator(function)]
    for node in nodes:
        value = node.attributes.get("value") if node.op_type == "Constant" and node.domain in ONNX_DOMAINS else None
        if value is not None and value.type == ir.AttributeType.TENSOR:
            total += value.as_tensor().nbytes
    return total
