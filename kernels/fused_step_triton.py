"""The fused sampler step as one Triton kernel launch (DESIGN.md section 4); `step_torch` is its specification.

Noise: Philox-4x32-10 (Salmon et al. 2011, via `tl.philox`), key = the 64-bit seed, one counter per
pair of elements of an H x W plane: pair k = 512 q + j holds elements hw = 1024 q + j and 1024 q + 512 + j
(j < 512; the two halves of each aligned 1024-element chunk, so a program handles whole pairs without
moving values between threads), and

    counter = (k, plane low word, phase, plane high word)

plane = plane_offset + b * C + c (int64), phase = 0 for the initial step and i + 1 for step i. The
four words of a block feed two Box-Muller transforms, (w0, w1) for the low element and (w2, w3) for the
high one; each gives draw "a" = r cos(theta) and draw "b" = r sin(theta), independent N(0, 1):

    phase 0     (initial_triton): a = eps0 (x_T),          b = eps1 of the step-0 blend
    phase i + 1 (step_triton i):  a = eps2 (step i noise), b = eps1 of the step-(i+1) blend

No two draws share a counter for H * W < 2^33, up to 2^64 planes and 2^32 - 1 steps, and no counter is
ever multiplied out (no step * numel product exists, pointer offsets are int64). The draws do not
depend on BLOCK, the grid or the device; GPUs use the approximate log/sin/cos instructions, the
interpreter numpy's, so interpreter draws match GPU draws to ~1e-6, not bit for bit. `philox_noise`
returns the same draws as tensors for statistics tests and for checking the kernels against `step_torch`.

On CPU the kernels run under the Triton interpreter: set TRITON_INTERPRET=1 before triton is first
imported (the @triton.jit decorator reads it at import time).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ddpm_engine.engine.samplers import (COL_AO, COL_AX, COL_B0, COL_BH, COL_BLEND, COL_CE, COL_CLIP, COL_CX, COL_CZ,
                                         COL_RX, COL_RZ, COL_T, NUM_COLS)

from .fused_step import check_rows

MAX_STEPS = 2**32 - 1  # the phase is one 32-bit counter word
MAX_PLANE_SIZE = 2**31 - 1  # H * W: a 32-bit kernel argument (pair index k < 2^30 < 2^32)
CHUNK_SIZE = 1024  # elements hw and hw + 512 of each aligned 1024-element chunk of a plane share a Philox block
CHUNK = tl.constexpr(CHUNK_SIZE)
HALF = tl.constexpr(CHUNK_SIZE // 2)

# The kernels index a row with these literal offsets (jit code reads only constexpr globals).
assert (COL_T, COL_CX, COL_CE, COL_CZ, COL_RX, COL_RZ, COL_BLEND, COL_AX, COL_AO, COL_CLIP, COL_B0, COL_BH,
        NUM_COLS) == tuple(range(13))


@triton.jit
def _box_muller(w0, w1, FAST_MATH: tl.constexpr):
    """(r cos(theta), r sin(theta)) from two uniform words: two independent N(0, 1) for one log, sqrt, sin/cos.

    theta is taken in [-pi, pi), where the GPU's approximate sin/cos (FAST_MATH: MUFU, abs. error ~1e-6) are
    accurate; libdevice's precise versions cost ~8x the instructions (and are what the interpreter has).
    """
    u1 = tl.maximum(1.0e-7, tl.uint_to_uniform_float(w0))
    theta = 6.283185307179586 * (tl.uint_to_uniform_float(w1) - 0.5)
    if FAST_MATH:
        r = tl.sqrt(-2.0 * libdevice.fast_logf(u1))
        return r * libdevice.fast_cosf(theta), r * libdevice.fast_sinf(theta)
    else:
        r = tl.sqrt(-2.0 * tl.log(u1))
        return r * tl.cos(theta), r * tl.sin(theta)


@triton.jit
def _pair_normals(seed, plane, k, phase, FAST_MATH: tl.constexpr):
    """For element-pair indices k of int64 `plane` at uint32 `phase`: (a, b) of the low and of the high elements."""
    k = k.to(tl.uint32)
    zero = k * 0
    plane_lo = (plane & 0xFFFFFFFF).to(tl.uint32)
    plane_hi = (plane >> 32).to(tl.uint32)
    w0, w1, w2, w3 = tl.philox(seed, k, zero + plane_lo, zero + phase, zero + plane_hi)
    a_lo, b_lo = _box_muller(w0, w1, FAST_MATH)
    a_hi, b_hi = _box_muller(w2, w3, FAST_MATH)
    return a_lo, b_lo, a_hi, b_hi


@triton.jit
def _chunk_tiles(pid_hw, BLOCK: tl.constexpr):
    """hw of the low and high halves of this program's CHUNK-element chunks, and their pair indices ([n, HALF] each)."""
    n: tl.constexpr = BLOCK // CHUNK
    chunk = pid_hw * n + tl.arange(0, n)[:, None]
    j = tl.arange(0, HALF)[None, :]
    hw_lo = chunk * CHUNK + j
    return hw_lo, hw_lo + HALF, chunk * HALF + j


@triton.jit
def _to_model_dtype(v, DT: tl.constexpr):
    """fp32 -> the model dtype, round-to-nearest-even like torch (bf16 by bits: the interpreter's bf16 cast truncates)."""
    if DT == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + ((bits >> 16) & 1) + 0x7FFF
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(DT)


@triton.jit
def _step_part(
    x_ptr, eps_hat_ptr, model_in_ptr, mi_off, mask_ptr, m_off, x_init_ptr, x_out_ptr, eps1_ptr, eps2_ptr, x0_prev_ptr,
    base, hw, HW, z2, z1, c_x, c_e, c_z, r_x, r_z, blend, has_next, a_x, a_o, clip, b_0, b_h,
    HAS_MASK: tl.constexpr, HAS_NOISE, PAIRED_NOISE: tl.constexpr, HAS_OUT: tl.constexpr, HAS_X0, HAS_HIST,
):
    """Step i for the elements `hw` of one plane (int64 element offset `base`); z2, z1: Philox draws or unused.

    HAS_NOISE, HAS_X0 and HAS_HIST are compile-time flags from _step_kernel and per-slot runtime flags from
    the slots' kernel (fused_step_slots_triton): the same arithmetic either way.
    """
    inb = hw < HW
    idx = base + hw
    x = tl.load(x_ptr + idx, mask=inb, other=0.0)
    e = tl.load(eps_hat_ptr + idx, mask=inb, other=0.0).to(tl.float32)
    x_next = c_x * x + c_e * e
    if HAS_X0:  # the x0-form columns (DESIGN 3b); compiled out for the seed's tables
        x0 = a_x * x + a_o * e
        x0 = tl.where(clip > 0, tl.minimum(tl.maximum(x0, -clip), clip), x0)
        x_next = x_next + b_0 * x0
        if HAS_HIST:
            x_next = x_next + b_h * tl.load(x0_prev_ptr + idx, mask=inb, other=0.0)
            tl.store(x0_prev_ptr + idx, x0, mask=inb)
    if HAS_NOISE:  # a branch, not a zero coefficient: `+ 0.0` would turn -0.0 into +0.0, unlike the spec
        if PAIRED_NOISE:  # new names in branches: rebinding z2 or z1 inside a runtime branch would change its type
            n2 = tl.load(eps2_ptr + idx, mask=inb, other=0.0)
        else:
            n2 = z2
        x_next = x_next + c_z * n2
    if HAS_OUT:
        tl.store(x_out_ptr + idx, x_next, mask=inb)
    xn = x_next
    if HAS_MASK:
        if blend:  # a runtime branch: no mask, x_init (or paired eps1) reads where step i + 1 does not blend
            m = tl.load(mask_ptr + m_off + hw, mask=inb, other=0.0).to(tl.float32)
            xi = tl.load(x_init_ptr + idx, mask=inb, other=0.0).to(tl.float32)
            if PAIRED_NOISE:
                n1 = tl.load(eps1_ptr + idx, mask=inb, other=0.0)
            else:
                n1 = z1
            known = r_x * xi + r_z * n1
            xn = m * x_next + (1.0 - m) * known
    tl.store(x_ptr + idx, xn, mask=inb)
    # (hw < HW * has_next) rather than inb & has_next: the interpreter rejects a scalar-broadcast store mask
    tl.store(model_in_ptr + mi_off + hw, _to_model_dtype(xn, model_in_ptr.dtype.element_ty),
             mask=hw < HW * has_next.to(tl.int32))


@triton.jit
def _step_kernel(
    x_ptr, eps_hat_ptr, rows_ptr, step_ptr, seed_ptr,
    model_in_ptr, mi_sb, mi_sc, t_in_ptr,
    mask_ptr, m_sb, m_sc, x_init_ptr, x_out_ptr, eps1_ptr, eps2_ptr, x0_prev_ptr,
    C, HW, T, plane_offset,
    HAS_MASK: tl.constexpr, HAS_NOISE: tl.constexpr, PAIRED_NOISE: tl.constexpr, HAS_OUT: tl.constexpr,
    HAS_X0: tl.constexpr, HAS_HIST: tl.constexpr, BLOCK: tl.constexpr, FAST_MATH: tl.constexpr,
):
    # grid = (B * C planes, cdiv(H * W, BLOCK)); BLOCK is a multiple of CHUNK. No per-element division,
    # all element offsets int64. Each program does the low halves of its chunks, then the high halves,
    # the two halves taking the two draws of one Philox block: no register shuffles between them.
    plane = tl.program_id(0)
    pid_hw = tl.program_id(1)
    b = plane // C
    c = plane - b * C
    base = plane.to(tl.int64) * HW
    mi_off = b.to(tl.int64) * mi_sb + c.to(tl.int64) * mi_sc
    m_off = b.to(tl.int64) * m_sb + c.to(tl.int64) * m_sc
    hw_lo, hw_hi, k = _chunk_tiles(pid_hw, BLOCK)

    step = tl.load(step_ptr).to(tl.int64)
    row = rows_ptr + step * 12
    has_next = step + 1 < T
    nxt = rows_ptr + tl.minimum(step + 1, T - 1) * 12
    c_x, c_e, c_z = tl.load(row + 1), tl.load(row + 2), tl.load(row + 3)
    a_x = 0.0  # placeholders where the table has no x0 columns
    a_o = 0.0
    clip = 0.0
    b_0 = 0.0
    b_h = 0.0
    if HAS_X0:
        a_x, a_o, clip = tl.load(row + 7), tl.load(row + 8), tl.load(row + 9)
        b_0, b_h = tl.load(row + 10), tl.load(row + 11)
    r_x, r_z = tl.load(nxt + 4), tl.load(nxt + 5)  # the blend before step i + 1's model call
    blend = has_next & (tl.load(nxt + 6) != 0)

    z2_lo = 0.0  # placeholders where the draws are not used (no noise and no mask, or paired noise)
    z1_lo = 0.0
    z2_hi = 0.0
    z1_hi = 0.0
    if not PAIRED_NOISE:
        if HAS_NOISE or HAS_MASK:
            z2_lo, z1_lo, z2_hi, z1_hi = _pair_normals(tl.load(seed_ptr), plane_offset + plane.to(tl.int64), k,
                                                       (step + 1).to(tl.uint32), FAST_MATH)
    _step_part(x_ptr, eps_hat_ptr, model_in_ptr, mi_off, mask_ptr, m_off, x_init_ptr, x_out_ptr, eps1_ptr, eps2_ptr,
               x0_prev_ptr, base, hw_lo, HW, z2_lo, z1_lo, c_x, c_e, c_z, r_x, r_z, blend, has_next,
               a_x, a_o, clip, b_0, b_h, HAS_MASK, HAS_NOISE, PAIRED_NOISE, HAS_OUT, HAS_X0, HAS_HIST)
    _step_part(x_ptr, eps_hat_ptr, model_in_ptr, mi_off, mask_ptr, m_off, x_init_ptr, x_out_ptr, eps1_ptr, eps2_ptr,
               x0_prev_ptr, base, hw_hi, HW, z2_hi, z1_hi, c_x, c_e, c_z, r_x, r_z, blend, has_next,
               a_x, a_o, clip, b_0, b_h, HAS_MASK, HAS_NOISE, PAIRED_NOISE, HAS_OUT, HAS_X0, HAS_HIST)
    t_next = tl.load(nxt)
    tl.store(t_in_ptr + b, t_next.to(t_in_ptr.dtype.element_ty), mask=has_next & (c == 0) & (pid_hw == 0))


@triton.jit
def _initial_part(
    x_ptr, model_in_ptr, mi_off, mask_ptr, m_off, x_init_ptr, init_ptr, eps0_ptr, eps1_ptr,
    base, hw, HW, z0, z1, r_x, r_z, blend,
    HAS_MASK: tl.constexpr, HAS_INIT: tl.constexpr, PAIRED_NOISE: tl.constexpr,
):
    inb = hw < HW
    idx = base + hw
    if PAIRED_NOISE:
        z0 = tl.load(eps0_ptr + idx, mask=inb, other=0.0)
    x = z0
    if HAS_INIT:
        src = tl.load(init_ptr + idx, mask=inb, other=0.0).to(tl.float32)
        x = r_x * src + r_z * z0
    xn = x
    if HAS_MASK:
        if blend:
            m = tl.load(mask_ptr + m_off + hw, mask=inb, other=0.0).to(tl.float32)
            xi = tl.load(x_init_ptr + idx, mask=inb, other=0.0).to(tl.float32)
            if PAIRED_NOISE:  # a new name: rebinding z1 inside a runtime branch would change its type
                n1 = tl.load(eps1_ptr + idx, mask=inb, other=0.0)
            else:
                n1 = z1
            known = r_x * xi + r_z * n1
            xn = m * x + (1.0 - m) * known
    tl.store(x_ptr + idx, xn, mask=inb)
    tl.store(model_in_ptr + mi_off + hw, _to_model_dtype(xn, model_in_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _initial_kernel(
    x_ptr, rows_ptr, seed_ptr,
    model_in_ptr, mi_sb, mi_sc, t_in_ptr,
    mask_ptr, m_sb, m_sc, x_init_ptr, init_ptr, eps0_ptr, eps1_ptr,
    C, HW, plane_offset,
    HAS_MASK: tl.constexpr, HAS_INIT: tl.constexpr, PAIRED_NOISE: tl.constexpr,
    BLOCK: tl.constexpr, FAST_MATH: tl.constexpr,
):
    plane = tl.program_id(0)
    pid_hw = tl.program_id(1)
    b = plane // C
    c = plane - b * C
    base = plane.to(tl.int64) * HW
    mi_off = b.to(tl.int64) * mi_sb + c.to(tl.int64) * mi_sc
    m_off = b.to(tl.int64) * m_sb + c.to(tl.int64) * m_sc
    hw_lo, hw_hi, k = _chunk_tiles(pid_hw, BLOCK)
    r_x, r_z = tl.load(rows_ptr + 4), tl.load(rows_ptr + 5)
    blend = tl.load(rows_ptr + 6) != 0

    z0_lo = 0.0
    z1_lo = 0.0
    z0_hi = 0.0
    z1_hi = 0.0
    if not PAIRED_NOISE:
        z0_lo, z1_lo, z0_hi, z1_hi = _pair_normals(tl.load(seed_ptr), plane_offset + plane.to(tl.int64), k,
                                                   tl.full((), 0, tl.uint32), FAST_MATH)
    _initial_part(x_ptr, model_in_ptr, mi_off, mask_ptr, m_off, x_init_ptr, init_ptr, eps0_ptr, eps1_ptr,
                  base, hw_lo, HW, z0_lo, z1_lo, r_x, r_z, blend, HAS_MASK, HAS_INIT, PAIRED_NOISE)
    _initial_part(x_ptr, model_in_ptr, mi_off, mask_ptr, m_off, x_init_ptr, init_ptr, eps0_ptr, eps1_ptr,
                  base, hw_hi, HW, z0_hi, z1_hi, r_x, r_z, blend, HAS_MASK, HAS_INIT, PAIRED_NOISE)
    t0 = tl.load(rows_ptr)
    tl.store(t_in_ptr + b, t0.to(t_in_ptr.dtype.element_ty), mask=(c == 0) & (pid_hw == 0))


# phase is 1 for step 0's draws: specialised, the JIT would make it a constexpr int, which has no .to().
@triton.jit(do_not_specialize=["phase"])
def _noise_kernel(a_ptr, b_ptr, seed_ptr, phase, HW, plane_offset, BLOCK: tl.constexpr, FAST_MATH: tl.constexpr):
    plane = tl.program_id(0)
    hw_lo, hw_hi, k = _chunk_tiles(tl.program_id(1), BLOCK)
    base = plane.to(tl.int64) * HW
    a_lo, b_lo, a_hi, b_hi = _pair_normals(tl.load(seed_ptr), plane_offset + plane.to(tl.int64), k,
                                           phase.to(tl.uint32), FAST_MATH)
    tl.store(a_ptr + base + hw_lo, a_lo, mask=hw_lo < HW)
    tl.store(b_ptr + base + hw_lo, b_lo, mask=hw_lo < HW)
    tl.store(a_ptr + base + hw_hi, a_hi, mask=hw_hi < HW)
    tl.store(b_ptr + base + hw_hi, b_hi, mask=hw_hi < HW)


# ----------------------------------------------------------------------------------------------
# launchers


def interpreting() -> bool:
    """True when the kernels run under the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _block_and_warps(hw: int, block: int | None, num_warps: int | None) -> tuple[int, int]:
    if block is None:
        # The interpreter runs programs one after another: few large blocks are ~10x faster there.
        block = min(max(triton.next_power_of_2(hw), CHUNK_SIZE), 1 << 16) if interpreting() else CHUNK_SIZE
    if block < CHUNK_SIZE or block & (block - 1):
        raise ValueError(f"block must be a power of two >= {CHUNK_SIZE}, got {block}")
    if num_warps is None:
        num_warps = 4 if block <= 1024 else 8
    return block, num_warps


def _check_state(name: str, t: torch.Tensor, like: torch.Tensor, dtypes=(torch.float32,)) -> None:
    if t.shape != like.shape or t.dtype not in dtypes or t.device != like.device or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous {'/'.join(str(d) for d in dtypes)} tensor of shape "
                         f"{tuple(like.shape)} on {like.device}, got {t.dtype} {tuple(t.shape)} on {t.device}"
                         f"{'' if t.is_contiguous() else ' (not contiguous)'}")


def _check_device_scalar(name: str, t, like: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor) or t.numel() != 1 or t.dtype != torch.int64 or t.device != like.device:
        raise ValueError(f"{name} must be a one-element int64 tensor on {like.device} (read by the kernel, so a "
                         f"CUDA graph replays it), got {t!r}")


def _check_plane_offset(plane_offset: int, planes: int, plane_size: int) -> None:
    if plane_size > MAX_PLANE_SIZE:
        raise ValueError(f"H * W must be at most {MAX_PLANE_SIZE}, got {plane_size}")
    if not 0 <= plane_offset <= 2**64 - planes:
        raise ValueError(f"plane_offset must be in [0, 2^64 - {planes}], got {plane_offset}")


def _plane_strides(name: str, t: torch.Tensor, x: torch.Tensor, channels_at_least: bool) -> tuple[int, int]:
    """Batch and channel strides of a 4-d tensor whose H, W are contiguous; 0 on broadcast (size-1) dims."""
    B, C, H, W = x.shape
    ok = t.dim() == 4 and tuple(t.shape[2:]) == (H, W) and t.device == x.device
    if channels_at_least:  # model_in: [B, C + C_bg, H, W]
        ok = ok and t.shape[0] == B and t.shape[1] >= C
    else:  # mask: [1|B, 1|C, H, W]
        ok = ok and t.shape[0] in (1, B) and t.shape[1] in (1, C)
    if not ok:
        want = f"[{B}, >={C}, {H}, {W}]" if channels_at_least else f"[1|{B}, 1|{C}, {H}, {W}]"
        raise ValueError(f"{name} must have shape {want} on {x.device}, got {tuple(t.shape)} on {t.device}")
    if (W > 1 and t.stride(3) != 1) or (H > 1 and t.stride(2) != W):
        raise ValueError(f"{name} must be contiguous over H and W, got strides {t.stride()}")
    sb = 0 if t.shape[0] == 1 else t.stride(0)
    sc = 0 if t.shape[1] == 1 else t.stride(1)
    return sb, sc


def _check_common(x, model_in, t_in, mask, x_init):
    if x.dim() != 4 or x.dtype != torch.float32 or not x.is_contiguous():
        raise ValueError(f"x must be a contiguous float32 [B, C, H, W] tensor, got {x.dtype} {tuple(x.shape)}")
    if x.device.type == "cpu" and not interpreting():
        raise RuntimeError("the Triton step kernels need CUDA tensors, or TRITON_INTERPRET=1 set before triton is "
                           "imported to run on CPU tensors (slow; for tests)")
    if model_in.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"model_in must be float32, float16 or bfloat16, got {model_in.dtype}")
    mi_sb, mi_sc = _plane_strides("model_in", model_in, x, channels_at_least=True)
    B = x.shape[0]
    if t_in.shape != (B,) or not t_in.is_floating_point() or t_in.device != x.device or not t_in.is_contiguous():
        raise ValueError(f"t_in must be a contiguous floating-point [{B}] tensor on {x.device}, got "
                         f"{t_in.dtype} {tuple(t_in.shape)} on {t_in.device}")
    m_sb = m_sc = 0
    if mask is not None:
        m_sb, m_sc = _plane_strides("mask", mask, x, channels_at_least=False)
        if x_init is None:
            raise ValueError("a mask needs x_init (the known pixels)")
        _check_state("x_init", x_init, x)
    return mi_sb, mi_sc, m_sb, m_sc


@torch.no_grad()
def step_triton(
    x: torch.Tensor,
    eps_hat: torch.Tensor,
    rows: torch.Tensor,
    step: torch.Tensor,
    seed: torch.Tensor | None = None,
    *,
    model_in: torch.Tensor,
    t_in: torch.Tensor,
    mask: torch.Tensor | None = None,
    x_init: torch.Tensor | None = None,
    x_out: torch.Tensor | None = None,
    draws_step_noise: bool = True,
    eps1: torch.Tensor | None = None,
    eps2: torch.Tensor | None = None,
    x0_form: bool = False,
    x0_prev: torch.Tensor | None = None,
    plane_offset: int = 0,
    block: int | None = None,
    num_warps: int | None = None,
    fp_fusion: bool = True,
) -> torch.Tensor:
    """One launch of step i = step[0] (int64 device tensor) with Philox noise keyed by seed[0]; returns x.

    With eps1/eps2 given (PAIRED_NOISE) the noises come from those tensors instead (parity tests), and the
    step noise is drawn iff eps2 is given. `plane_offset` shifts the noise's plane counter (a batch split
    into launches keeps the draws of the whole batch with plane_offset = first batch index * C). x0_form and
    x0_prev as in `step_torch` (compile-time flags: the seed's tables run without the x0 work). Writes x,
    model_in[:, :C] and t_in as `step_torch` does.
    """
    mi_sb, mi_sc, m_sb, m_sc = _check_common(x, model_in, t_in, mask, x_init)
    _check_state("eps_hat", eps_hat, x, (torch.float32, torch.float16, torch.bfloat16))
    T = check_rows(rows)
    if T > MAX_STEPS:
        raise ValueError(f"at most {MAX_STEPS} steps, got {T}")
    if rows.device != x.device:
        raise ValueError(f"rows must be on {x.device} (StepTable.to(device)), got {rows.device}")
    _check_device_scalar("step", step, x)
    paired = eps1 is not None or eps2 is not None
    if paired:
        has_noise = eps2 is not None
        if has_noise:
            _check_state("eps2", eps2, x)
        if mask is not None:
            if eps1 is None:
                raise ValueError("paired noise with a mask needs eps1")
            _check_state("eps1", eps1, x)
    else:
        has_noise = bool(draws_step_noise)
        if has_noise or mask is not None:
            _check_device_scalar("seed", seed, x)
    if x_out is not None:
        _check_state("x_out", x_out, x)
    if x0_prev is not None:
        if not x0_form:
            raise ValueError("x0_prev (the history of a multistep sampler) needs x0_form=True")
        _check_state("x0_prev", x0_prev, x)
    B, C, H, W = x.shape
    _check_plane_offset(plane_offset, B * C, H * W)
    block, num_warps = _block_and_warps(H * W, block, num_warps)
    grid = (B * C, triton.cdiv(H * W, block))
    _step_kernel[grid](
        x, eps_hat, rows, step, seed if seed is not None else step,
        model_in, mi_sb, mi_sc, t_in,
        mask if mask is not None else x, m_sb, m_sc,
        x_init if x_init is not None else x, x_out if x_out is not None else x,
        eps1 if eps1 is not None else x, eps2 if eps2 is not None else x, x0_prev if x0_prev is not None else x,
        C, H * W, T, plane_offset,
        HAS_MASK=mask is not None, HAS_NOISE=has_noise, PAIRED_NOISE=paired, HAS_OUT=x_out is not None,
        HAS_X0=bool(x0_form), HAS_HIST=x0_prev is not None,
        BLOCK=block, FAST_MATH=not interpreting(), num_warps=num_warps, enable_fp_fusion=fp_fusion,
    )
    return x


@torch.no_grad()
def initial_triton(
    x: torch.Tensor,
    rows: torch.Tensor,
    seed: torch.Tensor | None = None,
    *,
    model_in: torch.Tensor,
    t_in: torch.Tensor,
    mask: torch.Tensor | None = None,
    x_init: torch.Tensor | None = None,
    init_image: torch.Tensor | None = None,
    eps0: torch.Tensor | None = None,
    eps1: torch.Tensor | None = None,
    plane_offset: int = 0,
    block: int | None = None,
    num_warps: int | None = None,
    fp_fusion: bool = True,
) -> torch.Tensor:
    """One launch: x_T = eps0 (or r_x[0] * init_image + r_z[0] * eps0), the step-0 blend, model_in, t_in = t_0.

    eps0 (and eps1 with a mask) given: PAIRED_NOISE from those tensors; otherwise Philox phase 0 under seed[0].
    """
    mi_sb, mi_sc, m_sb, m_sc = _check_common(x, model_in, t_in, mask, x_init)
    check_rows(rows)
    if rows.device != x.device:
        raise ValueError(f"rows must be on {x.device} (StepTable.to(device)), got {rows.device}")
    paired = eps0 is not None
    if paired:
        _check_state("eps0", eps0, x)
        if mask is not None:
            if eps1 is None:
                raise ValueError("paired noise with a mask needs eps1")
            _check_state("eps1", eps1, x)
    else:
        _check_device_scalar("seed", seed, x)
    if init_image is not None:
        _check_state("init_image", init_image, x, (torch.float32, torch.float16, torch.bfloat16))
    B, C, H, W = x.shape
    _check_plane_offset(plane_offset, B * C, H * W)
    block, num_warps = _block_and_warps(H * W, block, num_warps)
    grid = (B * C, triton.cdiv(H * W, block))
    _initial_kernel[grid](
        x, rows, seed if seed is not None else rows,
        model_in, mi_sb, mi_sc, t_in,
        mask if mask is not None else x, m_sb, m_sc,
        x_init if x_init is not None else x, init_image if init_image is not None else x,
        eps0 if eps0 is not None else x, eps1 if eps1 is not None else x,
        C, H * W, plane_offset,
        HAS_MASK=mask is not None, HAS_INIT=init_image is not None, PAIRED_NOISE=paired,
        BLOCK=block, FAST_MATH=not interpreting(), num_warps=num_warps, enable_fp_fusion=fp_fusion,
    )
    return x


@torch.no_grad()
def philox_noise(seed: torch.Tensor, phase: int, shape, *, plane_offset: int = 0, block: int | None = None):
    """The kernels' draws (a, b) at `phase` as float32 tensors of `shape` ([..., H, W]; a 1-d shape is one plane).

    Planes are numbered plane_offset + the flat index over shape[:-2]. phase 0 is initial_triton's (eps0, eps1);
    phase i + 1 is step i's (eps2, eps1 of step i + 1). For [B, C, H, W] these are exactly the kernels' draws.
    """
    if not isinstance(seed, torch.Tensor) or seed.numel() != 1 or seed.dtype != torch.int64:
        raise ValueError(f"seed must be a one-element int64 tensor, got {seed!r}")
    if not 0 <= phase <= MAX_STEPS:
        raise ValueError(f"phase must be in [0, {MAX_STEPS}], got {phase}")
    if seed.device.type == "cpu" and not interpreting():
        raise RuntimeError("philox_noise needs a CUDA seed tensor, or TRITON_INTERPRET=1 for CPU")
    shape = tuple(int(s) for s in shape)
    a = torch.empty(shape, dtype=torch.float32, device=seed.device)
    b = torch.empty_like(a)
    if a.numel() == 0:
        return a, b
    plane_size = shape[-2] * shape[-1] if len(shape) >= 2 else a.numel()
    planes = a.numel() // plane_size
    _check_plane_offset(plane_offset, planes, plane_size)
    block, num_warps = _block_and_warps(plane_size, block, None)
    _noise_kernel[(planes, triton.cdiv(plane_size, block))](a, b, seed, phase, plane_size, plane_offset, BLOCK=block,
                                                           FAST_MATH=not interpreting(), num_warps=num_warps)
    return a, b


# ----------------------------------------------------------------------------------------------
# ahead-of-time compilation (no GPU needed): catches what the interpreter accepts but the compiler rejects

_TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# Integer arguments of a 300x300, 1-channel (CARE-SST) batch of 8 with a mask: the sizes a launch really passes.
STEP_INTS = {"mi_sb": 2 * 90000, "mi_sc": 90000, "m_sb": 90000, "m_sc": 90000, "C": 1, "HW": 90000, "T": 50,
             "plane_offset": 0}
INITIAL_INTS = {k: v for k, v in STEP_INTS.items() if k != "T"}
NOISE_INTS = {"phase": 1, "HW": 90000, "plane_offset": 0}


def jit_specialisation(fn, ints: dict) -> tuple[dict, dict, dict]:
    """(signature types, constexprs, attrs) the JIT derives from these int values: 1 becomes a constexpr, a multiple
    of 16 gets tt.divisibility 16, |v| >= 2^31 is i64; a do_not_specialize argument gets none of these."""
    sig, const, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        if p.name not in ints:
            continue
        v = ints[p.name]
        if v == 1 and not p.do_not_specialize:
            sig[p.name], const[p.name] = "constexpr", 1
            continue
        sig[p.name] = "i32" if -2**31 <= v < 2**31 else "i64"
        if v % 16 == 0 and not (p.do_not_specialize or p.do_not_specialize_on_alignment):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, const, attrs


def _compile(fn, pointers: dict, ints: dict, constexprs: dict, arch: int, num_warps: int):
    """triton.compile(ASTSource) for CUDA sm_<arch> with the JIT's specialisation of `ints` (pointers 16-aligned,
    as torch allocates them)."""
    from triton.backends.compiler import GPUTarget

    if interpreting():
        raise RuntimeError("compiling for a GPU target needs TRITON_INTERPRET unset when triton is imported")
    names = list(fn.arg_names)
    int_sig, int_const, attrs = jit_specialisation(fn, ints)
    sig = {**pointers, **int_sig, **{n: "constexpr" for n in constexprs}}
    attrs.update({(names.index(n),): [["tt.divisibility", 16]] for n in pointers})
    missing = set(names) - set(sig)
    if missing:
        raise ValueError(f"no value for {sorted(missing)} of {fn.__name__}")
    src = triton.compiler.ASTSource(fn=fn, signature={n: sig[n] for n in names}, constexprs={**int_const, **constexprs},
                                    attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "enable_fp_fusion": True})


def compile_step_kernel(arch: int = 90, *, model_dtype=torch.bfloat16, eps_dtype=torch.float16, has_mask=True,
                        has_noise=True, paired_noise=False, has_out=True, has_x0=False, has_hist=False, block=1024,
                        num_warps=4, ints=None, fast_math=True):
    """triton.compile the step kernel for CUDA sm_<arch> without a GPU; returns the CompiledKernel (asm: ptx, cubin).

    `ints` overrides STEP_INTS: the integer arguments' values, specialised as the JIT would specialise them.
    """
    pointers = {"x_ptr": "*fp32", "eps_hat_ptr": "*" + _TRITON_DTYPE[eps_dtype], "rows_ptr": "*fp32",
                "step_ptr": "*i64", "seed_ptr": "*i64", "model_in_ptr": "*" + _TRITON_DTYPE[model_dtype],
                "t_in_ptr": "*" + _TRITON_DTYPE[model_dtype], "mask_ptr": "*fp32", "x_init_ptr": "*fp32", "x_out_ptr": "*fp32",
                "eps1_ptr": "*fp32", "eps2_ptr": "*fp32", "x0_prev_ptr": "*fp32"}
    constexprs = {"HAS_MASK": has_mask, "HAS_NOISE": has_noise, "PAIRED_NOISE": paired_noise, "HAS_OUT": has_out,
                  "HAS_X0": has_x0, "HAS_HIST": has_hist, "BLOCK": block, "FAST_MATH": fast_math}
    return _compile(_step_kernel, pointers, {**STEP_INTS, **(ints or {})}, constexprs, arch, num_warps)


def compile_initial_kernel(arch: int = 90, *, model_dtype=torch.bfloat16, has_mask=True, has_init=True,
                           paired_noise=False, block=1024, num_warps=4, ints=None, fast_math=True):
    """triton.compile the initial-step kernel for CUDA sm_<arch> without a GPU (`ints` overrides INITIAL_INTS)."""
    pointers = {"x_ptr": "*fp32", "rows_ptr": "*fp32", "seed_ptr": "*i64",
                "model_in_ptr": "*" + _TRITON_DTYPE[model_dtype], "t_in_ptr": "*" + _TRITON_DTYPE[model_dtype], "mask_ptr": "*fp32",
                "x_init_ptr": "*fp32", "init_ptr": "*fp32", "eps0_ptr": "*fp32", "eps1_ptr": "*fp32"}
    constexprs = {"HAS_MASK": has_mask, "HAS_INIT": has_init, "PAIRED_NOISE": paired_noise, "BLOCK": block,
                  "FAST_MATH": fast_math}
    return _compile(_initial_kernel, pointers, {**INITIAL_INTS, **(ints or {})}, constexprs, arch, num_warps)


def compile_noise_kernel(arch: int = 90, *, block=1024, num_warps=4, ints=None, fast_math=True):
    """triton.compile philox_noise's kernel for CUDA sm_<arch> without a GPU (`ints` overrides NOISE_INTS)."""
    pointers = {"a_ptr": "*fp32", "b_ptr": "*fp32", "seed_ptr": "*i64"}
    return _compile(_noise_kernel, pointers, {**NOISE_INTS, **(ints or {})}, {"BLOCK": block, "FAST_MATH": fast_math},
                    arch, num_warps)
