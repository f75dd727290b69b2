"""LightningDataModule: train/val COCO-format datasets and their DataLoaders from `cfg.data`.

    dm = DetectionDataModule(cfg)                 # or category_ids=checkpoint's list
    dm.num_classes, dm.category_ids, dm.class_names   # known before setup
    dm.prepare_data(); dm.setup("fit")
    images, padding_mask, targets = next(iter(dm.train_dataloader()))

The class mapping (class index -> category id) is, unless given, the sorted category ids of the
validation annotation file (the synthetic set's fixed ids for `dataset: synthetic`); both splits use
the same mapping, so a training annotation whose category is not in it is an error naming it.
YOLO-format sets (`data.format`, see `resolve_format`) map class index i to category id i, with the
names of their data.yaml, and are converted to COCO dicts in memory (`detr_lab.data.yolo`). Given a
checkpoint's mapping (`category_ids` and `class_names`) whose ids are not the YOLO class indices, a YOLO
set whose names match the checkpoint's one to one is mapped by name (a `ClassMappingWarning` says so):
a YOLO copy of a COCO set evaluates with the checkpoint of that COCO set.
Under DDP, Lightning inserts the DistributedSampler itself. The training loader is a torchdata
`StatefulDataLoader`: Lightning stores its position and sampler state in each checkpoint.
With `data.augment.policy: rtdetr` the training loader's collate is `SquareMultiScaleCollate`
(a side from `augment.square_scales` per batch until `augment.stop_epoch`, after DEIM's batch mixup
when `augment.mixup.prob` > 0); the epoch reaches the transforms and the collate with each sampler key,
never through state held by workers. DEIM's mosaic (`augment.mosaic`) is part of the training
transform; the training dataset gives it the other images it joins (`CocoDetectionDataset.raw_sample`).
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import cv2
import lightning as L
import torch
from torch.utils.data import DataLoader, SequentialSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from detr_lab.config import Config, DataConfig
from detr_lab.data.coco import UNNAMED_CATEGORY, CocoDetectionDataset, read_categories
from detr_lab.data.collate import SquareMultiScaleCollate, collate_detection
from detr_lab.data.errors import ClassMappingWarning, DatasetError
from detr_lab.data.mixup import BatchMixup
from detr_lab.data.samplers import (
    AspectRatioBatchSampler,
    EpochSampler,
    SameSizeBatchSampler,
    orientation_group,
)
from detr_lab.data.synthetic import SYNTHETIC_CATEGORY_IDS, SYNTHETIC_CLASS_NAMES, ensure_synthetic_dataset
from detr_lab.data.transforms import build_eval_transform, build_train_transform, eval_resized_size
from detr_lab.data.yolo import YoloDetectionDataset, read_yolo_categories

# torchdata 0.11 calls a torch function that recent torch releases deprecate, once per iterator.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)


def coco_split_paths(data_cfg: DataConfig, split: str) -> tuple[Path, Path]:
    """(image folder, annotation json) of a COCO-format split ("train", "val" or "test") under `data.root`."""
    root = Path(data_cfg.root)
    images, annotations = {
        "train": (data_cfg.train_images, data_cfg.train_annotations),
        "val": (data_cfg.val_images, data_cfg.val_annotations),
        "test": (data_cfg.test_images, data_cfg.test_annotations),
    }[split]
    return root / images, root / annotations


def resolve_format(data_cfg: DataConfig) -> str:
    """`data.format` with "auto" resolved: "yolo" when `<root>/<yolo_data>` exists and neither COCO
    annotation file (train, val) does, else "coco". The synthetic dataset is always "coco"."""
    if data_cfg.dataset == "synthetic" or data_cfg.format == "coco":
        return "coco"
    if data_cfg.format == "yolo":
        return "yolo"
    has_yaml = (Path(data_cfg.root) / data_cfg.yolo_data).is_file()
    has_coco = any(coco_split_paths(data_cfg, split)[1].is_file() for split in ("train", "val"))
    return "yolo" if has_yaml and not has_coco else "coco"


def match_by_name(
    ids: Sequence[int], names: Sequence[str], wanted_ids: Sequence[int] | None,
    wanted_names: Sequence[str] | None, source: Path,
) -> dict[int, int] | None:
    """A dataset's category id -> the wanted category id, matched by class name; None when not needed
    (every id of the dataset is wanted under the same name) or not possible (the names do not match
    one to one: each dataset name unique and present once among the wanted names).

    Warns (`ClassMappingWarning`) when it maps, naming the first pairs.
    """
    if wanted_ids is None or wanted_names is None or len(wanted_ids) != len(wanted_names):
        return None
    wanted = dict(zip(wanted_ids, wanted_names, strict=True))
    if all(wanted.get(i) == name for i, name in zip(ids, names, strict=True)):
        return None
    counts = Counter(wanted_names)
    if len(set(names)) != len(names) or any(counts[name] != 1 for name in names):
        return None
    id_of = {name: i for i, name in wanted.items()}
    mapping = {i: id_of[name] for i, name in zip(ids, names, strict=True)}
    shown = ", ".join(f"{i} {name!r} -> {mapping[i]}" for i, name in list(zip(ids, names, strict=True))[:4])
    more = " ..." if len(ids) > 4 else ""
    warnings.warn(f"{source}: its class indices are not the model's category ids, but the class names agree "
                  f"one to one: classes mapped by name ({shown}{more})", ClassMappingWarning, stacklevel=3)
    return mapping


class DetectionDataModule(L.LightningDataModule):
    """Datasets and loaders for `cfg.data` (`dataset: coco` or `synthetic`; COCO or YOLO files).

    Batches are `(images [B, 3, H, W], padding_mask [B, H, W] bool True = padding, targets)`, see
    `detr_lab.data.collate.collate_detection`.

    Args:
        cfg: the run's config; reads `cfg.data` only.
        category_ids: explicit class index -> category id mapping (e.g. from a checkpoint); None: derived
            from the data (see the module docstring).
        class_names: the names of `category_ids` (a checkpoint's); lets a YOLO set be mapped by name.
        eval_split: the split behind `val_dataset` and the validation loader: "val" (default) or
            "test" (`data.test_images` / `data.test_annotations`, or a YOLO data.yaml's `test`).
    Raises:
        DatasetError: `eval_split="test"` on the synthetic dataset, which has no test split.
    """

    def __init__(
        self, cfg: Config, category_ids: Sequence[int] | None = None,
        class_names: Sequence[str] | None = None, *, eval_split: str = "val",
    ) -> None:
        super().__init__()
        if eval_split not in ("val", "test"):
            raise ValueError(f"DetectionDataModule: eval_split must be 'val' or 'test', got {eval_split!r}")
        if eval_split == "test" and cfg.data.dataset == "synthetic":
            raise DatasetError("data.dataset 'synthetic' has no test split; evaluate another annotation file "
                               "(tools/eval.py --annotations FILE --images DIR)")
        self.eval_split = eval_split
        self.cfg = cfg
        self.data_cfg = cfg.data
        self._requested_category_ids = list(category_ids) if category_ids is not None else None
        self._requested_names = list(class_names) if class_names is not None else None
        self._yolo_id_map: dict[int, int] | None = None  # YOLO class index -> category id, by name
        self._categories: tuple[list[int], list[str]] | None = None
        self.train_dataset: CocoDetectionDataset | None = None
        self.val_dataset: CocoDetectionDataset | None = None

    # ------------------------------------------------------------------------------------- paths
    @property
    def format(self) -> str:
        """The on-disk format, "coco" or "yolo" (`data.format`, "auto" resolved; see `resolve_format`)."""
        return resolve_format(self.data_cfg)

    def _paths(self, split: str) -> tuple[Path, Path]:
        return coco_split_paths(self.data_cfg, split)

    def _build_dataset(self, split: str, **kwargs) -> CocoDetectionDataset:
        if self.format == "yolo":
            return YoloDetectionDataset(Path(self.data_cfg.root) / self.data_cfg.yolo_data, split,
                                        category_id_map=self._yolo_id_map, **kwargs)
        images, annotations = self._paths(split)
        return CocoDetectionDataset(images, annotations, **kwargs)

    # ------------------------------------------------------------------------------- class mapping
    def _resolve_categories(self) -> tuple[list[int], list[str]]:
        if self._categories is None:
            if self.data_cfg.dataset == "synthetic":
                ids = self._requested_category_ids or list(SYNTHETIC_CATEGORY_IDS)
                name_of = dict(zip(SYNTHETIC_CATEGORY_IDS, SYNTHETIC_CLASS_NAMES, strict=True))
                self._categories = (ids, [name_of.get(i, "N/A") for i in ids])
            elif self.format == "yolo":
                data_yaml = Path(self.data_cfg.root) / self.data_cfg.yolo_data
                ids, names = read_yolo_categories(data_yaml)
                self._yolo_id_map = match_by_name(ids, names, self._requested_category_ids,
                                                  self._requested_names, data_yaml)
                if self._yolo_id_map is not None:
                    ids, names = list(self._requested_category_ids), list(self._requested_names)
                elif self._requested_category_ids is not None:
                    name_of = dict(zip(ids, names, strict=True))
                    ids = self._requested_category_ids
                    names = [name_of.get(i, UNNAMED_CATEGORY) for i in ids]
                self._categories = (ids, names)
            else:
                _, annotation_file = self._paths(self.eval_split)
                self._categories = read_categories(annotation_file, self._requested_category_ids)
        return self._categories

    @property
    def category_ids(self) -> list[int]:
        """Class index -> dataset category id."""
        return list(self._resolve_categories()[0])

    @property
    def class_names(self) -> list[str]:
        """Class index -> category name."""
        return list(self._resolve_categories()[1])

    @property
    def num_classes(self) -> int:
        """Real classes (the model's "no object" class is index `num_classes`)."""
        return len(self._resolve_categories()[0])

    # -------------------------------------------------------------------------------- lightning
    def prepare_data(self) -> None:
        if self.data_cfg.dataset == "synthetic":
            ensure_synthetic_dataset(self.data_cfg)

    def setup(self, stage: str | None = None) -> None:
        if self.data_cfg.dataset == "synthetic":
            ensure_synthetic_dataset(self.data_cfg)  # no-op when prepare_data has run
        category_ids = self.category_ids
        if stage in (None, "fit") and self.train_dataset is None:
            self.train_dataset = self._build_dataset(
                "train",
                transforms=build_train_transform(self.data_cfg.augment),
                category_ids=category_ids,
                skip_corrupt_images=self.data_cfg.skip_corrupt_images,
                sample_seed=self.cfg.trainer.seed,
            )
        if self.val_dataset is None:
            self.val_dataset = self._build_dataset(
                self.eval_split,
                transforms=build_eval_transform(self.data_cfg.augment),
                category_ids=category_ids,
                skip_corrupt_images=False,  # evaluation must see every image
            )
        for split, dataset in (("train", self.train_dataset), ("val", self.val_dataset)):
            if dataset is not None and len(dataset) == 0:
                raise DatasetError(f"{dataset.annotation_file}: the {split} split has no images")

    def _built(self, dataset: CocoDetectionDataset | None, split: str) -> CocoDetectionDataset:
        if dataset is None:
            raise RuntimeError(f"DetectionDataModule: the {split} dataset is not built; call setup() first")
        return dataset

    def _loader_options(self, collate_fn=collate_detection) -> dict:
        workers = self.data_cfg.num_workers
        if workers > 0:
            # Workers are forked: OpenCV's thread pool must be shut down in this process first. A
            # forked child inherits the pool's mutex in whatever state an idle pool thread left it,
            # and its first OpenCV call can then wait forever (seen as a hung DataLoader worker).
            # Each worker runs OpenCV on one thread anyway: the workers are the parallelism.
            cv2.setNumThreads(1)
        return {"num_workers": workers, "persistent_workers": workers > 0, "collate_fn": collate_fn,
                "pin_memory": torch.cuda.is_available()}

    def train_dataloader(self) -> DataLoader:
        """Shuffled by `EpochSampler`: order from (seed, epoch), augmentation from (seed, epoch, index),
        so a resumed run draws exactly what the uninterrupted run would. With `data.train_batching:
        aspect_ratio` (the default) a batch holds images of one orientation (`AspectRatioBatchSampler`),
        except under the `rtdetr` policy, whose images all have one size (nothing to group)."""
        # Stateful: Lightning saves its position in every checkpoint, so a run resumed mid-epoch
        # finishes that epoch with the same batches.
        dataset = self._built(self.train_dataset, "train")
        sampler = EpochSampler(dataset, seed=self.cfg.trainer.seed)
        # Lightning sets the epoch at each epoch start, but may create a resumed run's first iterator
        # (and prefetch from it) before that: start from the trainer's epoch.
        trainer = getattr(self, "trainer", None)
        sampler.set_epoch(trainer.current_epoch if trainer is not None else 0)
        options = self._loader_options(self._train_collate())
        if self.data_cfg.train_batching == "aspect_ratio" and self.data_cfg.augment.policy != "rtdetr":
            groups = [orientation_group(size) for size in dataset.upright_sizes()]
            batch_sampler = AspectRatioBatchSampler(sampler, self.data_cfg.batch_size, groups=groups,
                                                    seed=self.cfg.trainer.seed)
            return StatefulDataLoader(dataset, batch_sampler=batch_sampler, **options)
        return StatefulDataLoader(dataset, batch_size=self.data_cfg.batch_size, sampler=sampler, **options)

    def _train_collate(self):
        """`collate_detection`; for the rtdetr policy RT-DETR's batch multi-scale resize, with DEIM's
        mixup when `augment.mixup.prob` > 0 (never from `augment.stop_epoch` on)."""
        aug = self.data_cfg.augment
        if aug.policy != "rtdetr":
            return collate_detection
        mixup = None
        if aug.mixup.prob > 0:
            stops = [epoch for epoch in (aug.mixup.stop_epoch, aug.stop_epoch) if epoch is not None]
            mixup = BatchMixup(aug.mixup.prob, aug.mixup.start_epoch, min(stops, default=None),
                               seed=self.cfg.trainer.seed)
        return SquareMultiScaleCollate(aug.square_scales, aug.stop_epoch, seed=self.cfg.trainer.seed,
                                       mixup=mixup)

    def val_dataloader(self) -> DataLoader:
        """Validation batches; with `data.eval_batching: same_size` (default) each batch holds images of
        one resized size only, so no image is padded and AP does not depend on the batch size or the
        number of processes (see `detr_lab.data.samplers`); `padded` is the official batching."""
        dataset = self._built(self.val_dataset, "val")
        if self.data_cfg.eval_batching == "padded":
            batch_size = self.data_cfg.batch_size
            return DataLoader(dataset, batch_size=batch_size, shuffle=False, **self._loader_options())
        return self._same_size_loader(dataset)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def _same_size_loader(self, dataset: CocoDetectionDataset) -> DataLoader:
        aug = self.data_cfg.augment
        sizes = [  # an unreadable header goes alone; decoding it raises the real error
            eval_resized_size(*hw, aug) if hw is not None else ("unread", index)
            for index, hw in enumerate(dataset.upright_sizes())
        ]
        sampler = SequentialSampler(dataset)
        batch_sampler = SameSizeBatchSampler(sampler, self.data_cfg.batch_size, sizes=sizes)
        return DataLoader(dataset, batch_sampler=batch_sampler, **self._loader_options())
