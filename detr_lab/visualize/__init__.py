"""Pictures: predictions against ground truth, attention of DETR / Deformable DETR / ACT, run curves.

- `draw`: matplotlib drawings of arrays in image pixels, written as PNG (`draw_detections`, ...);
- `capture`: forward hooks on attention modules and the recomputation of their weights, sampling
  points and clusters (no change to the models);
- `attention`: one image through a model -> `cross_attention_picture`, `sampling_points_picture`,
  `clusters_picture`;
- `curves`: `plot_run_curves` from a run's Lightning `metrics.csv`;
- `from_checkpoint`: checkpoints and validation images for `tools/visualize.py`.

Beside `benchmark` at the end of the data flow: may import every other part of detr_lab (models,
checkpoints, data, engine); only the tools import it.
"""
