"""ONNX Runtime sessions as the pruner needs them: CPU, graph optimizations off unless asked (so that ORT's
fusions cannot hide a bug), large weights handed over without a copy, errors in one line."""

from __future__ import annotations

import os
import re

import numpy as np
import onnx
from onnx import helper

from .model import dtypes
from .model.dtypes import PACKED_TYPES
from .model.proto import copy_without_initializers


PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
EXACT = {"CUDAExecutionProvider": {"use_tf32": "0"}}    # a proof's products in fp32, not TF32's 10-bit mantissa


def providers_for(name: str, exact: bool = False) -> list:
    """ONNX Runtime's providers for ``name`` (``PROVIDERS``), with the options that keep a proof exact; an
    ``InputError`` in one line where this onnxruntime lacks it (onnxruntime-gpu is an extra: ``.[gpu]``)."""
    import onnxruntime as ort
    from .errors import InputError
    if name not in PROVIDERS:
        raise InputError(f"unknown provider {name!r}; choose from {', '.join(PROVIDERS)}")
    wanted = PROVIDERS[name]
    if wanted[0] not in ort.get_available_providers():
        raise InputError(f"{wanted[0]} is not available in this onnxruntime "
                         f"({', '.join(ort.get_available_providers())}); for cuda and tensorrt install "
                         "onnxruntime-gpu in place of onnxruntime")
    return [(p, EXACT[p]) if exact and p in EXACT else p for p in wanted]


def ort_reason(exc: Exception) -> str:
    """ONNX Runtime's error in one readable line: the failing node and the reason, without source paths."""
    msg = re.sub(r"\s+", " ", str(exc))
    m = re.search(r"while running (\w+) node\. Name:'([^']*)' Status Message: (.*)", msg)
    if m:
        reason = re.sub(r"^\S+:\d+ [^()]*\([^)]*\) ", "", m.group(3))
        msg = f"node {m.group(2)} ({m.group(1)}): {reason.strip()}"
    return msg.strip()[:300]


def session(model: onnx.ModelProto | bytes | str, optimize: bool = False, providers=None,
            external_dir: str | os.PathLike | None = None, overrides: dict | None = None):
    """An ORT CPU session with graph optimizations off (so ORT's fusions cannot hide a bug).

    ``external_dir``: the folder of the external data files that ``model`` (loaded without them) refers to.
    """
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.enable_cpu_mem_arena = False   # freed tensors go back to the heap (and to the system), not to an arena
    if external_dir is not None:
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(external_dir))
    opts.add_session_config_entry("session.disable_prepacking", "1")    # no second copy of every weight
    # ONNX Runtime's default order ran every node that depends on no input first: the probe's weight stand-ins,
    # the whole model at once (a 1.5 GB fp32 model probed in 1.27 GiB; in 0.34 GiB by priority)
    opts.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    values = {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arr))
              for name, arr in (overrides or {}).items()}
    for name, value in values.items():    # initializers replaced without copying the model
        opts.add_initializer(name, value)
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    opts.log_severity_level = 4         # a failure is raised, and reported in one line, not logged
    if isinstance(model, onnx.ModelProto):
        model, arrays = _hand_over_weights(model, skip=set(overrides or ()))
        if arrays:     # ORT reads them in place: no serialized copy, no parsed copy
            opts.add_external_initializers(list(arrays), [ort.OrtValue.ortvalue_from_numpy(a)
                                                          for a in arrays.values()])
        sess = ort.InferenceSession(model.SerializeToString(), opts,
                                    providers=providers or ["CPUExecutionProvider"])
        sess.onnxprune_borrowed = (arrays, values)      # the session borrows them
        return sess
    sess = ort.InferenceSession(model, opts, providers=providers or ["CPUExecutionProvider"])
    sess.onnxprune_borrowed = values
    return sess


def _hand_over_weights(model: onnx.ModelProto, skip: set = frozenset()
                       ) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """Split the large in-memory initializers off ``model`` (but those in ``skip``): (the rest,
    {name: array})."""
    big = [i for i in model.graph.initializer if len(i.raw_data) >= dtypes.STAND_IN_BYTES and i.name not in skip
           and i.data_type not in PACKED_TYPES]
    if not big:
        return model, {}
    rest = copy_without_initializers(model)
    g, src = rest.graph, model.graph
    g.node.extend(src.node)
    names = {i.name for i in big}
    g.initializer.extend(i for i in src.initializer if i.name not in names)
    for i in big:      # declared as external: the session gets the values from add_external_initializers
        t = g.initializer.add(name=i.name, data_type=i.data_type, dims=i.dims,
                              data_location=onnx.TensorProto.EXTERNAL)
        for key, value in (("location", "onnxprune-in-memory"), ("offset", "0"), ("length", str(len(i.raw_data)))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
    return rest, {i.name: np.frombuffer(i.raw_data, dtype=helper.tensor_dtype_to_np_dtype(i.data_type))
                  .reshape(tuple(i.dims)) for i in big}     # one copy of the bytes, not two
