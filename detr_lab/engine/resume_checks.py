"""What makes a resumed run train exactly what the uninterrupted run would, and what it refuses.

`StepSeeds` derives the global torch generator's state from (seed, epoch, batch index, rank) before
every training batch, so dropout, DINO's denoising noise and any other draw a training step makes
from the global generator (`torch.rand`, `torch.randint`, `nn.Dropout`) depend on where the run is,
not on what ran before in the process (validation rounds, a restart). The data pipeline draws from
its own (seed, epoch, index) streams already (`detr_lab.data.samplers`, `collate`, `mixup`).

`RefuseInexactResume` stops a resume whose saved state cannot be carried over, before any of it is
restored, with a `ConfigError` naming the key and the way out:
- other optimizer parameter groups (`optim.lr_backbone` 0 <-> > 0 freezes or trains the backbone,
  a new `optim.lr_multipliers` or `optim.no_decay_keys` key splits a group): AdamW's moments
  belong to the groups they were saved with;
- another `data.batch_size` (or another number of processes) in mid-epoch: the saved loader position
  counts batches of the old size, so images of that epoch would be skipped or repeated;
- another `data.train_batching` in mid-epoch (the rest of the epoch would be other batches); a
  checkpoint saved before the key existed was trained with `padded` batches.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from detr_lab.checkpoints.formats import LIGHTNING_META_KEY
from detr_lab.config import ConfigError
from detr_lab.engine.optim import build_param_groups

_STEP_STREAM = 0x5EED  # spawn key of the training-step stream (the data streams use their own)
WORLD_SIZE_KEY = "world_size"  # in the checkpoint's detr_lab metadata, beside the config


def step_seed(seed: int, epoch: int, batch_idx: int, rank: int = 0) -> int:
    """The global generator's seed for training batch `batch_idx` of `epoch` on process `rank`: a
    63-bit integer drawn from numpy's `SeedSequence` of those numbers (distinct for each of them)."""
    entropy = [int(seed) % 2**32, int(epoch), int(batch_idx), int(rank)]
    state = np.random.SeedSequence(entropy, spawn_key=(_STEP_STREAM,)).generate_state(1, np.uint64)
    return int(state[0]) >> 1


class StepSeeds(Callback):
    """Before every training batch, seed torch's global generator (CPU and every CUDA device) with
    `step_seed(seed, epoch, batch_idx, global_rank)`. Ranks draw different dropout masks and noise."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int):
        torch.manual_seed(step_seed(self.seed, trainer.current_epoch, batch_idx, trainer.global_rank))


def _group_signature(groups: Sequence[dict]) -> dict[str, object]:
    """group name -> its parameter names (or, for checkpoints saved without them, their count)."""
    signature: dict[str, object] = {}
    for group in groups:
        names = group.get("param_names")
        signature[str(group.get("name"))] = tuple(names) if names else len(group["params"])
    return signature


def _same_groups(saved: dict[str, object], wanted: dict[str, object]) -> bool:
    if sorted(saved) != sorted(wanted):
        return False
    for name, members in saved.items():
        other = wanted[name]
        if isinstance(members, int) or isinstance(other, int):  # counts only
            count = members if isinstance(members, int) else len(members)
            if count != (other if isinstance(other, int) else len(other)):
                return False
        elif members != other:
            return False
    return True


def _changed_group_keys(saved_optim: dict, optim) -> list[str]:
    """'key: saved -> now' for the `optim` keys that decide the parameter groups and changed."""
    changes = []
    was_lr = float(saved_optim.get("lr_backbone", optim.lr_backbone))
    if (was_lr == 0) != (optim.lr_backbone == 0):
        changes.append(f"'optim.lr_backbone' {was_lr:g} -> {optim.lr_backbone:g}")
    for key in ("lr_multipliers", "no_decay_keys"):
        before = sorted(saved_optim.get(key) or [])
        now = sorted(getattr(optim, key) or [])
        if before != now:
            added, removed = sorted(set(now) - set(before)), sorted(set(before) - set(now))
            parts = ([f"added {added}"] if added else []) + ([f"removed {removed}"] if removed else [])
            changes.append(f"'optim.{key}' {', '.join(parts)}")
    return changes


def effective_train_batching(data) -> str:
    """How a run's training batches were drawn: its `data.train_batching` ("padded" for a saved config
    from before the key, the default then), or "padded" under the fixed-size `rtdetr` policy, which
    groups nothing. `data` is a `DataConfig` or a saved config's `data` dict."""
    get = data.get if isinstance(data, dict) else lambda key, default: getattr(data, key, default)
    augment = get("augment", None) or {}
    policy = augment.get("policy", "detr") if isinstance(augment, dict) else augment.policy
    return "padded" if policy == "rtdetr" else str(get("train_batching", "padded"))


def _mid_epoch(checkpoint: dict) -> tuple[bool, int, int]:
    """(taken inside an epoch with batches left, batches done in it, the epoch) from the loop state."""
    fit_loop = checkpoint.get("loops", {}).get("fit_loop", {})
    batches = fit_loop.get("epoch_loop.batch_progress", {})
    done = int(batches.get("current", {}).get("ready", 0))
    epoch = int(fit_loop.get("epoch_progress", {}).get("current", {}).get("processed", 0))
    return done > 0 and not batches.get("is_last_batch", False), done, epoch


class RefuseInexactResume(Callback):
    """On resume, raise `ConfigError` (before the optimizer state or loader position is restored) where
    the run could not continue exactly; see the module docstring. Checkpoints without detr_lab
    metadata are checked for parameter groups only."""

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        meta = checkpoint.get(LIGHTNING_META_KEY)
        saved_cfg = meta.get("config", {}) if isinstance(meta, dict) else {}
        source = trainer.ckpt_path or "the checkpoint"
        self._check_groups(pl_module, checkpoint, saved_cfg.get("optim") or {}, source)
        self._check_batches(trainer, pl_module, checkpoint, saved_cfg, meta or {}, source)

    @staticmethod
    def _check_groups(pl_module, checkpoint: dict, saved_optim: dict, source) -> None:
        states = checkpoint.get("optimizer_states") or []
        if not states or any("name" not in group for group in states[0].get("param_groups", [{}])):
            return  # not saved by detr_lab's optimizer: torch's own check applies
        optim = pl_module.cfg.optim
        saved = _group_signature(states[0]["param_groups"])
        wanted = _group_signature(build_param_groups(pl_module.model, optim))
        if _same_groups(saved, wanted):
            return
        changes = _changed_group_keys(saved_optim, optim)
        what = "; ".join(changes) if changes else "the model's trainable parameters changed"
        raise ConfigError(
            f"cannot resume {source} exactly: {what}, so the optimizer's parameter groups differ (saved "
            f"{sorted(saved)}, now {sorted(wanted)}) and AdamW's state cannot follow; set the key back to "
            f"resume, or start a new run from these weights: --init-from {source} with a new "
            "trainer.output_dir"
        )

    @staticmethod
    def _check_batches(trainer, pl_module, checkpoint: dict, saved_cfg: dict, meta: dict, source) -> None:
        inside, done, epoch = _mid_epoch(checkpoint)
        if not inside:
            return
        was = (saved_cfg.get("data") or {}).get("batch_size")
        now = pl_module.cfg.data.batch_size
        way_out = ("; resume with the saved value to finish the epoch (a checkpoint taken at an epoch's end "
                   "resumes with any value), or start a new run from these weights: --init-from "
                   f"{source} with a new trainer.output_dir")
        if was is not None and int(was) != int(now):
            raise ConfigError(
                f"cannot resume {source} with 'data.batch_size: {now}': it was taken after {done} batches "
                f"of {was} images in epoch {epoch}, and the rest of that epoch cannot be counted in batches "
                f"of {now} without skipping or repeating images{way_out} (data.batch_size={was})"
            )
        saved_data = saved_cfg.get("data") or {}
        was_batching = effective_train_batching(saved_data)
        now_batching = effective_train_batching(pl_module.cfg.data)
        if saved_data and was_batching != now_batching:
            raise ConfigError(
                f"cannot resume {source} with 'data.train_batching: {now_batching}': it was taken after "
                f"{done} batches of epoch {epoch} drawn with '{was_batching}' batching, and the rest of that "
                f"epoch would be other batches{way_out} (data.train_batching={was_batching})"
            )
        saved_world = meta.get(WORLD_SIZE_KEY)
        if saved_world is not None and int(saved_world) != trainer.world_size:
            raise ConfigError(
                f"cannot resume {source} on {trainer.world_size} processes ('trainer.devices' x "
                f"'trainer.num_nodes'): it was taken after {done} batches per process of {saved_world} "
                f"processes in epoch {epoch}{way_out}"
            )
