"""The training system on top of the models: `DetectionModule` (LightningModule), the trainer and
its callbacks (EMA, health monitors, run summary, atomic checkpoints), optimizer groups, COCO
evaluation and inference. May import `config`, `boxes`, `data`, `models` and `checkpoints`; only
the tools import it.
"""
