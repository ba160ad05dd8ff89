"""ddpm_engine.kernels: the fused sampler step (DESIGN.md section 4).

Buffers are owned by the caller (the Runner) and written in place:
  x        fp32 [B, C, H, W]         the sampler state (stays fp32 whatever the model dtype)
  model_in [B, C + C_bg, H, W]       the U-Net input in its dtype (fp32/fp16/bf16); only channels [:C] are written
  t_in     fp32 [B]                  the U-Net time input
  eps_hat  [B, C, H, W]              the U-Net output (fp32/fp16/bf16)
  rows     fp32 [T, 12]              StepTable.rows on x's device (the x0-form columns zero in the seed's tables)
  step     int64 [1] device tensor   the step index i, read by the kernel (the runner does step.add_(1) after it)
  seed     int64 [1] device tensor   the Philox key
  mask     [1|B, 1|C, H, W] fp32     optional, 1 = generate, 0 = known; x_init fp32 [B, C, H, W] with it
  x_out    fp32 [B, C, H, W]         optional: receives the un-blended x_{i+1} (intermediates / final output)
  x0_prev  fp32 [B, C, H, W]         the x0 history of multistep samplers (StepTable.history), read then overwritten
  x0_form  bool                      StepTable.x0_form: compute x0_hat (a compile-time flag for the kernel)

Specification (kernels/fused_step.py; plain torch, noises as tensors, CPU or CUDA; `step` may be a Python int
or a device tensor; with a mask, eps1 may be None only on steps that do not blend):
  initial_torch(x, rows, eps0, eps1=None, *, model_in, t_in, mask=None, x_init=None, init_image=None) -> x
  step_torch(x, eps_hat, rows, step, eps2=None, eps1=None, *, model_in, t_in, mask=None, x_init=None,
             x_out=None, x0_form=False, x0_prev=None) -> x
Triton (kernels/fused_step_triton.py; one launch each; noise from in-kernel Philox keyed by (seed, phase,
plane, element pair), phase 0 = initial, i + 1 = step i, plane = plane_offset + b * C + c; pass eps* tensors
instead for the PAIRED_NOISE parity mode; fp_fusion=False for bit parity with torch on GPUs):
  initial_triton(x, rows, seed, *, model_in, t_in, mask=None, x_init=None, init_image=None,
                 eps0=None, eps1=None, plane_offset=0, block=None, num_warps=None, fp_fusion=True) -> x
  step_triton(x, eps_hat, rows, step, seed, *, model_in, t_in, mask=None, x_init=None, x_out=None,
              draws_step_noise=True, eps1=None, eps2=None, x0_form=False, x0_prev=None, plane_offset=0,
              block=None, num_warps=None, fp_fusion=True) -> x
  philox_noise(seed, phase, shape, *, plane_offset=0) -> (a, b)   # the kernels' draws, for tests
  (phase 0: a = eps0, b = eps1 of step 0; phase i + 1: a = eps2 of step i, b = eps1 of step i + 1)
  compile_step_kernel(90, ...), compile_initial_kernel(90, ...), compile_noise_kernel(90, ...): ahead-of-time
  sm_90 builds, no GPU needed, with integer arguments specialised as the JIT does (ints={...})
Per-slot step (DESIGN.md section 8; each batch row at its own step of its own request's table):
  step_slots_torch (kernels/fused_step_slots.py), the specification, host noise as tensors;
  step_slots_triton (kernels/fused_step_slots_triton.py), one launch, each row's noise drawn in-kernel keyed by
  its request's seed, its step and its own planes (seed[b], plane0[b]); compile_step_slots_kernel(90, ...)
Triton is optional: HAS_TRITON says whether the Triton half imported. On CPU set TRITON_INTERPRET=1 before
triton is first imported to run the kernels in the interpreter (tests do).
"""
from .fused_step import initial_torch, step_torch

try:
    from .fused_step_triton import initial_triton, philox_noise, step_triton

    HAS_TRITON = True
except ImportError:  # triton is an optional dependency
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "initial_torch", "step_torch"] + (
    ["initial_triton", "philox_noise", "step_triton"] if HAS_TRITON else [])
