"""Where the time of a training step goes (the library behind tools/profile_train_step.py).

A step is timed two ways on one fixed batch (random images `[B, 3, H, W]`, no padding, random targets
with boxes in normalized cxcywh), in the same process:

- **by hand** (`profile_manual_steps`): `zero_grad`, the forward pass (split into the detector's parts
  as `tools/benchmark.py --breakdown` splits inference: backbone, neck, encoder attention and
  feed-forward blocks, decoder, other), the set criterion (split into the Hungarian matcher, every
  loss term, and the rest: box normalizer, denoising groups, dict bookkeeping), the weighted sum,
  `backward`, gradient clipping (`optim.clip_grad_norm`) and the AdamW step, each timed with a
  synchronize before and after;
- **through Lightning** (`lightning_step_times`): `DetectionModule` fitted by `build_trainer`'s Trainer
  (the standard callbacks, `StepSeeds`, the CSV logger, no progress bar, no validation, no checkpoint
  during the timed steps) on a loader that yields the same batch. A callback times each step from
  Lightning's `on_train_batch_start` to `on_train_batch_end` (training_step, backward, clipping,
  optimizer and scheduler, callbacks). Its difference from the hand-timed step bounds the Lightning
  loop's and the run callbacks' cost only roughly: the two are separate runs, and on a 2-core CPU
  their medians differ by hundreds of ms from one run to the next.

The hooks add two synchronizations per timed part (free on the CPU); the criterion's parts are timed
by wrapping the matcher's forward and each `LOSS_TERMS` entry's function for the duration of the call.
All times are wall-clock seconds, medians over `steps` steps after `warmup` untimed ones.
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch
from torch import Tensor, nn

from detr_lab.benchmark.detectors import breakdown_modules, random_batch, random_targets
from detr_lab.config import Config
from detr_lab.engine.module import DetectionModule
from detr_lab.engine.optim import build_optimizer
from detr_lab.engine.resume_checks import StepSeeds
from detr_lab.engine.trainer import build_trainer
from detr_lab.timer import synchronize

Batch = tuple[Tensor, Tensor, list[dict[str, Tensor]]]


def fixed_batch(cfg: Config, batch_size: int, height: int, width: int, *, objects: int = 5,
                device: torch.device | str = "cpu", seed: int = 0) -> Batch:
    """(images `[B, 3, H, W]`, padding mask `[B, H, W]` all False, targets with `objects` boxes each)."""
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    images, mask = random_batch(batch_size, height, width, device, generator)
    targets = random_targets(batch_size, height, width, num_classes=cfg.model.num_classes,
                             objects_per_image=objects, device=device, generator=generator)
    return images, mask, targets


class PhaseClock:
    """Seconds per phase name, summed over the calls of one step."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self.seconds[name] += time.perf_counter() - start

    def timed(self, name: str, fn: Callable) -> Callable:
        def call(*args, **kwargs):
            with self.phase(name):
                return fn(*args, **kwargs)

        return call


@contextmanager
def _timed_parts(module: DetectionModule, clock: PhaseClock) -> Iterator[None]:
    """Time the detector's parts, the matcher and each loss term into `clock` inside the block."""
    handles = []
    for name, modules in breakdown_modules(module.model).items():
        for part in modules:
            starts: list[float] = []

            def pre(_module, _args, starts=starts):
                synchronize(clock.device)
                starts.append(time.perf_counter())

            def post(_module, _args, _output, starts=starts, name=name):
                synchronize(clock.device)
                clock.seconds[f"forward/{name}"] += time.perf_counter() - starts.pop()

            handles += [part.register_forward_pre_hook(pre), part.register_forward_hook(post)]
    criterion = module.criterion
    terms = criterion.loss_terms
    criterion.loss_terms = {name: dataclasses.replace(term, fn=clock.timed(f"loss/{name}", term.fn))
                            for name, term in terms.items()}
    matcher_forward = criterion.matcher.forward
    criterion.matcher.forward = clock.timed("loss/matcher", matcher_forward)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        criterion.loss_terms = terms
        del criterion.matcher.forward  # back to the class's method


def profile_manual_steps(
    module: DetectionModule, batch: Batch, *, steps: int, warmup: int
) -> dict[str, float]:
    """Median seconds per phase of a hand-written training step (see the module docstring); "total" is
    the whole step, "forward/other" and "loss/other" the parts of the forward pass and the criterion
    that no named phase covers."""
    images, mask, targets = batch
    device = images.device
    model, criterion = module.model.train(), module.criterion.train()
    optimizer = build_optimizer(model, module.cfg.optim)
    clip = module.cfg.optim.clip_grad_norm
    records: list[dict[str, float]] = []
    for index in range(warmup + steps):
        clock = PhaseClock(device)
        with _timed_parts(module, clock), clock.phase("total"):
            with clock.phase("zero_grad"):
                optimizer.zero_grad(set_to_none=True)
            with clock.phase("forward"):
                outputs = model(images, mask, targets=targets)
            with clock.phase("loss"):
                total = criterion.total_loss(criterion(outputs, targets))
            with clock.phase("backward"):
                total.backward()
            with clock.phase("clip_grad_norm"):
                if clip > 0:
                    nn.utils.clip_grad_norm_(model.parameters(), clip)
            with clock.phase("optimizer_step"):
                optimizer.step()
        if index >= warmup:
            records.append(dict(clock.seconds))
    names = sorted({name for record in records for name in record})
    result = {name: statistics.median(record.get(name, 0.0) for record in records) for name in names}
    if "forward/enc_attn" in result:  # the attention modules hold their linear layers: time the rest apart
        linear = result.get("forward/enc_attn_linear", 0.0)
        result["forward/enc_attn_core"] = result.pop("forward/enc_attn") - linear
    named_forward = sum(v for k, v in result.items() if k.startswith("forward/"))
    result["forward/other"] = result["forward"] - named_forward
    named_loss = sum(v for k, v in result.items() if k.startswith("loss/") and k != "loss/other")
    result["loss/other"] = result["loss"] - named_loss
    return {name: round(value, 6) for name, value in result.items()}


class _StepTimes(L.Callback):
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        synchronize(self.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        synchronize(self.device)
        self.seconds.append(time.perf_counter() - self._start)


class _Repeat(torch.utils.data.IterableDataset):
    def __init__(self, batch: Batch, count: int) -> None:
        self.batch, self.count = batch, count

    def __iter__(self):
        return iter([self.batch] * self.count)


def lightning_step_times(module: DetectionModule, batch: Batch, *, steps: int, warmup: int) -> list[float]:
    """Seconds of each of `steps` training steps fitted by Lightning after `warmup` (see the module
    docstring); the run's folder is temporary, and `module.cfg` is given back unchanged."""
    device = batch[0].device
    with tempfile.TemporaryDirectory(prefix="profile_train_step_") as folder:
        trainer_cfg = dataclasses.replace(
            module.cfg.trainer, output_dir=str(Path(folder)), max_epochs=1, max_steps=warmup + steps,
            max_time_minutes=0.0, loggers=["csv"], summary=False, save_every_n_steps=0,
            accelerator="cpu" if device.type == "cpu" else module.cfg.trainer.accelerator, devices="1",
        )
        original = module.cfg
        module.cfg = dataclasses.replace(original, trainer=trainer_cfg)
        timer = _StepTimes(device)
        callbacks = [StepSeeds(trainer_cfg.seed), timer]
        try:
            trainer = build_trainer(module.cfg, callbacks=callbacks, progress_bar=False)
            loader = torch.utils.data.DataLoader(_Repeat(batch, warmup + steps), batch_size=None)
            trainer.fit(module, train_dataloaders=loader)
        finally:
            module.cfg = original
    return timer.seconds[warmup:]
