"""The training system on top of the models: `DetectionModule` (LightningModule), the trainer and
its callbacks (EMA, health monitors, run summary, atomic checkpoints), optimizer groups, COCO
evaluation, `detect` (the one path from a padded batch to detections) and `cli` (the tools'
one-line errors and exit codes, imported by the tools only).

May import the leaves (`files`, `errors`, `io`, `boxes`), `config`, `data`, `models`, `checkpoints`
and `visualize`; never `export` (what needs both lives in `predict`). `predict`, `benchmark` and the
tools import it.
"""
