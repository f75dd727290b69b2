"""detr_lab: DETR, Deformable DETR and ACT object detectors on PyTorch and Lightning."""

__version__ = "0.1.0"
