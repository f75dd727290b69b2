"""EMA of the weights (`WarmupEMA`, Lightning WeightAveraging): the rule, validation, checkpoints, resume."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from detr_lab.engine.ema import WarmupEMA, warmup_decay


def test_warmup_decay_values():
    assert warmup_decay(1, 0.99, 0) == 0.99
    assert warmup_decay(10, 0.99, 10) == pytest.approx(0.99 * (1 - math.exp(-1)))  # 0.6258
    assert warmup_decay(10, 0.99, 10) == pytest.approx(0.6257994, abs=1e-6)
    assert warmup_decay(10_000, 0.99, 10) == pytest.approx(0.99)
    assert float(warmup_decay(torch.tensor(10), 0.99, 10)) == pytest.approx(0.6257994, abs=1e-6)
    with pytest.raises(ValueError, match="decay"):
        WarmupEMA(decay=1.5)
    with pytest.raises(ValueError, match="warmup_steps"):
        WarmupEMA(warmup_steps=-1)


class Regression(L.LightningModule):
    """y = x @ w, SGD; records its weights as validation sees them."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(3, 1, bias=False)
        with torch.no_grad():
            self.layer.weight.copy_(torch.tensor([[0.5, -1.0, 2.0]]))
        self.validated_weights = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return ((self.layer(x) - y) ** 2).mean()

    def validation_step(self, batch, batch_idx):
        self.validated_weights.append(self.layer.weight.detach().clone())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class StepWeights(Callback):
    """The raw weights after every optimizer step (recorded before the EMA callback's own update)."""

    def __init__(self):
        self.after_step = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after_step.append(pl_module.layer.weight.detach().clone())


def data(n=6):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=generator)
    return DataLoader(TensorDataset(x, x @ torch.tensor([[1.0], [2.0], [3.0]])), batch_size=2)


def fit(tmp_path, *, max_epochs, ckpt_path=None, callbacks=()):
    """Fit `Regression` with EMA; a checkpoint at the end of every epoch (`epoch=N.ckpt`)."""
    module = Regression()
    ema = WarmupEMA(decay=0.9, warmup_steps=2)
    every_epoch = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
    trainer = L.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        num_sanity_val_steps=0, callbacks=[*callbacks, ema, every_epoch])
    trainer.fit(module, train_dataloaders=data(), val_dataloaders=data(2), ckpt_path=ckpt_path,
                weights_only=True)
    return trainer, module, ema


def expected_ema(trajectory, decay=0.9, warmup_steps=2):
    """The EMA of a list of weights, written out: the first copies, then d_n = decay (1 - e^(-n/W))."""
    average = trajectory[0].clone()
    for n, weights in enumerate(trajectory[1:], start=1):
        d = decay * (1 - math.exp(-n / warmup_steps))
        average = d * average + (1 - d) * weights
    return average


def test_average_follows_the_warmup_rule_and_validation_sees_it(tmp_path):
    recorder = StepWeights()
    trainer, module, ema = fit(tmp_path, max_epochs=2, callbacks=[recorder])
    assert trainer.global_step == 6 and ema.num_updates == 6
    raw = recorder.after_step
    # Validation after epoch 0 (3 steps) and epoch 1 (6 steps) ran with the averages of those moments.
    assert len(module.validated_weights) == 2
    torch.testing.assert_close(module.validated_weights[0], expected_ema(raw[:3]))
    torch.testing.assert_close(module.validated_weights[1], expected_ema(raw))
    assert not torch.allclose(module.validated_weights[1], raw[-1])
    # When fit ends the module holds the average.
    torch.testing.assert_close(module.layer.weight.detach(), expected_ema(raw))


def test_checkpoint_holds_the_average_and_resume_restores_it(tmp_path):
    recorder = StepWeights()
    _, _, straight_ema = fit(tmp_path / "a", max_epochs=2, callbacks=[recorder])
    path = tmp_path / "a" / "epoch=0.ckpt"  # written mid-run, after 3 steps
    saved = torch.load(path, weights_only=True)
    torch.testing.assert_close(saved["state_dict"]["layer.weight"], expected_ema(recorder.after_step[:3]))
    torch.testing.assert_close(saved["current_model_state"]["layer.weight"], recorder.after_step[2])
    assert int(saved["averaging_state"]["n_averaged"]) == 3

    class AtResume(Callback):
        def on_train_start(self, trainer, pl_module):
            self.raw = pl_module.layer.weight.detach().clone()
            ema = next(c for c in trainer.callbacks if isinstance(c, WarmupEMA))
            self.average = ema.averaged_state_dict()["layer.weight"].clone()
            self.updates = ema.num_updates

    probe = AtResume()
    resumed, _, resumed_ema = fit(tmp_path / "b", max_epochs=2, ckpt_path=path, callbacks=[probe])
    # Training continues from the raw weights, the average and its update count from the checkpoint.
    torch.testing.assert_close(probe.raw, recorder.after_step[2])
    torch.testing.assert_close(probe.average, expected_ema(recorder.after_step[:3]))
    assert probe.updates == 3
    assert resumed.global_step == 6 and resumed_ema.num_updates == 6
    torch.testing.assert_close(resumed_ema.averaged_state_dict()["layer.weight"],
                               straight_ema.averaged_state_dict()["layer.weight"])


def test_timed_evaluation_scores_the_average_and_training_continues_from_raw_weights(tmp_path, monkeypatch):
    """tools/bench_demo_ap.py evaluates mid-epoch: with EMA it must see what validation sees."""
    from types import SimpleNamespace

    from detr_lab.engine import callbacks as callbacks_module
    from detr_lab.engine.callbacks import TimedEvaluation

    evaluated = []

    class Evaluator:
        def __init__(self, coco, category_ids):
            pass

        def compute(self):
            return {"AP": 0.0, "AP50": 0.0}

    def record(model, postprocess, loader, evaluator, device):
        evaluated.append(model.layer.weight.detach().clone())

    monkeypatch.setattr(callbacks_module, "CocoEvaluator", Evaluator)
    monkeypatch.setattr(callbacks_module, "predict_dataset", record)

    class Data(L.LightningDataModule):
        val_dataset = SimpleNamespace(coco=None)

        def train_dataloader(self):
            return data()

        def val_dataloader(self):
            return data(2)

    def run(extra):
        module = Regression()
        object.__setattr__(module, "model", module)  # what TimedEvaluation evaluates; not a submodule
        module.postprocess, module.category_ids = None, [1]
        recorder = StepWeights()
        callbacks = [recorder, WarmupEMA(decay=0.9, warmup_steps=2), *extra]
        trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, callbacks=callbacks,
                            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                            default_root_dir=tmp_path, limit_val_batches=0)
        trainer.fit(module, datamodule=Data())
        return recorder.after_step

    plain = run([])
    # Marks far below one step's time: an evaluation after each of the three steps (EMA updated first).
    raw = run([TimedEvaluation([1e-7, 2e-7, 3e-7], stop_after_last=True)])
    assert len(evaluated) == 3
    for step in range(3):
        torch.testing.assert_close(evaluated[step], expected_ema(raw[: step + 1]))
    assert not torch.allclose(evaluated[2], raw[2])
    # The swaps are undone: training went on from the raw weights, exactly as without evaluations.
    for ours, reference in zip(raw, plain, strict=True):
        torch.testing.assert_close(ours, reference, rtol=0, atol=0)
