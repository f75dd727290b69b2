"""The training system on top of the models: `DetectionModule` (LightningModule), the trainer and
its callbacks (EMA, health monitors, run summary, atomic checkpoints), optimizer groups, COCO
evaluation and inference. May import `config`, `boxes`, `io`, `data`, `models` and `checkpoints`;
`benchmark` and the tools import it.
"""
