"""The Triton deformable attention kernels, checked without a GPU.

- Triton's interpreter (`TRITON_INTERPRET=1`) runs the kernels on CPU tensors; the variable must be
  set before Triton is imported, so those checks run in a fresh Python process.
- The real compiler builds the kernels for an sm_90 target (Triton ships `ptxas`), which catches what
  the interpreter accepts but the compiler rejects.
- On a machine with CUDA, the kernels are compared with the reference on the device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed: the Triton kernels cannot be checked")

INTERPRETED_CHECK = textwrap.dedent(
    """
    import json
    import torch
    from detr_lab.models.attention.kernels import ms_deform_attn_core

    generator = torch.Generator().manual_seed(0)
    shapes = torch.tensor([[5, 7], [1, 2]])
    sizes = shapes[:, 0] * shapes[:, 1]
    starts = torch.cat((sizes.new_zeros(1), sizes.cumsum(0)[:-1]))
    batch, queries, heads, head_dim, points = 2, 5, 2, 3, 2
    value = torch.randn(batch, int(sizes.sum()), heads, head_dim, generator=generator)
    locations = torch.rand(batch, queries, heads, 2, points, 2, generator=generator) * 1.6 - 0.3
    locations[0, 0, 0, 0, 0] = torch.tensor([-7.0, 0.5])
    locations[1, 1, 1, 1, 1] = torch.tensor([0.5, 1e9])
    weights = torch.rand(batch, queries, heads, 2, points, generator=generator)
    grad_output = torch.randn(batch, queries, heads * head_dim, generator=generator)

    def run(impl, value):
        inputs = [t.clone().requires_grad_() for t in (value, locations, weights)]
        out = ms_deform_attn_core(inputs[0], shapes, starts, inputs[1], inputs[2], impl=impl)
        out.backward(grad_output)
        return out.detach().float(), *(t.grad.float() for t in inputs), out.dtype, inputs[0].grad.dtype

    reference = run("reference", value)
    result = {}
    for name, dtype in (("float32", torch.float32), ("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        *tensors, out_dtype, grad_dtype = run("triton", value.to(dtype))
        result[name] = {
            "errors": [(a - b).abs().max().item() for a, b in zip(tensors, reference[:4])],
            "scales": [b.abs().max().item() for b in reference[:4]],
            "dtypes": [str(out_dtype), str(grad_dtype)],
        }
    print(json.dumps(result))
    """
)


@pytest.fixture(scope="module")
def interpreted_results() -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", INTERPRETED_CHECK], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"interpreted Triton check failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # Triton interpreter in a subprocess
def test_interpreted_kernels_match_reference_float32(interpreted_results):
    result = interpreted_results["float32"]
    names = ("output", "grad value", "grad locations", "grad weights")
    for name, error, scale in zip(names, result["errors"], result["scales"], strict=True):
        assert error <= 1e-5 * max(1.0, scale), f"{name}: max error {error} (scale {scale})"
    assert result["dtypes"] == ["torch.float32", "torch.float32"]


@pytest.mark.slow  # Triton interpreter in a subprocess
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_interpreted_kernels_accept_half_precision_values(interpreted_results, dtype):
    result = interpreted_results[dtype]
    # Only the value is rounded to half precision (accumulation is float32): loose agreement.
    tolerance = {"float16": 0.01, "bfloat16": 0.05}[dtype]
    names = ("output", "grad value", "grad locations", "grad weights")
    for name, error, scale in zip(names, result["errors"], result["scales"], strict=True):
        assert error <= tolerance * max(1.0, scale), f"{name}: max error {error} (scale {scale})"
    assert result["dtypes"] == [f"torch.{dtype}", f"torch.{dtype}"]


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """Compile both kernels (float32 forward, bfloat16 backward) to a cubin for an H100 target."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from detr_lab.models.attention.kernels import triton_ms_deform as kernels

    constants = {"HEADS": 8, "HEAD_DIM": 32, "LEVELS": 4, "POINTS": 4, "BLOCK_Q": 64, "BLOCK_D": 32}
    shared = {"shapes_ptr": "*i64", "starts_ptr": "*i64", "loc_ptr": "*fp32", "attn_ptr": "*fp32"}
    sizes = {"num_queries": "i32", "length": "i32"}
    forward = {"value_ptr": "*fp32", **shared, "out_ptr": "*fp32", **sizes}
    backward = {
        "value_ptr": "*bf16",
        **shared,
        "grad_out_ptr": "*bf16",
        "grad_value_ptr": "*fp32",
        "grad_loc_ptr": "*fp32",
        "grad_attn_ptr": "*fp32",
        **sizes,
    }
    for kernel, signature in ((kernels._forward_kernel, forward), (kernels._backward_kernel, backward)):
        signature = {**signature, **dict.fromkeys(constants, "constexpr")}
        source = ASTSource(fn=kernel, signature=signature, constexprs=constants)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        assert compiled.asm["cubin"], f"{kernel.fn.__name__}: no cubin"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_kernels_match_reference(dtype):
    from detr_lab.models.attention.kernels import ms_deform_attn_core

    torch.manual_seed(0)
    device = torch.device("cuda")
    shapes = torch.tensor([[20, 27], [10, 14], [5, 7], [3, 4]], device=device)
    sizes = shapes[:, 0] * shapes[:, 1]
    starts = torch.cat((sizes.new_zeros(1), sizes.cumsum(0)[:-1]))
    value = torch.randn(2, int(sizes.sum()), 8, 32, device=device)
    locations = torch.rand(2, 50, 8, 4, 4, 2, device=device) * 1.4 - 0.2
    weights = torch.rand(2, 50, 8, 4, 4, device=device)
    grad_output = torch.randn(2, 50, 256, device=device)
    results = {}
    for impl, val in (("reference", value), ("triton", value.to(dtype))):
        inputs = [t.clone().requires_grad_() for t in (val, locations, weights)]
        out = ms_deform_attn_core(inputs[0], shapes, starts, inputs[1], inputs[2], impl=impl)
        out.backward(grad_output.to(out.dtype))
        results[impl] = [out.float(), *(t.grad.float() for t in inputs)]
    tolerance = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    for ours, ref in zip(results["triton"], results["reference"], strict=True):
        assert (ours - ref).abs().max() <= tolerance * max(1.0, ref.abs().max().item())
