"""Checkpoints as safetensors weights + a JSON config, written atomically (temp file + os.replace)."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WEIGHTS, CONFIG, EMA_WEIGHTS, STATE = "model.safetensors", "config.json", "ema.safetensors", "train_state.pt"
FORMAT = "ddpm-engine-checkpoint/1"


def atomic_write(path: Path, write) -> None:
    """Call write(tmp) on a temporary file beside `path`, then rename it into place."""
    # Write beside the target, then rename: a killed run leaves the old file or the new one, never half of one.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; shipped weights must be readable by everyone
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_weights(state_dict: dict, path: str | Path) -> None:
    """Save a state dict as safetensors (contiguous CPU copies; safetensors refuses shared storage)."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp))


def save_json(obj: dict, path: str | Path) -> None:
    """Write JSON atomically."""
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n"))


def save_torch(obj, path: str | Path) -> None:
    """torch.save atomically (optimizer state for resuming)."""
    atomic_write(Path(path), lambda tmp: torch.save(obj, tmp))


def save_checkpoint(directory: str | Path, model_state: dict, config: dict, ema_state: dict | None = None) -> Path:
    """Write model weights (the EMA ones when given: those are what sampling uses) and config.json; config last."""
    directory = Path(directory)
    save_weights(ema_state if ema_state is not None else model_state, directory / WEIGHTS)
    # config.json is written last, so its presence marks a complete checkpoint.
    save_json({"format": FORMAT, **config}, directory / CONFIG)
    return directory


def read_checkpoint(directory: str | Path) -> tuple[dict, dict]:
    """(config, state_dict) of a checkpoint directory, with clear errors for missing or foreign files."""
    directory = Path(directory)
    cfg_path, w_path = directory / CONFIG, directory / WEIGHTS
    if not cfg_path.is_file() or not w_path.is_file():
        raise FileNotFoundError(f"{directory} is not a ddpm-engine checkpoint: needs {CONFIG} and {WEIGHTS}")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{cfg_path}: not valid JSON ({exc})") from None
    if config.get("format") != FORMAT or "arch" not in config or "model" not in config:
        raise ValueError(f"{cfg_path}: not a {FORMAT} config (needs 'format', 'arch' and 'model')")
    try:
        state = load_file(str(w_path))
    except Exception as exc:  # safetensors raises its own error types for truncated/corrupt files
        raise ValueError(f"{w_path}: unreadable safetensors file ({exc})") from None
    return config, state
