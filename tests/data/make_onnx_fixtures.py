"""Write the ONNX fixtures under tests/data/onnx/ with the real onnx package.

Run once, in an environment with onnx (not a dependency of weightmark):

    /tmp/torchenv/bin/pip install onnx==1.23.2
    /tmp/torchenv/bin/python -P tests/data/make_onnx_fixtures.py

`model.onnx` holds initializers in every storage the reader must know: raw_data (F32, F16,
BF16, F64), float_data, int32_data (float16 bit patterns), an int64 tensor (no carrier), and
`external.onnx` keeps its weights in `external.onnx.data` (onnx's external-data writer).
`expected.npz` holds onnx.numpy_helper.to_array of each float initializer, as float32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OUT = Path(__file__).resolve().parent / "onnx"


def _graph(initializers: list[TensorProto]) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 48])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])
    node = helper.make_node("Gemm", ["x", "fc.weight", "fc.bias"], ["y"], transB=1)
    graph = helper.make_graph([node], "fixture", [x], [y], initializer=initializers)
    return helper.make_model(graph, producer_name="weightmark-fixtures", opset_imports=[helper.make_opsetid("", 17)])


def main() -> None:
    OUT.mkdir(exist_ok=True)
    rng = np.random.default_rng(11)
    f32 = rng.standard_normal((64, 48)).astype(np.float32)
    inits = [
        numpy_helper.from_array(f32, "fc.weight"),
        numpy_helper.from_array(rng.standard_normal(64).astype(np.float32), "fc.bias"),
        numpy_helper.from_array(rng.standard_normal((32, 16)).astype(np.float16), "half.weight"),
        numpy_helper.from_array(rng.standard_normal((8, 8)), "double.weight"),
        numpy_helper.from_array(np.arange(10, dtype=np.int64), "position_ids"),
        helper.make_tensor("float_data.weight", TensorProto.FLOAT, [4, 5],
                           rng.standard_normal(20).astype(np.float32).tolist()),
        helper.make_tensor("int32_data.weight", TensorProto.FLOAT16, [3, 7],
                           rng.standard_normal(21).astype(np.float16).view(np.uint16).tolist()),
        helper.make_tensor("bf16.weight", TensorProto.BFLOAT16, [16, 16],
                           (rng.standard_normal(256).astype(np.float32).view(np.uint32) >> 16)
                           .astype(np.uint16).tobytes(), raw=True),
    ]
    model = _graph(inits)
    onnx.save(model, OUT / "model.onnx")
    expected = {}
    for init in onnx.load(OUT / "model.onnx").graph.initializer:
        if init.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16):
            expected[init.name] = numpy_helper.to_array(init).astype(np.float32)
    np.savez_compressed(OUT / "expected.npz", **expected)

    external = _graph([numpy_helper.from_array(f32, "fc.weight"),
                       numpy_helper.from_array(rng.standard_normal(64).astype(np.float32), "fc.bias")])
    onnx.save_model(external, OUT / "external.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="external.onnx.data", size_threshold=0)
    (OUT / "VERSION").write_text(f"written by onnx {onnx.__version__} with tests/data/make_onnx_fixtures.py\n")


if __name__ == "__main__":
    main()
