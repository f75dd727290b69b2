"""Detection models: `nn.Module`s that know nothing of Lightning, COCO files or optimizers.

Backbones (`backbones/`), position encodings, the attention variants (`attention/`), the encoder /
decoder that receive their attention modules, the detector heads, Hungarian matcher, set criterion
and post-processing; `build.py` turns the model config into modules (the only reader of it).
May import `detr_lab.config`, `detr_lab.boxes` and `detr_lab.io`; never `data`, `checkpoints`,
`engine` or `benchmark`.
"""
