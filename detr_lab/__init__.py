"""detr_lab: DETR, Deformable DETR and ACT object detectors on PyTorch and Lightning.

Packages, in the one direction data flows (a package imports only those before it):

- leaves every package may import: `files` (atomic writes, standard library only), `io` (safe
  reading, torch saving), `boxes` (box formats and IoU), `timer` (calls taking turns, wall and CPU
  seconds), `config` (typed schema, YAML loading; it reads the attention spec table, which is pure data);
- `data`: datasets, transforms, collate -> batches `(images, padding_mask, targets)`;
- `models`: backbones, attention variants, transformer, detector heads, matcher, criterion,
  post-processing; never imports `data`, `checkpoints` or `engine`;
- `checkpoints`: detr_lab, Lightning and official checkpoints -> models;
- `engine` (the Lightning training system, COCO evaluation, inference) beside `export` (ONNX
  export and onnxruntime inference), which import each other's modules but form no cycle;
- `benchmark` (measuring models, paths and kernels) and `visualize` (pictures of predictions,
  attention and run curves), for the tools;
- `tools/` (outside the package): thin command-line scripts over all of it.
"""

__version__ = "0.1.0"
