"""detr_lab: DETR, Deformable DETR and ACT object detectors on PyTorch and Lightning.

Packages, in the one direction data flows (a package imports only those before it; packages on
one line are independent: neither imports the other; no import cycle between modules or packages):

- leaves every package may import: `files` (atomic writes) and `errors` (the library's error types),
  both standard library only; `io` (safe reading, torch saving), `boxes` (box formats and IoU),
  `timer` (calls taking turns, wall and CPU seconds), `config` and `config_migration` (typed schema,
  YAML loading, the migration of earlier configs; it reads the part tables of `models`, which are
  pure data);
- `data`: datasets, transforms, collate, image decoding -> batches `(images, padding_mask, targets)`;
- `models`: backbones, attention variants, transformer, detector heads, matcher, criterion,
  post-processing; never imports `data`, `checkpoints` or `engine`;
- `checkpoints` (detr_lab, Lightning and official checkpoints -> models) beside `visualize`
  (pictures of detections, attention and run curves from arrays and models);
- `engine` (the Lightning training system, COCO evaluation, the one forward path `engine.detect`,
  the tools' command-line helpers `engine.cli`) beside `export` (ONNX export and onnxruntime
  inference) and `zoo` (the official checkpoints to download, Hub-style model folders);
- `predict` (the `Predictor` on PyTorch or onnxruntime, inference on files, evaluation of ONNX
  models: what needs both `engine` and `export`) beside `benchmark` (measuring models, paths and
  kernels);
- `tools/` (outside the package): thin command-line scripts over all of it; they turn the library's
  errors into one line and an exit code (`engine.cli.run_tool`).
"""

__version__ = "0.1.0"
