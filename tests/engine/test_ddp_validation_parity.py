"""Validation under Lightning DDP (2 CPU processes, gloo) reports what eval.py reports on the same checkpoint.

Issue #14 item 6: AP must not depend on batch size or process count, so the best checkpoint does
not depend on the GPU count. Seven validation images of mixed sizes (an uneven split over 2
processes, the distributed sampler repeats one) at batch size 2 under `ddp_spawn`, against
`evaluate_checkpoint` (behind tools/eval.py) at batch size 1. The model is untrained (AP ~0), so
the per-image detections themselves are compared, not only the AP. With the official padded
batching the detections of padded images change: the comparison is sharp enough to see that.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from detr_lab.checkpoints import load_checkpoint
from detr_lab.checkpoints.formats import save_checkpoint
from detr_lab.config import load_config
from detr_lab.data.datamodule import DetectionDataModule
from detr_lab.data.synthetic import ensure_synthetic_dataset, split_paths
from detr_lab.engine.evaluate import evaluate_checkpoint
from detr_lab.engine.evaluator import STAT_NAMES
from detr_lab.engine.module import DetectionModule
from detr_lab.engine.trainer import build_trainer

from factories import TINY_RUN_YAML

NUM_VAL = 7  # odd: one process gets a repeated image, the other process fewer distinct ones
DDP_SETTINGS = ["data.batch_size=2", f"data.synthetic.num_val={NUM_VAL}", "trainer.devices=2",
                "trainer.strategy=ddp_spawn", "trainer.summary=false"]


class RecordingModule(DetectionModule):
    """DetectionModule that writes, per process, its own image ids, the gathered detections and (rank
    0) the COCO numbers of each validation epoch to `<record_dir>/rank<k>.json`."""

    record_dir = ""

    def on_validation_epoch_end(self) -> None:
        evaluator = self.evaluator
        own_images = sorted(evaluator.results) if evaluator is not None else []
        super().on_validation_epoch_end()  # gathers into `evaluator` in place, computes on rank 0
        if evaluator is None or self.trainer.sanity_checking:
            return
        record = {"own_images": own_images, "detections": evaluator.detections(), "stats": evaluator.stats}
        Path(self.record_dir, f"rank{self.global_rank}.json").write_text(json.dumps(record))


def _rows(detections: list[dict]) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """(image id, category id) per detection in order, and `[N, 5]` float64 box xywh + score."""
    keys = [(int(d["image_id"]), int(d["category_id"])) for d in detections]
    values = torch.tensor([[*d["bbox"], d["score"]] for d in detections], dtype=torch.float64)
    return keys, values


def _validate_on_two_processes(config_path: Path, checkpoint: Path, record_dir: Path,
                               *extra: str) -> list[dict]:
    """`trainer.validate` of the checkpoint's weights under `DDP_SETTINGS` + `extra`; the two processes'
    records (see `RecordingModule`), rank 0's with the `val/AP` it logged added as `logged_AP`."""
    cfg = load_config(config_path, [*DDP_SETTINGS, *extra])
    loaded = load_checkpoint(checkpoint)
    datamodule = DetectionDataModule(cfg, loaded.category_ids)
    module = RecordingModule(cfg, loaded.category_ids, loaded.class_names)
    module.model.load_state_dict(loaded.model.state_dict())
    module.record_dir = str(record_dir)
    record_dir.mkdir()
    trainer = build_trainer(cfg, progress_bar=False, loggers=False)
    logged = trainer.validate(module, datamodule=datamodule, verbose=False)
    records = [json.loads((record_dir / f"rank{rank}.json").read_text()) for rank in range(2)]
    records[0]["logged_AP"] = logged[0]["val/AP"]
    return records


@pytest.mark.slow  # two spawned processes, twice: ~40 s on 2 loaded cores
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_two_process_validation_matches_eval_checkpoint(tmp_path, monkeypatch):
    # An earlier in-process Lightning run leaves MASTER_ADDR / MASTER_PORT / *_RANK in os.environ;
    # the spawned processes must rendezvous on a port of their own.
    for name in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "GLOBAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(TINY_RUN_YAML.format(root=tmp_path))
    cfg = load_config(config_path, [f"data.synthetic.num_val={NUM_VAL}"])
    ensure_synthetic_dataset(cfg.data)
    datamodule = DetectionDataModule(cfg)
    torch.manual_seed(0)
    model = DetectionModule(cfg, datamodule.category_ids, datamodule.class_names).model
    checkpoint = save_checkpoint(tmp_path / "random.pth", model, cfg, datamodule.category_ids,
                                 datamodule.class_names)

    reference = evaluate_checkpoint(config_path, checkpoint, overrides=[f"data.synthetic.num_val={NUM_VAL}"],
                                    device="cpu", batch_size=1, progress=False, output=tmp_path / "eval.json")
    expected_keys, expected_values = _rows(json.loads(reference.results_path.read_text()))
    assert reference.num_images == NUM_VAL
    assert len({image_id for image_id, _ in expected_keys}) == NUM_VAL

    records = _validate_on_two_processes(config_path, checkpoint, tmp_path / "same_size")
    own = [set(record["own_images"]) for record in records]
    assert own[0] and own[1] and own[0] != own[1]  # each process validated a part
    assert len(own[0] | own[1]) == NUM_VAL
    assert len(own[0]) + len(own[1]) == NUM_VAL + 1  # the sampler repeated one image
    images = json.loads(split_paths(cfg.data.root, "val")[1].read_text())["images"]
    sizes = {(image["height"], image["width"]) for image in images if image["id"] in own[0] | own[1]}
    assert len(sizes) > 1  # mixed sizes, so batching could matter
    for record in records:  # every process holds the union after the gather
        keys, values = _rows(record["detections"])
        assert keys == expected_keys
        # float32 noise of batch 2 vs 1 measured up to 7.6e-6 (2 ulps at 64 px); padded batching: 0.57
        torch.testing.assert_close(values, expected_values, atol=1e-5, rtol=0)
    stats = records[0]["stats"]
    assert records[1]["stats"] is None  # only rank 0 scores
    for name in STAT_NAMES:
        assert stats[name] == pytest.approx(reference.stats[name], abs=1e-9), name
    assert records[0]["logged_AP"] == pytest.approx(reference.stats["AP"], abs=1e-6)  # logged as float32

    # The official padded batching changes padded images' outputs: the comparison above would fail.
    padded = _validate_on_two_processes(config_path, checkpoint, tmp_path / "padded",
                                        "data.eval_batching=padded")
    keys, values = _rows(padded[0]["detections"])
    assert len(keys) == len(expected_keys)
    assert (values - expected_values).abs().max() > 1e-3
