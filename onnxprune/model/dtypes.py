"""The element types that matter to pruning."""

from __future__ import annotations

import onnx

HALF_TYPES = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                         onnx.TensorProto.DOUBLE})

# two values a byte (int4 data of QDQ models): their raw bytes are not one array element each
PACKED_TYPES = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4} | (
    {onnx.TensorProto.FLOAT4E2M1} if hasattr(onnx.TensorProto, "FLOAT4E2M1") else set())
# floating-point weights of this many bytes or more: the probe stands in for them, sessions borrow them, and the
# checks read their shapes only
STAND_IN_BYTES = 1 << 20
