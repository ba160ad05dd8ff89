"""The fused sampler step as one Triton kernel launch (DESIGN.md section 4); `step_torch` is its specification.

Noise: Philox-4x32-10 (Salmon et al. 2011, via `tl.philox`), key = the 64-bit seed, counter =
(element index low word, element index high word, phase, 0). The element index is the int64 linear
index into the contiguous [B, C, H, W] state plus `elem_offset`; the phase is 0 for the initial step
and i + 1 for step i. Box-Muller on the first two words of the element's Philox block gives
draw "a" = r cos(theta) and draw "b" = r sin(theta), independent N(0, 1):

    phase 0     (initial_triton): a = eps0 (x_T),          b = eps1 of the step-0 blend
    phase i + 1 (step_triton i):  a = eps2 (step i noise), b = eps1 of the step-(i+1) blend

So no two draws share a counter for up to 2^64 elements and 2^32 - 1 steps, and nothing is ever
multiplied out into an int32 (no step * numel product exists). `philox_noise` returns the same draws
as tensors for statistics tests and for checking the kernel against `step_torch`.

On CPU the kernels run under the Triton interpreter: set TRITON_INTERPRET=1 before triton is first
imported (the @triton.jit decorator reads it at import time).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ddpm_engine.engine.samplers import COL_BLEND, COL_CE, COL_CX, COL_CZ, COL_RX, COL_RZ, COL_T, NUM_COLS

from .fused_step import check_rows

MAX_STEPS = 2**32 - 1  # the phase is one 32-bit counter word

# The kernels index a row with these literal offsets (jit code cannot read Python globals).
assert (COL_T, COL_CX, COL_CE, COL_CZ, COL_RX, COL_RZ, COL_BLEND, NUM_COLS) == (0, 1, 2, 3, 4, 5, 6, 7)


@triton.jit
def _normal_pair(seed, elem, phase):
    """Two independent N(0, 1) blocks for int64 element indices `elem` at a uint32 `phase` under a 64-bit key.

    Box-Muller on words (0, 1) of one Philox block: r cos(theta) and r sin(theta) are independent standard
    normals, so both draws cost one log, one sqrt and one sin/cos pair; a path needing one draw drops the other.
    """
    lo = elem.to(tl.uint32)
    hi = (elem >> 32).to(tl.uint32)
    zero = lo * 0
    w0, w1, _, _ = tl.philox(seed, lo, hi, zero + phase, zero)
    return tl.pair_uniform_to_normal(tl.uint_to_uniform_float(w0), tl.uint_to_uniform_float(w1))


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
def _step_kernel(
    x_ptr, eps_hat_ptr, rows_ptr, step_ptr, seed_ptr,
    model_in_ptr, mi_sb, mi_sc, t_in_ptr,
    mask_ptr, m_sb, m_sc, x_init_ptr, x_out_ptr, eps1_ptr, eps2_ptr,
    C, HW, T, elem_offset,
    HAS_MASK: tl.constexpr, HAS_NOISE: tl.constexpr, PAIRED_NOISE: tl.constexpr, HAS_OUT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # grid = (B * C planes, cdiv(H * W, BLOCK)): no per-element division; all offsets in int64.
    plane = tl.program_id(0)
    pid_hw = tl.program_id(1)
    b = plane // C
    c = plane - b * C
    hw = pid_hw * BLOCK + tl.arange(0, BLOCK)
    inb = hw < HW
    idx = plane.to(tl.int64) * HW + hw

    step = tl.load(step_ptr).to(tl.int64)
    row = rows_ptr + step * 7
    has_next = step + 1 < T
    nxt = rows_ptr + tl.minimum(step + 1, T - 1) * 7

    x = tl.load(x_ptr + idx, mask=inb, other=0.0)
    e = tl.load(eps_hat_ptr + idx, mask=inb, other=0.0).to(tl.float32)
    x_next = tl.load(row + 1) * x + tl.load(row + 2) * e  # c_x, c_e

    if not PAIRED_NOISE:
        if HAS_NOISE:
            z2, z1 = _normal_pair(tl.load(seed_ptr), elem_offset + idx, (step + 1).to(tl.uint32))
    if HAS_NOISE:
        if PAIRED_NOISE:
            z2 = tl.load(eps2_ptr + idx, mask=inb, other=0.0)
        x_next = x_next + tl.load(row + 3) * z2  # c_z
    if HAS_OUT:
        tl.store(x_out_ptr + idx, x_next, mask=inb)

    xn = x_next
    if HAS_MASK:
        if has_next & (tl.load(nxt + 6) != 0):  # blend flag of step i + 1: a runtime branch, no mask reads when off
            m = tl.load(mask_ptr + b.to(tl.int64) * m_sb + c.to(tl.int64) * m_sc + hw, mask=inb, other=0.0)
            m = m.to(tl.float32)
            xi = tl.load(x_init_ptr + idx, mask=inb, other=0.0).to(tl.float32)
            if PAIRED_NOISE:
                z1 = tl.load(eps1_ptr + idx, mask=inb, other=0.0)
            elif not HAS_NOISE:
                _, z1 = _normal_pair(tl.load(seed_ptr), elem_offset + idx, (step + 1).to(tl.uint32))
            known = tl.load(nxt + 4) * xi + tl.load(nxt + 5) * z1  # r_x, r_z of step i + 1
            xn = m * x_next + (1.0 - m) * known

    tl.store(x_ptr + idx, xn, mask=inb)
    mi = model_in_ptr + b.to(tl.int64) * mi_sb + c.to(tl.int64) * mi_sc + hw
    # (hw < HW * has_next) rather than inb & has_next: the interpreter rejects a scalar-broadcast store mask
    tl.store(mi, _to_model_dtype(xn, model_in_ptr.dtype.element_ty), mask=hw < HW * has_next.to(tl.int32))
    t_next = tl.load(nxt)
    tl.store(t_in_ptr + b, t_next.to(t_in_ptr.dtype.element_ty), mask=has_next & (c == 0) & (pid_hw == 0))


@triton.jit
def _initial_kernel(
    x_ptr, rows_ptr, seed_ptr,
    model_in_ptr, mi_sb, mi_sc, t_in_ptr,
    mask_ptr, m_sb, m_sc, x_init_ptr, init_ptr, eps0_ptr, eps1_ptr,
    C, HW, elem_offset,
    HAS_MASK: tl.constexpr, HAS_INIT: tl.constexpr, PAIRED_NOISE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    plane = tl.program_id(0)
    pid_hw = tl.program_id(1)
    b = plane // C
    c = plane - b * C
    hw = pid_hw * BLOCK + tl.arange(0, BLOCK)
    inb = hw < HW
    idx = plane.to(tl.int64) * HW + hw

    if PAIRED_NOISE:
        z0 = tl.load(eps0_ptr + idx, mask=inb, other=0.0)
    else:
        z0, z1 = _normal_pair(tl.load(seed_ptr), elem_offset + idx, tl.full((), 0, tl.uint32))
    x = z0
    if HAS_INIT:
        src = tl.load(init_ptr + idx, mask=inb, other=0.0).to(tl.float32)
        x = tl.load(rows_ptr + 4) * src + tl.load(rows_ptr + 5) * z0
    xn = x
    if HAS_MASK:
        if tl.load(rows_ptr + 6) != 0:
            m = tl.load(mask_ptr + b.to(tl.int64) * m_sb + c.to(tl.int64) * m_sc + hw, mask=inb, other=0.0)
            m = m.to(tl.float32)
            xi = tl.load(x_init_ptr + idx, mask=inb, other=0.0).to(tl.float32)
            if PAIRED_NOISE:
                z1 = tl.load(eps1_ptr + idx, mask=inb, other=0.0)
            known = tl.load(rows_ptr + 4) * xi + tl.load(rows_ptr + 5) * z1
            xn = m * x + (1.0 - m) * known

    tl.store(x_ptr + idx, xn, mask=inb)
    mi = model_in_ptr + b.to(tl.int64) * mi_sb + c.to(tl.int64) * mi_sc + hw
    tl.store(mi, _to_model_dtype(xn, model_in_ptr.dtype.element_ty), mask=inb)
    t0 = tl.load(rows_ptr)
    tl.store(t_in_ptr + b, t0.to(t_in_ptr.dtype.element_ty), mask=(c == 0) & (pid_hw == 0))


@triton.jit
def _noise_kernel(a_ptr, b_ptr, seed_ptr, phase, n, elem_offset, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    a, b = _normal_pair(tl.load(seed_ptr), elem_offset + i, phase.to(tl.uint32))
    tl.store(a_ptr + i, a, mask=i < n)
    tl.store(b_ptr + i, b, mask=i < n)


# ----------------------------------------------------------------------------------------------
# launchers


def interpreting() -> bool:
    """True when the kernels run under the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _block_and_warps(hw: int, block: int | None, num_warps: int | None) -> tuple[int, int]:
    if block is None:
        # The interpreter runs programs one after another: few large blocks are ~10x faster there.
        block = min(triton.next_power_of_2(hw), 1 << 16) if interpreting() else 1024
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
    elem_offset: int = 0,
    block: int | None = None,
    num_warps: int | None = None,
    fp_fusion: bool = True,
) -> torch.Tensor:
    """One launch of step i = step[0] (int64 device tensor) with Philox noise keyed by seed[0]; returns x.

    With eps1/eps2 given (PAIRED_NOISE) the noises come from those tensors instead (parity tests), and the
    step noise is drawn iff eps2 is given. `elem_offset` shifts the noise counter (a batch split into
    launches can keep the draws of the whole batch). Writes x, model_in[:, :C] and t_in as `step_torch` does.
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
    if elem_offset < 0 or elem_offset + x.numel() > 2**64:
        raise ValueError(f"elem_offset must be in [0, 2^64 - numel], got {elem_offset}")

    B, C, H, W = x.shape
    block, num_warps = _block_and_warps(H * W, block, num_warps)
    grid = (B * C, triton.cdiv(H * W, block))
    _step_kernel[grid](
        x, eps_hat, rows, step, seed if seed is not None else step,
        model_in, mi_sb, mi_sc, t_in,
        mask if mask is not None else x, m_sb, m_sc,
        x_init if x_init is not None else x, x_out if x_out is not None else x,
        eps1 if eps1 is not None else x, eps2 if eps2 is not None else x,
        C, H * W, T, elem_offset,
        HAS_MASK=mask is not None, HAS_NOISE=has_noise, PAIRED_NOISE=paired, HAS_OUT=x_out is not None,
        BLOCK=block, num_warps=num_warps, enable_fp_fusion=fp_fusion,
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
    elem_offset: int = 0,
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
    if elem_offset < 0 or elem_offset + x.numel() > 2**64:
        raise ValueError(f"elem_offset must be in [0, 2^64 - numel], got {elem_offset}")

    B, C, H, W = x.shape
    block, num_warps = _block_and_warps(H * W, block, num_warps)
    grid = (B * C, triton.cdiv(H * W, block))
    _initial_kernel[grid](
        x, rows, seed if seed is not None else rows,
        model_in, mi_sb, mi_sc, t_in,
        mask if mask is not None else x, m_sb, m_sc,
        x_init if x_init is not None else x, init_image if init_image is not None else x,
        eps0 if eps0 is not None else x, eps1 if eps1 is not None else x,
        C, H * W, elem_offset,
        HAS_MASK=mask is not None, HAS_INIT=init_image is not None, PAIRED_NOISE=paired,
        BLOCK=block, num_warps=num_warps, enable_fp_fusion=fp_fusion,
    )
    return x


@torch.no_grad()
def philox_noise(seed: torch.Tensor, phase: int, shape, *, elem_offset: int = 0, block: int | None = None):
    """The kernels' draws (a, b) at `phase` for elements elem_offset + [0, prod(shape)): float32 tensors of `shape`.

    phase 0 is initial_triton's (eps0, eps1); phase i + 1 is step i's (eps2, eps1 of step i + 1).
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
    n = a.numel()
    if block is None:
        block = min(triton.next_power_of_2(max(n, 16)), 1 << 16) if interpreting() else 1024
    _noise_kernel[(triton.cdiv(n, block),)](a, b, seed, phase, n, elem_offset, BLOCK=block)
    return a, b


# ----------------------------------------------------------------------------------------------
# ahead-of-time compilation (no GPU needed): catches what the interpreter accepts but the compiler rejects

_TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _compile(fn, sig: dict, constexprs: dict, arch: int, num_warps: int, aligned_ints: tuple):
    """triton.compile(ASTSource) for CUDA sm_<arch>; pointers and `aligned_ints` marked 16-divisible as the JIT does."""
    from triton.backends.compiler import GPUTarget

    if interpreting():
        raise RuntimeError("compiling for a GPU target needs TRITON_INTERPRET unset when triton is imported")
    names = list(sig)
    attrs = {(names.index(n),): [["tt.divisibility", 16]]
             for n, ty in sig.items() if ty.startswith("*") or n in aligned_ints}
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "enable_fp_fusion": True})


def compile_step_kernel(arch: int = 90, *, model_dtype=torch.bfloat16, eps_dtype=torch.float16, has_mask=True,
                        has_noise=True, paired_noise=False, has_out=True, block=1024, num_warps=4,
                        large_offset=True, aligned=True):
    """triton.compile the step kernel for CUDA sm_<arch> without a GPU; returns the CompiledKernel (asm: ptx, cubin).

    `aligned` mirrors the JIT's specialisation of 16-aligned pointers and 16-divisible sizes (300 x 300 tiles).
    """
    i64 = "i64" if large_offset else "i32"
    sig = {
        "x_ptr": "*fp32", "eps_hat_ptr": "*" + _TRITON_DTYPE[eps_dtype], "rows_ptr": "*fp32", "step_ptr": "*i64",
        "seed_ptr": "*i64", "model_in_ptr": "*" + _TRITON_DTYPE[model_dtype], "mi_sb": i64, "mi_sc": "i32",
        "t_in_ptr": "*fp32", "mask_ptr": "*fp32", "m_sb": "i32", "m_sc": "i32", "x_init_ptr": "*fp32",
        "x_out_ptr": "*fp32", "eps1_ptr": "*fp32", "eps2_ptr": "*fp32",
        "C": "i32", "HW": "i32", "T": "i32", "elem_offset": i64,
        "HAS_MASK": "constexpr", "HAS_NOISE": "constexpr", "PAIRED_NOISE": "constexpr", "HAS_OUT": "constexpr",
        "BLOCK": "constexpr",
    }
    constexprs = {"HAS_MASK": has_mask, "HAS_NOISE": has_noise, "PAIRED_NOISE": paired_noise, "HAS_OUT": has_out,
                  "BLOCK": block}
    aligned_ints = ("mi_sb", "mi_sc", "m_sb", "m_sc", "HW") if aligned else ()
    return _compile(_step_kernel, sig, constexprs, arch, num_warps, aligned_ints)


def compile_initial_kernel(arch: int = 90, *, model_dtype=torch.bfloat16, has_mask=True, has_init=True,
                           paired_noise=False, block=1024, num_warps=4, aligned=True):
    """triton.compile the initial-step kernel for CUDA sm_<arch> without a GPU."""
    sig = {
        "x_ptr": "*fp32", "rows_ptr": "*fp32", "seed_ptr": "*i64", "model_in_ptr": "*" + _TRITON_DTYPE[model_dtype],
        "mi_sb": "i32", "mi_sc": "i32", "t_in_ptr": "*fp32", "mask_ptr": "*fp32", "m_sb": "i32", "m_sc": "i32",
        "x_init_ptr": "*fp32", "init_ptr": "*fp32", "eps0_ptr": "*fp32", "eps1_ptr": "*fp32",
        "C": "i32", "HW": "i32", "elem_offset": "i64",
        "HAS_MASK": "constexpr", "HAS_INIT": "constexpr", "PAIRED_NOISE": "constexpr", "BLOCK": "constexpr",
    }
    constexprs = {"HAS_MASK": has_mask, "HAS_INIT": has_init, "PAIRED_NOISE": paired_noise, "BLOCK": block}
    aligned_ints = ("mi_sb", "mi_sc", "m_sb", "m_sc", "HW") if aligned else ()
    return _compile(_initial_kernel, sig, constexprs, arch, num_warps, aligned_ints)
