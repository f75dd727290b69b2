"""Prediction: a checkpoint or an exported ONNX model on images, over both `engine` and `export`.

- `predictor.Predictor`: `from_checkpoint` (PyTorch) / `from_onnx` (onnxruntime) / `from_pretrained`
  (a zoo name, a Hub-style model folder or a Hub repository id, through `detr_lab.zoo`),
  `predict(images)`, `save_pretrained(folder)`;
- `inputs.collect_images`: the image files a command line names (folders walked);
- `infer.run_inference`: images -> `detections.json` + annotated copies (`tools/infer.py`), with
  `detections_file` holding the json's records and its periodic, atomic writer;
- `onnx_evaluation.evaluate_onnx`: COCO AP of an exported model (`tools/eval.py --backend onnxruntime`);
- `pictures.validation_predictions`: ground truth beside predictions (`tools/visualize.py predictions`).

    from detr_lab.predict import Predictor

May import every package before it in the data flow (`config`, `data`, `models`, `checkpoints`,
`visualize`, `engine`, `export` and the leaves); `benchmark` and the tools import it, `engine` and
`export` never do. Importing it does not import Lightning.
"""

from __future__ import annotations

from detr_lab.predict.predictor import Predictor

__all__ = ["Predictor"]
