"""The onnxruntime session every detr_lab ONNX path opens: one place for its settings.

    session = create_session("model.onnx", threads=2)   # CPU unless `providers` says otherwise

Used by `OnnxDetector` (tools/eval.py, tools/infer.py, `Predictor.from_onnx`), the latency benchmark
and the comparison with official exports (both graphs get the same settings there).

`DISABLED_OPTIMIZERS` names onnxruntime graph rewrites the sessions leave out:

- `SkipLayerNormFusion` merges a residual `Add` into the `LayerNormalization` after it. On onnxruntime
  1.32's CPU kernels the merged node cost more than the two it replaces: D-FINE-N at 640 x 640 (1
  thread, 2-core AMD EPYC) spent 2.4 ms in its 11 fused nodes, about 0.2 ms each at the decoder's
  300 x 128, where the official export's unfused `LayerNormalization` nodes took 0.03 ms each (the
  official graph, exported at opset 16 with a dynamic batch, keeps its decoder's shapes symbolic, so
  onnxruntime does not fuse them there). `tools/bench_official_onnx.py --profile` shows the per-node
  times.
"""

from __future__ import annotations

import os

from detr_lab.export.dependencies import require

DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)


def create_session(
    path: str | os.PathLike,
    *,
    threads: int | None = None,
    providers: list[str] | None = None,
    profile_prefix: str | None = None,
):
    """An `onnxruntime.InferenceSession` of `path` with detr_lab's settings.

    Args:
        path: an `.onnx` file.
        threads: intra-op threads (None: onnxruntime's choice, one per core).
        providers: execution providers (default `["CPUExecutionProvider"]`).
        profile_prefix: turn onnxruntime's profiler on, writing `<prefix>_<date>.json`.
    Raises:
        MissingExtraError: onnxruntime is not installed. Whatever onnxruntime raises for a file it
        cannot load (callers name the file in their own message).
    """
    ort = require("onnxruntime")
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(
        str(path),
        options,
        providers=providers or ["CPUExecutionProvider"],
        disabled_optimizers=list(DISABLED_OPTIMIZERS),
    )
