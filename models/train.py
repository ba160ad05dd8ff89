"""Train a noise-prediction U-Net with the seed's recipe (Ho et al. 2020 loss, cosine t ~ U(0, 1)) on synthetic SST; `ddpm-engine train`."""
from __future__ import annotations

import argparse
import copy
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..engine.schedule import CosineSchedule, diffuse
from .checkpoint import STATE, save_checkpoint, save_torch
from .data import STYLES, training_batch
from .real_data import RealCrops
from .registry import PRESETS, build_model, load_model


@dataclass
class TrainConfig:
    """The recipe: everything needed to reproduce a run (stored in config.json)."""

    preset: str = "sst-small"
    size: int = 64  # synthetic tile size; sets the normalisation statistics (the size it is evaluated at)
    synthetic: str = "toy"  # the synthetic generator's style, a key of models.data.STYLES
    crop: int = 32  # trained on random crops: 4x cheaper per step; the U-Net is fully convolutional
    batch: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup: int = 200
    ema_decay: float = 0.999
    max_steps: int = 100_000
    max_minutes: float = 25.0  # wall-time cap; whichever of max_steps / max_minutes comes first
    save_every: int = 250
    seed: int = 0
    real: str = ""  # shared data folder: mix nearly clear crops of its real sst-cloud tiles into every batch
    real_fraction: float = 0.5  # the share of each batch that is real crops (with `real`)
    real_crop: int = 0  # size of the real crops; 0: the same as `crop` (larger ones see more of a real tile)
    real_min_clear: float = 0.95  # the least clear share of a real crop (its gaps are left out of the loss)
    init_from: str = ""  # start from these weights (a preset name or checkpoint directory): fine-tuning


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter."""
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1.0 - decay)


def diffusion_loss(model, x0, background, schedule: CosineSchedule, generator=None, valid=None) -> torch.Tensor:
    """The seed's loss: t ~ U(0, 1), x_t = diffuse(x0, t, eps), MSE(model([x_t, background], t), eps).

    valid: 1 where x0 is observed, 0 in gaps of real tiles (filled with the background): the MSE over valid pixels.
    """
    t = torch.rand(x0.shape[0], generator=generator)
    eps = torch.randn(x0.shape, generator=generator)
    x_t = diffuse(x0, t, eps, schedule)
    pred = model(torch.cat([x_t, background], dim=1), t)
    if valid is None:
        return F.mse_loss(pred, eps)
    return ((pred - eps) ** 2 * valid).sum() / valid.sum().clamp(min=1.0)


def _lr_at(step: int, cfg: TrainConfig) -> float:
    # Linear warm-up then constant: short runs gain nothing from decay before the wall-time cap.
    return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))


def train(cfg: TrainConfig, out_dir: str | Path, resume: bool = True, progress: bool = True,
          model_overrides: dict | None = None) -> dict:
    """Train (or resume) into out_dir; returns the summary also stored in config.json.

    model_overrides changes the preset's model config (e.g. a tiny dim for tests); it is stored with the run.
    """
    if cfg.preset not in PRESETS:
        raise ValueError(f"unknown preset {cfg.preset!r}; must be one of {sorted(PRESETS)}")
    if cfg.size < 8 or not 8 <= cfg.crop <= cfg.size or cfg.batch < 1 or cfg.max_steps < 1 or cfg.max_minutes <= 0:
        raise ValueError("need 8 <= crop <= size, batch >= 1, max_steps >= 1 and max_minutes > 0")
    if cfg.synthetic not in STYLES:
        raise ValueError(f"unknown synthetic style {cfg.synthetic!r}; must be one of {sorted(STYLES)}")
    if not 0.0 <= cfg.real_fraction <= 1.0:
        raise ValueError(f"real_fraction must be in [0, 1], got {cfg.real_fraction}")
    if cfg.real_crop and cfg.real_crop < 8 or not 0.0 < cfg.real_min_clear <= 1.0:
        raise ValueError(f"need real_crop 0 or >= 8 and real_min_clear in (0, 1], got {cfg.real_crop} and "
                         f"{cfg.real_min_clear}")
    n_real = round(cfg.batch * cfg.real_fraction) if cfg.real else 0
    real_crop = cfg.real_crop or cfg.crop
    crops = RealCrops(cfg.real, real_crop, min_clear=cfg.real_min_clear) if n_real else None
    out_dir = Path(out_dir)
    preset = {**PRESETS[cfg.preset]}
    preset["model"] = {**preset["model"], **(model_overrides or {})}
    torch.manual_seed(cfg.seed)
    model = build_model(preset["arch"], **preset["model"])
    if cfg.init_from:
        model.load_state_dict(load_model(cfg.init_from).state_dict())  # strict: the preset's shapes must match
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, elapsed, losses = 0, 0.0, []
    if resume and (out_dir / STATE).is_file():
        state = torch.load(out_dir / STATE, map_location="cpu", weights_only=False)
        # Stopping and saving knobs may change between resumes; the recipe itself may not.
        free = ("max_steps", "max_minutes", "save_every")
        if (state["train"] != asdict(cfg) | {k: state["train"][k] for k in free}
                or state.get("model_config", preset["model"]) != preset["model"]):
            raise ValueError(f"{out_dir} holds a run with a different recipe; use another --out or --no-resume")
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        step, elapsed, losses = state["step"], state["elapsed"], state["losses"]
    schedule = CosineSchedule()
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)

    def save() -> dict:
        summary = {"arch": preset["arch"], "model": preset["model"], "train": asdict(cfg), "step": step,
                   "train_seconds": round(elapsed, 1),
                   "loss_last_100": float(np.mean(losses[-100:])) if losses else None}
        save_torch({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step,
                    "elapsed": elapsed, "losses": losses, "train": asdict(cfg),
                    "model_config": preset["model"]}, out_dir / STATE)
        save_checkpoint(out_dir, model.state_dict(), summary, ema_state=ema.state_dict())
        return summary

    model.train()
    bar = tqdm(total=cfg.max_steps, initial=step, desc=f"train {cfg.preset}", disable=not progress,
               mininterval=5.0, dynamic_ncols=True)
    start = time.monotonic() - elapsed
    summary = None
    while step < cfg.max_steps and elapsed < cfg.max_minutes * 60:
        # Data seeded by (seed, step): a resumed run sees the batches the uninterrupted one would have.
        rng = np.random.default_rng([cfg.seed, step])
        x0, bg = training_batch(rng, cfg.batch - n_real, cfg.size, cfg.crop, STYLES[cfg.synthetic])
        valid = None
        if crops is not None:
            rx0, rbg, rvalid = crops.batch(rng, n_real)
            if real_crop == cfg.crop:
                x0, bg = torch.cat([x0, rx0]), torch.cat([bg, rbg])
                valid = torch.cat([torch.ones_like(x0[: cfg.batch - n_real]), rvalid])
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        if crops is not None and real_crop != cfg.crop:
            # Crops of two sizes cannot share a batch: one loss each, weighted by their share of the batch.
            loss = diffusion_loss(model, rx0, rbg, schedule, gen, rvalid) * (n_real / cfg.batch)
            if n_real < cfg.batch:
                loss = loss + diffusion_loss(model, x0, bg, schedule, gen) * (1 - n_real / cfg.batch)
        else:
            loss = diffusion_loss(model, x0, bg, schedule, gen, valid)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        # EMA warm-up: early weights are noise, so average over at most ~step steps.
        ema_update(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)))
        step += 1
        elapsed = time.monotonic() - start
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"loss became {loss.item()} at step {step}; lower --lr")
        losses.append(round(loss.item(), 5))
        bar.update(1)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}", min=f"{elapsed / 60:.1f}")
        if step % cfg.save_every == 0:
            summary = save()
    bar.close()
    return save() if summary is None or summary["step"] != step else summary


def register(subparsers) -> None:
    """Add `ddpm-engine train`."""
    d = TrainConfig()
    p = subparsers.add_parser(
        "train", help="train a bundled model preset on synthetic SST tiles",
        description="Train a CARE-SST U-Net with the seed's recipe (t ~ U(0,1), diffuse, MSE on the noise, AdamW, "
        "EMA of the weights) on synthetic SST tiles. Writes OUT/model.safetensors (EMA weights) + OUT/config.json "
        "(atomically, every --save-every steps) and OUT/train_state.pt to resume.")
    p.add_argument("--preset", default=d.preset, help=f"model preset, one of {sorted(PRESETS)} (default %(default)s)")
    p.add_argument("--out", required=True, help="checkpoint directory (created; resumed if it holds a run)")
    p.add_argument("--size", type=int, default=d.size, help="synthetic tile size in pixels (default %(default)s)")
    p.add_argument("--synthetic", default=d.synthetic, choices=sorted(STYLES),
                   help="synthetic generator style: toy (strong eddies and fronts in a 64 px tile; the first run's) or "
                   "viirs (matched to the real tiles' gradients, fronts and OISST smoothing; use --size 300) "
                   "(default %(default)s)")
    p.add_argument("--crop", type=int, default=d.crop, help="random crop trained on, <= size (default %(default)s)")
    p.add_argument("--batch", type=int, default=d.batch, help="tiles per step (default %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="AdamW peak learning rate (default %(default)s)")
    p.add_argument("--warmup", type=int, default=d.warmup, help="linear warm-up steps (default %(default)s)")
    p.add_argument("--ema-decay", type=float, default=d.ema_decay, help="EMA decay (default %(default)s)")
    p.add_argument("--max-steps", type=int, default=d.max_steps, help="stop after this many steps (default %(default)s)")
    p.add_argument("--max-minutes", type=float, default=d.max_minutes,
                   help="stop after this much training wall time, summed over resumes (default %(default)s)")
    p.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint interval in steps (default %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed for weights, data and noise (default %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--real", default=d.real, metavar="DATA", help="the shared data folder: train also on nearly clear "
                   "crops of its real sst-cloud tiles (loss on observed pixels only; the sst-clear tiles that "
                   "`ddpm-engine evaluate --real` scores are never trained on)")
    p.add_argument("--real-fraction", type=float, default=d.real_fraction,
                   help="with --real: the share of each batch that is real crops (default %(default)s)")
    p.add_argument("--real-crop", type=int, default=d.real_crop, help="with --real: the real crops' size, which may "
                   "exceed --size (default: --crop)")
    p.add_argument("--real-min-clear", type=float, default=d.real_min_clear,
                   help="with --real: the least clear share of a real crop (default %(default)s)")
    p.add_argument("--init-from", default=d.init_from, metavar="MODEL",
                   help="fine-tune: start from these weights (preset name or checkpoint directory)")
    p.add_argument("--no-resume", action="store_true", help="start over even if OUT holds a run")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """CLI entry: train and print the summary line."""
    if args.threads:
        torch.set_num_threads(args.threads)
    names = {f.name for f in fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in names})
    s = train(cfg, args.out, resume=not args.no_resume, progress=not args.quiet)
    print(f"trained {cfg.preset}: {s['step']} steps in {s['train_seconds'] / 60:.1f} min, "
          f"loss (last 100 steps) {s['loss_last_100']:.4f} -> {args.out}")
    return 0
