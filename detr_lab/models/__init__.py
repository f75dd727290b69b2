"""Detection models: `nn.Module`s that know nothing of Lightning, COCO files or optimizers.

The one `Detector` (`detector.py`) assembled from parts: backbones (`backbones/`), necks (`necks/`),
position encodings, the attention variants (`attention/`), the encoder / decoder that receive their
attention modules, query sources (`queries/`), class and box heads; its prediction groups
(`groups.py`), the Hungarian matcher with its cost table, the loss-term table and the one set
criterion, classification strategies and post-processing. `build.py` turns the model config into
modules (the only reader of it). The part tables (`attention/__init__.py`, `necks/__init__.py`,
`queries/__init__.py`) are pure data that `detr_lab.config` reads, so this package imports the config
for typing only. May import `detr_lab.boxes` and `detr_lab.io`; never `data`, `checkpoints`, `engine`
or `benchmark`.
"""
