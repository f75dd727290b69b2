"""Pictures: detections and ground truth, attention of DETR / Deformable DETR / ACT, run curves.

- `draw`: drawings of arrays in image pixels: `draw_detections` (the one drawing of labelled boxes,
  PIL), `draw_ground_truth_and_predictions`, and matplotlib attention maps, points and clusters;
- `capture`: forward hooks on attention modules and the recomputation of their weights, sampling
  points and clusters (no change to the models);
- `attention`: one image through a model -> `cross_attention_picture`, `sampling_points_picture`,
  `clusters_picture`;
- `curves`: `plot_run_curves` from a run's Lightning `metrics.csv`.

Beside `checkpoints` in the data flow: may import the leaves (`files`, `errors`, `io`, `boxes`),
`config`, `data` and `models`; `engine` (the run summary's example image), `predict` (annotated
inference outputs, validation pictures) and the tools import it.
"""
