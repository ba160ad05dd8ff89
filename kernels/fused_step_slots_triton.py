"""The per-slot fused step in one Triton launch: each batch row at its own step of its own request (DESIGN.md section 8).

`step_slots_torch`'s update (kernels/fused_step_slots.py), with the noise drawn in-kernel exactly as the engine's
own Triton step draws it for that request alone: Philox keyed by the request's seed, phase = its step + 1 and its
own plane numbering (plane0[b] = the row's index within its request chunk times C, plus the channel), never by the
slot. So a slot row equals `step_triton` run on its request alone; in the interpreter, to the last bit. The per-row
sampler flags are runtime branches (a batch mixes samplers), the coefficients per-row loads; the arithmetic is
the engine's own step kernel's (`_step_part`), so the two cannot drift apart.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fused_step import check_rows
from .fused_step_triton import (_TRITON_DTYPE, _block_and_warps, _check_common, _check_plane_offset, _check_state,
                                _chunk_tiles, _compile, _pair_normals, _step_part, interpreting)


@triton.jit
def _step_slots_kernel(
    x_ptr, eps_hat_ptr, table_ptr, offset_ptr, step_ptr, length_ptr, seed_ptr, plane0_ptr,
    draws_ptr, masked_ptr, x0_form_ptr, history_ptr,
    model_in_ptr, mi_sb, mi_sc, t_in_ptr, mask_ptr, x_init_ptr, x0_prev_ptr, eps1_ptr, eps2_ptr,
    C, HW,
    PAIRED_NOISE: tl.constexpr, BLOCK: tl.constexpr, FAST_MATH: tl.constexpr,
):
    # grid = (B * C planes, cdiv(H * W, BLOCK)), as _step_kernel; slot b = plane // C reads its own row.
    plane = tl.program_id(0)
    pid_hw = tl.program_id(1)
    b = plane // C
    c = plane - b * C
    base = plane.to(tl.int64) * HW
    mi_off = b.to(tl.int64) * mi_sb + c.to(tl.int64) * mi_sc
    hw_lo, hw_hi, k = _chunk_tiles(pid_hw, BLOCK)

    step = tl.load(step_ptr + b)
    T = tl.load(length_ptr + b)
    first = tl.load(offset_ptr + b)
    row = table_ptr + (first + step) * 12
    has_next = step + 1 < T
    nxt = table_ptr + (first + tl.minimum(step + 1, T - 1)) * 12
    c_x, c_e, c_z = tl.load(row + 1), tl.load(row + 2), tl.load(row + 3)
    a_x, a_o, clip = tl.load(row + 7), tl.load(row + 8), tl.load(row + 9)
    b_0, b_h = tl.load(row + 10), tl.load(row + 11)
    r_x, r_z = tl.load(nxt + 4), tl.load(nxt + 5)
    draws = tl.load(draws_ptr + b) != 0
    blend = (tl.load(masked_ptr + b) != 0) & has_next & (tl.load(nxt + 6) != 0)
    x0_form = tl.load(x0_form_ptr + b) != 0
    history = tl.load(history_ptr + b) != 0

    z2_lo = 0.0  # placeholders with paired noise
    z1_lo = 0.0
    z2_hi = 0.0
    z1_hi = 0.0
    if not PAIRED_NOISE:  # drawn whether this slot uses them or not: its flags are runtime values
        z2_lo, z1_lo, z2_hi, z1_hi = _pair_normals(tl.load(seed_ptr + b), tl.load(plane0_ptr + b) + c, k,
                                                   (step + 1).to(tl.uint32), FAST_MATH)
    # A full [B, C, H, W] mask: its plane offset is the state's. No x_out; the flags are this slot's, at runtime.
    _step_part(x_ptr, eps_hat_ptr, model_in_ptr, mi_off, mask_ptr, base, x_init_ptr, x_ptr, eps1_ptr, eps2_ptr,
               x0_prev_ptr, base, hw_lo, HW, z2_lo, z1_lo, c_x, c_e, c_z, r_x, r_z, blend, has_next,
               a_x, a_o, clip, b_0, b_h, True, draws, PAIRED_NOISE, False, x0_form, history)
    _step_part(x_ptr, eps_hat_ptr, model_in_ptr, mi_off, mask_ptr, base, x_init_ptr, x_ptr, eps1_ptr, eps2_ptr,
               x0_prev_ptr, base, hw_hi, HW, z2_hi, z1_hi, c_x, c_e, c_z, r_x, r_z, blend, has_next,
               a_x, a_o, clip, b_0, b_h, True, draws, PAIRED_NOISE, False, x0_form, history)
    t_next = tl.load(nxt)
    tl.store(t_in_ptr + b, t_next.to(t_in_ptr.dtype.element_ty), mask=has_next & (c == 0) & (pid_hw == 0))


@torch.no_grad()
def step_slots_triton(
    x: torch.Tensor,
    eps_hat: torch.Tensor,
    table: torch.Tensor,
    offset: torch.Tensor,
    step: torch.Tensor,
    length: torch.Tensor,
    seed: torch.Tensor,
    plane0: torch.Tensor,
    *,
    draws: torch.Tensor,
    masked: torch.Tensor,
    x0_form: torch.Tensor,
    history: torch.Tensor,
    x0_prev: torch.Tensor,
    model_in: torch.Tensor,
    t_in: torch.Tensor,
    mask: torch.Tensor,
    x_init: torch.Tensor,
    eps1: torch.Tensor | None = None,
    eps2: torch.Tensor | None = None,
    block: int | None = None,
    num_warps: int | None = None,
    fp_fusion: bool = True,
) -> torch.Tensor:
    """Step every slot once in one launch (arguments as `step_slots_torch`, per-row int64 seed and plane0); returns x.

    Noise: Philox keyed by (seed[b], phase step[b] + 1, plane plane0[b] + c), or eps1/eps2 given together
    (paired noise, as step_slots_torch takes it). mask and x_init are full [B, C, H, W] fp32 buffers.
    """
    mi_sb, mi_sc, _, _ = _check_common(x, model_in, t_in, None, None)
    B, C, H, W = x.shape
    _check_plane_offset(0, B * C, H * W)
    _check_state("eps_hat", eps_hat, x, (torch.float32, torch.float16, torch.bfloat16))
    for name, t in (("x0_prev", x0_prev), ("mask", mask), ("x_init", x_init)):
        _check_state(name, t, x)
    check_rows(table)
    if table.device != x.device:
        raise ValueError(f"table must be on {x.device}, got {table.device}")
    for name, t, dtype in (("offset", offset, torch.int64), ("step", step, torch.int64),
                           ("length", length, torch.int64), ("seed", seed, torch.int64),
                           ("plane0", plane0, torch.int64), ("draws", draws, torch.bool),
                           ("masked", masked, torch.bool), ("x0_form", x0_form, torch.bool),
                           ("history", history, torch.bool)):
        if t.shape != (B,) or t.dtype != dtype or t.device != x.device or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous {dtype} [{B}] tensor on {x.device}, got "
                             f"{t.dtype} {list(t.shape)} on {t.device}")
    paired = eps1 is not None or eps2 is not None
    if paired:
        if eps1 is None or eps2 is None:
            raise ValueError("paired noise needs both eps1 and eps2")
        _check_state("eps1", eps1, x)
        _check_state("eps2", eps2, x)
    block, num_warps = _block_and_warps(H * W, block, num_warps)
    _step_slots_kernel[(B * C, triton.cdiv(H * W, block))](
        x, eps_hat, table, offset, step, length, seed, plane0, draws, masked, x0_form, history,
        model_in, mi_sb, mi_sc, t_in, mask, x_init, x0_prev, eps1 if paired else x, eps2 if paired else x,
        C, H * W,
        PAIRED_NOISE=paired, BLOCK=block, FAST_MATH=not interpreting(), num_warps=num_warps,
        enable_fp_fusion=fp_fusion,
    )
    return x


# Integer arguments of 4 slots of 300x300, 1-channel (CARE-SST) tiles: the sizes a launch really passes.
STEP_SLOTS_INTS = {"mi_sb": 2 * 90000, "mi_sc": 90000, "C": 1, "HW": 90000}


def compile_step_slots_kernel(arch: int = 90, *, model_dtype=torch.bfloat16, eps_dtype=torch.float16,
                              paired_noise=False, block=1024, num_warps=4, ints=None, fast_math=True):
    """triton.compile the per-slot step kernel for CUDA sm_<arch> without a GPU (`ints` overrides STEP_SLOTS_INTS)."""
    pointers = {"x_ptr": "*fp32", "eps_hat_ptr": "*" + _TRITON_DTYPE[eps_dtype], "table_ptr": "*fp32",
                "offset_ptr": "*i64", "step_ptr": "*i64", "length_ptr": "*i64", "seed_ptr": "*i64",
                "plane0_ptr": "*i64", "draws_ptr": "*i1", "masked_ptr": "*i1", "x0_form_ptr": "*i1",
                "history_ptr": "*i1", "model_in_ptr": "*" + _TRITON_DTYPE[model_dtype],
                "t_in_ptr": "*" + _TRITON_DTYPE[model_dtype], "mask_ptr": "*fp32", "x_init_ptr": "*fp32",
                "x0_prev_ptr": "*fp32", "eps1_ptr": "*fp32", "eps2_ptr": "*fp32"}
    constexprs = {"PAIRED_NOISE": paired_noise, "BLOCK": block, "FAST_MATH": fast_math}
    return _compile(_step_slots_kernel, pointers, {**STEP_SLOTS_INTS, **(ints or {})}, constexprs, arch, num_warps)
