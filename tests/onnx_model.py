"""A tiny segmentation model built in-process with onnx.helper (no weights to download).

Input ``x`` (N, 1, H, W) in [0, 1]; output ``scores`` (N, 2, H, W) = [0.5 - x, x - 0.5], so
argmax labels 1 wherever x > 0.5: with a window centred on a threshold, a "bright structure"
model whose right answer the test can compute independently.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def build(path: Path, size: int = 64) -> Path:
    half = numpy_helper.from_array(np.array(0.5, dtype=np.float32), name="half")
    nodes = [
        helper.make_node("Sub", ["half", "x"], ["background"]),
        helper.make_node("Sub", ["x", "half"], ["foreground"]),
        helper.make_node("Concat", ["background", "foreground"], ["scores"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "bright-structure",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, size, size])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 2, size, size])],
        initializer=[half],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="radstream-tests"
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


CONFIG = '{"name": "bright", "modalities": ["CT"], "body_parts": ["HEAD"], "input_size": [64, 64], "window": [300, 2], "labels": ["background", "bone"]}'
