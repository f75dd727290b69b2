"""`trainer.precision: bf16-mixed` trains every member on the CPU (the model under bf16 autocast, the
matcher's costs in float32), and `model.compile: true` trains a compiled detector."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from tiny_members import MEMBERS, fit_steps, member_config, member_module
from torch._dynamo.utils import counters

from detr_lab.models import matcher as matcher_module


class Record(L.Callback):
    """The dtypes the detector's outputs and the matcher's solver see, and the losses, in training."""

    def __init__(self, module) -> None:
        self.logits_dtypes: list[torch.dtype] = []
        self.losses: list[float] = []
        module.model.register_forward_hook(self._outputs)

    def _outputs(self, module, args, outputs) -> None:
        if module.training:
            self.logits_dtypes.append(outputs["pred_logits"].dtype)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


@pytest.mark.slow  # a tiny model of each member trains two steps through Lightning
@pytest.mark.parametrize("member", sorted(MEMBERS))
def test_bf16_mixed_trains_every_member_with_float32_matching(member, monkeypatch):
    solved: list[str] = []
    solve = matcher_module.linear_sum_assignment

    def recording_solver(cost):
        solved.append(str(cost.dtype))
        return solve(cost)

    monkeypatch.setattr(matcher_module, "linear_sum_assignment", recording_solver)
    module = member_module(member_config(member, "trainer.precision=bf16-mixed"))
    before = {name: p.detach().clone() for name, p in module.model.named_parameters() if p.requires_grad}
    record = Record(module)
    trainer = fit_steps(module, 2, [record], precision=module.cfg.trainer.precision)
    assert trainer.global_step == 2
    assert record.logits_dtypes and set(record.logits_dtypes) == {torch.bfloat16}  # autocast was on
    assert solved and set(solved) == {"float32"}
    assert all(torch.isfinite(torch.tensor(loss)) for loss in record.losses) and len(record.losses) == 2
    changed = [name for name, p in module.model.named_parameters() if name in before
               and not torch.equal(p.detach(), before[name])]
    assert len(changed) > len(before) // 2  # the optimizer stepped (weights stay float32)
    assert all(p.dtype == torch.float32 for p in module.model.parameters())


@pytest.mark.slow  # torch.compile of a tiny DETR, then two training steps
def test_model_compile_trains_the_compiled_detector(monkeypatch):
    # Dynamo's capture and AOTAutograd's joint graph as `model.compile: true` runs them, without
    # inductor's C++ code generation (minutes on a busy 2-core CI machine; measured in the README).
    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(
        torch.nn.Module, "compile", lambda self, **options: compile_module(self, backend="aot_eager")
    )
    module = member_module(member_config("detr", "model.compile=true"))
    eager_keys = set(member_module(member_config("detr")).state_dict())
    assert set(module.state_dict()) == eager_keys  # checkpoints keep the eager names
    torch._dynamo.reset()
    before = {name: p.detach().clone() for name, p in module.model.named_parameters()}
    trainer = fit_steps(module, 2)
    assert trainer.global_step == 2
    assert module.model._compiled_call_impl is not None  # nn.Module.compile wraps the forward
    assert counters["stats"]["unique_graphs"] >= 1  # and dynamo compiled graphs of it
    assert any(not torch.equal(p.detach(), before[name]) for name, p in module.model.named_parameters())
