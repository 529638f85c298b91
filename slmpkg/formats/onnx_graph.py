"""ONNX graph building shared by the decoder writer (:mod:`slmpkg.formats.onnx`) and the encoder writer
(:mod:`slmpkg.formats.onnx_encoder`): the file layout, opset and :class:`Graph`, which collects nodes and
streams initializers into one external data file.

Example:
    >>> import io
    >>> g = Graph(io.BytesIO(), DATA_FILE)
    >>> g.node("Relu", ["x"], "/relu")
    ['/relu/output_0']
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, helper

__all__ = ["MODEL_FILE", "DATA_FILE", "PRECISIONS", "INLINE_BYTES", "ALIGN_THRESHOLD", "ALIGNMENT", "OPSET", "IR_VERSION",
           "MS_DOMAIN", "CONFIG_PROPERTY", "Graph"]

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
PRECISIONS = {"f32": (np.float32, TensorProto.FLOAT), "f16": (np.float16, TensorProto.FLOAT16)}
# tensors smaller than this are stored in the .onnx file itself
INLINE_BYTES = 1024
# as onnx's own external-data writer: tensors of 1 MiB or more start on a page boundary (mmap-friendly)
ALIGN_THRESHOLD = 1 << 20
ALIGNMENT = 4096
OPSET = 21
IR_VERSION = 10  # opset 21's IR; older runtimes reject newer IR versions
MS_DOMAIN = "com.microsoft"
# a model property holding the model's Hugging Face config.json (the runtimes ignore model properties;
# onnxruntime-genai refuses keys it does not know in genai_config.json, so settings travel here)
CONFIG_PROPERTY = "slmpkg.config.json"


class Graph:
    """Nodes, inline and external initializers; external bytes stream into ``data``."""

    def __init__(self, data: BinaryIO, data_name: str):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.data, self.data_name, self.offset = data, data_name, 0

    def node(self, op: str, inputs: Sequence[str], name: str, n_out: int = 1, domain: str = "",
             outputs: Sequence[str] | None = None, **attrs: Any) -> list[str]:
        outs = list(outputs) if outputs is not None else [f"{name}/output_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=name, domain=domain or None, **attrs))
        return outs

    def const(self, name: str, values: Any, dtype: Any = np.int64) -> str:
        """A small constant (shapes, axes, scalars) as a Constant node."""
        array = np.asarray(values, dtype=dtype)
        out = f"{name}/output_0"
        self.nodes.append(helper.make_node("Constant", [], [out], name=name,
                                           value=onnx.numpy_helper.from_array(array, name=f"{name}/value")))
        return out

    def weight(self, name: str, array: np.ndarray) -> str:
        """An initializer: inline when tiny, else appended to the data file and referenced."""
        array = np.ascontiguousarray(array)
        if array.nbytes < INLINE_BYTES:
            self.initializers.append(onnx.numpy_helper.from_array(array, name=name))
            return name
        return self.weight_parts(name, array.shape, array.dtype, [array])

    def weight_parts(self, name: str, shape: Sequence[int], dtype: Any, parts: Iterable[np.ndarray]) -> str:
        """An external initializer written from ``parts`` (its elements in order, e.g. row blocks),
        so a tensor assembled from pieces is never whole in memory."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if nbytes >= ALIGN_THRESHOLD and self.offset % ALIGNMENT:
            pad = ALIGNMENT - self.offset % ALIGNMENT
            self.data.write(b"\0" * pad)
            self.offset += pad
        start = self.offset
        for part in parts:
            part = np.ascontiguousarray(part, dtype=dtype)
            self.data.write(memoryview(part.reshape(-1).view(np.uint8)))
            self.offset += part.nbytes
        if self.offset - start != nbytes:
            raise ValueError(f"{name}: parts hold {self.offset - start} bytes, the shape {list(shape)} needs {nbytes}")
        tensor = TensorProto()
        tensor.name = name
        tensor.data_type = helper.np_dtype_to_tensor_dtype(dtype)
        tensor.dims.extend(shape)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.data_name), ("offset", str(start)), ("length", str(nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.initializers.append(tensor)
        return name
