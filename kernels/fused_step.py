"""The fused sampler step in plain torch: the specification the Triton kernel must equal (DESIGN.md section 4).

One step i of the seed's loop, rewritten on the linear step table (engine.samplers.StepTable rows):

    x_{i+1} = c_x[i] * x + c_e[i] * eps_hat                            # b_x, b_o of the x0-form (DESIGN 3b)
    if x0_form:                                                         # a table with x0 columns (not the seed's)
        x0 = a_x[i] * x + a_o[i] * eps_hat ; x0 = clamp(x0, -clip[i], clip[i]) if clip[i] > 0
        x_{i+1} += b_0[i] * x0
        if x0_prev is given: x_{i+1} += b_h[i] * x0_prev ; x0_prev = x0   # the history of multistep samplers
    x_{i+1} += c_z[i] * eps2                                            # if eps2 is given
    if i + 1 < T:
        t_in[:] = t[i + 1]
        xn = mask * x_{i+1} + (1 - mask) * (r_x[i+1] * x_init + r_z[i+1] * eps1)   if mask and blend[i+1]
           = x_{i+1}                                                                otherwise
        x = xn ; model_in[:, :C] = xn (in the model's dtype)
    else:                                  # last step: the seed does not re-paste the known pixels
        x = x_{i+1}                        # model_in and t_in are left as they are
    x_out = x_{i+1} (un-blended), if given

All arithmetic is fp32 in exactly the order written above, so the kernel can match it to the last bit.
"""
from __future__ import annotations

import operator

import torch

from ddpm_engine.engine.samplers import (COL_AO, COL_AX, COL_B0, COL_BH, COL_BLEND, COL_CE, COL_CLIP, COL_CX, COL_CZ,
                                         COL_RX, COL_RZ, COL_T, NUM_COLS)


def check_rows(rows: torch.Tensor) -> int:
    """Return T for a [T, NUM_COLS] float32 contiguous step table, or raise ValueError."""
    if not isinstance(rows, torch.Tensor) or rows.dim() != 2 or rows.shape[1] != NUM_COLS or rows.shape[0] < 1:
        raise ValueError(f"rows must be the [T, {NUM_COLS}] step table, got "
                         f"{tuple(rows.shape) if isinstance(rows, torch.Tensor) else type(rows).__name__}")
    if rows.dtype != torch.float32 or not rows.is_contiguous():
        raise ValueError(f"rows must be contiguous float32, got {rows.dtype}, strides {rows.stride()}")
    return rows.shape[0]


def _rows_at(rows: torch.Tensor, step):
    """(row i, row min(i+1, T-1), i + 1 < T) for a Python int i or an int64 device tensor holding i (no host sync)."""
    T = check_rows(rows)
    if isinstance(step, torch.Tensor):
        i = step.reshape(1).long()
        row = rows.index_select(0, i)[0]
        nxt = rows.index_select(0, (i + 1).clamp(max=T - 1))[0]
        return row, nxt, (i[0] + 1) < T
    i = operator.index(step)
    if not 0 <= i < T:
        raise ValueError(f"step must be in [0, {T}), got {i}")
    return rows[i], rows[min(i + 1, T - 1)], i + 1 < T


def _select(cond, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a where cond else b, for a Python bool (no work) or a 0-d bool tensor (graph-capturable)."""
    if isinstance(cond, torch.Tensor):
        return torch.where(cond, a, b)
    return a if cond else b


def _blend_where(flag, x: torch.Tensor, mask, x_init, eps1, row: torch.Tensor, host_flag_ok: bool) -> torch.Tensor:
    """Where flag: mask * x + (1 - mask) * (r_x * x_init + r_z * eps1) with r_x, r_z from `row`; else x.

    eps1 may be None only where the flag is off; that is checked on the host when `host_flag_ok` (a Python
    step index), since a device step index must not sync.
    """
    if mask is None:
        return x
    if x_init is None:
        raise ValueError("a mask needs x_init (the known pixels)")
    if eps1 is None:
        if host_flag_ok and not bool(flag):
            return x
        raise ValueError("a blending step needs the blend noise eps1")
    known = row[COL_RX] * x_init + row[COL_RZ] * eps1
    return torch.where(flag, mask * x + (1 - mask) * known, x)


@torch.no_grad()
def step_torch(
    x: torch.Tensor,
    eps_hat: torch.Tensor,
    rows: torch.Tensor,
    step,
    eps2: torch.Tensor | None = None,
    eps1: torch.Tensor | None = None,
    *,
    model_in: torch.Tensor,
    t_in: torch.Tensor,
    mask: torch.Tensor | None = None,
    x_init: torch.Tensor | None = None,
    x_out: torch.Tensor | None = None,
    x0_form: bool = False,
    x0_prev: torch.Tensor | None = None,
) -> torch.Tensor:
    """Step i (a Python int, or an int64 tensor on x's device): update x in place and write model_in[:, :C], t_in.

    eps2 is the step noise (None: no noise term, DDIM with eta = 0); eps1 the blend noise of step i + 1
    (needed with a mask). x0_form: the table has x0 columns (StepTable.x0_form); x0_prev: the history buffer
    (StepTable.history), read and then overwritten with this step's x0_hat. Returns x.
    """
    C = x.shape[1]
    row, nxt, has_next = _rows_at(rows, step)
    eps_hat = eps_hat.float()
    x_next = row[COL_CX] * x + row[COL_CE] * eps_hat
    if x0_prev is not None and not x0_form:
        raise ValueError("x0_prev (the history of a multistep sampler) needs x0_form=True")
    if x0_form:
        x0 = row[COL_AX] * x + row[COL_AO] * eps_hat
        clip = row[COL_CLIP]
        x0 = torch.where(clip > 0, torch.minimum(torch.maximum(x0, -clip), clip), x0)
        x_next += row[COL_B0] * x0
        if x0_prev is not None:
            x_next += row[COL_BH] * x0_prev
            x0_prev.copy_(x0)
    if eps2 is not None:
        x_next += row[COL_CZ] * eps2
    if x_out is not None:
        x_out.copy_(x_next)
    xn = _blend_where(has_next & (nxt[COL_BLEND] != 0), x_next, mask, x_init, eps1, nxt,
                      host_flag_ok=not isinstance(step, torch.Tensor))
    x.copy_(xn)
    x_channels = model_in[:, :C]
    x_channels.copy_(_select(has_next, xn.to(model_in.dtype), x_channels))
    t_in.copy_(_select(has_next, nxt[COL_T].to(t_in.dtype).expand_as(t_in), t_in))
    return x


@torch.no_grad()
def initial_torch(
    x: torch.Tensor,
    rows: torch.Tensor,
    eps0: torch.Tensor,
    eps1: torch.Tensor | None = None,
    *,
    model_in: torch.Tensor,
    t_in: torch.Tensor,
    mask: torch.Tensor | None = None,
    x_init: torch.Tensor | None = None,
    init_image: torch.Tensor | None = None,
) -> torch.Tensor:
    """x_T = eps0 (or r_x[0] * init_image + r_z[0] * eps0), then the step-0 blend; writes x, model_in[:, :C], t_in."""
    check_rows(rows)
    C = x.shape[1]
    row0 = rows[0]
    x_start = eps0 if init_image is None else row0[COL_RX] * init_image.float() + row0[COL_RZ] * eps0
    xn = _blend_where(row0[COL_BLEND] != 0, x_start, mask, x_init, eps1, row0, host_flag_ok=True)
    x.copy_(xn)
    model_in[:, :C].copy_(xn)
    t_in.copy_(row0[COL_T].to(t_in.dtype).expand_as(t_in))
    return x
