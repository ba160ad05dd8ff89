"""The fused step with one table row per batch row: each slot at its own step of its own sampler (DESIGN.md section 8).

Slot b reads row offset[b] + step[b] of one concatenated step table and applies exactly the update of
`fused_step.step_torch` (same fp32 operations in the same order), with the coefficients broadcast per row
instead of per batch. So a slot's row equals what step_torch gives for its request alone, to the last bit.
"""
from __future__ import annotations

import torch

from ddpm_engine.engine.samplers import (COL_AO, COL_AX, COL_B0, COL_BH, COL_BLEND, COL_CE, COL_CLIP, COL_CX, COL_CZ,
                                         COL_RX, COL_RZ, COL_T)

from .fused_step import check_rows


@torch.no_grad()
def step_slots_torch(
    x: torch.Tensor,
    eps_hat: torch.Tensor,
    table: torch.Tensor,
    offset: torch.Tensor,
    step: torch.Tensor,
    length: torch.Tensor,
    eps2: torch.Tensor,
    eps1: torch.Tensor,
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
) -> torch.Tensor:
    """Step every slot once: x[b] <- its request's step `step[b]` (int64 [B] tensors offset, step, length = T).

    draws[b]: the request's sampler draws step noise (eps2[b] is used only there); masked[b]: it blends its known
    pixels (mask[b], x_init[b] and eps1[b], the blend noise of its next step, are used only there); x0_form[b]: its
    table has x0 columns; history[b]: it keeps x0_prev[b] (multistep samplers; read, then overwritten with this
    step's x0). Rows on their last step leave model_in and t_in as they are, like step_torch. Returns x.
    """
    check_rows(table)
    B, C = x.shape[:2]
    has_next = step + 1 < length
    row = table.index_select(0, offset + step)
    nxt = table.index_select(0, offset + torch.minimum(step + 1, length - 1))

    def per_row(r: torch.Tensor, col: int) -> torch.Tensor:  # one coefficient per slot, broadcast over C, H, W
        return r[:, col].view(B, 1, 1, 1)

    eps_hat = eps_hat.float()
    x_next = per_row(row, COL_CX) * x + per_row(row, COL_CE) * eps_hat
    # The x0 terms only on rows whose table has them: seed rows stay exactly step_torch's seed update.
    x0 = per_row(row, COL_AX) * x + per_row(row, COL_AO) * eps_hat
    clip = per_row(row, COL_CLIP)
    x0 = torch.where(clip > 0, torch.minimum(torch.maximum(x0, -clip), clip), x0)
    x_next = torch.where(x0_form.view(B, 1, 1, 1), x_next + per_row(row, COL_B0) * x0, x_next)
    keeps = history.view(B, 1, 1, 1)
    x_next = torch.where(keeps, x_next + per_row(row, COL_BH) * x0_prev, x_next)
    x0_prev.copy_(torch.where(keeps, x0, x0_prev))
    # `where`, not a zero coefficient: rows that draw no noise must not get `+ 0.0` (it turns -0.0 into +0.0).
    x_next = torch.where(draws.view(B, 1, 1, 1), x_next + per_row(row, COL_CZ) * eps2, x_next)
    blend = (masked & has_next & (nxt[:, COL_BLEND] != 0)).view(B, 1, 1, 1)
    known = per_row(nxt, COL_RX) * x_init + per_row(nxt, COL_RZ) * eps1
    xn = torch.where(blend, mask * x_next + (1 - mask) * known, x_next)
    x.copy_(xn)
    x_channels = model_in[:, :C]
    x_channels.copy_(torch.where(has_next.view(B, 1, 1, 1), xn.to(model_in.dtype), x_channels))
    t_in.copy_(torch.where(has_next, nxt[:, COL_T].to(t_in.dtype), t_in))
    return x
