"""detr_lab: DETR, Deformable DETR and ACT object detectors on PyTorch and Lightning.

Packages, in the one direction data flows (a package imports only those before it):

- `config` (typed schema, YAML loading; reads the attention spec table, which is pure data) and
  `boxes` (box formats and IoU): leaves every other package may import;
- `data`: datasets, transforms, collate -> batches `(images, padding_mask, targets)`;
- `models`: backbone, attention variants, transformer, detector heads, matcher, criterion,
  post-processing; never imports `data` or `engine`;
- `engine`: the Lightning training system, COCO evaluation, inference; imports all of the above;
- `checkpoints` and `benchmark`: loading / saving weights and measuring models, for `engine` and
  the tools;
- `tools/` (outside the package): thin command-line scripts over all of it.
"""

__version__ = "0.1.0"
