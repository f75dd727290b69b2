"""ONNX export, its accuracy proof and onnxruntime inference (needs the `export` extra).

- `onnx_export.export_onnx(model, path, metadata=...)`: trace a detector to ONNX (standard ops only).
- `verify.verify_onnx(model, path)`: onnxruntime against PyTorch on random and validation batches.
- `runtime.OnnxDetector(path)`: onnxruntime inference with the PyTorch model's call contract.
- `from_checkpoint.export_checkpoint(...)`: checkpoint -> ONNX (+ verify), behind `tools/export.py`.
- On the traced copy: RepVGG blocks as single convolutions and HGNetv2's learnable affine blocks
  folded into the norm and a clamp (`detr_lab.models.fusion`); deformable attention on ONNX
  `GridSample` at a fixed size, bilinear gathers with dynamic axes or when asked (TensorRT).

onnx and onnxruntime are imported only when a function needs them; without them the functions raise
`MissingExtraError` saying `pip install -e ".[export]"`.

Beside `engine` in the data flow: may import the leaves (`files`, `errors`, `io`, `boxes`),
`config`, `data`, `models` and `checkpoints`; never `engine`. `predict` (evaluation and inference on
onnxruntime), `benchmark` and the tools import it.
"""
