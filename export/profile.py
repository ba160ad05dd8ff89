"""Batch and shape profile (min/opt/max), parsed from --batch/--size, and the per-input shapes TensorRT needs."""
from __future__ import annotations

from dataclasses import asdict, dataclass

HW = tuple[int, int]


@dataclass(frozen=True)
class Profile:
    """Batch (min, opt, max) and image size ((h, w) min, opt, max) an engine is built for."""

    batch: tuple[int, int, int] = (1, 1, 8)
    sizes: tuple[HW, HW, HW] = ((64, 64), (64, 64), (64, 64))
    dynamic_hw: bool = True  # False: the ONNX graph is static in H/W (sizes must then be all equal)
    multiple: int = 1  # H and W must be multiples of this (a U-Net that halves them k times needs 2^k)

    def __post_init__(self):
        b = tuple(int(v) for v in self.batch)
        if len(b) != 3 or min(b) < 1 or not b[0] <= b[1] <= b[2]:
            raise ValueError(f"batch must be MIN:OPT:MAX with 1 <= MIN <= OPT <= MAX, got {self.batch!r}")
        s = tuple((int(h), int(w)) for h, w in self.sizes)
        if len(s) != 3 or min(min(hw) for hw in s) < 1:
            raise ValueError(f"size must be HxW or MIN:OPT:MAX sizes of positive HxW, got {self.sizes!r}")
        for i in (0, 1):
            if not s[0][i] <= s[1][i] <= s[2][i]:
                raise ValueError(f"size must satisfy MIN <= OPT <= MAX in both H and W, got "
                                 f"{':'.join(f'{h}x{w}' for h, w in s)}")
        bad = [f"{h}x{w}" for h, w in s if h % self.multiple or w % self.multiple]
        if bad:
            raise ValueError(f"size {bad[0]} is not a multiple of {self.multiple} in H and W, which this U-Net needs "
                             "(it halves them in its down blocks and concatenates skips of equal size)")
        object.__setattr__(self, "batch", b)
        object.__setattr__(self, "sizes", s)

    @property
    def opt_size(self) -> HW:
        return self.sizes[1]

    def static_at(self, hw: HW) -> "Profile":
        """The same batch range at one fixed size (for graphs that cannot have dynamic H/W)."""
        return Profile(self.batch, (hw, hw, hw), dynamic_hw=False, multiple=self.multiple)

    def as_dict(self) -> dict:
        d = asdict(self)
        names = ("min", "opt", "max")
        return {"batch": dict(zip(names, self.batch)),
                "height": dict(zip(names, (s[0] for s in self.sizes))),
                "width": dict(zip(names, (s[1] for s in self.sizes))),
                "dynamic_hw": d["dynamic_hw"], **({"multiple": self.multiple} if self.multiple != 1 else {})}

    @classmethod
    def from_dict(cls, d: dict) -> "Profile":
        names = ("min", "opt", "max")
        return cls(tuple(d["batch"][n] for n in names),
                   tuple((d["height"][n], d["width"][n]) for n in names), bool(d.get("dynamic_hw", True)),
                   int(d.get("multiple", 1)))

    def accepts(self, batch: int, hw: HW) -> bool:
        """Whether a (batch, H, W) lies inside the profile."""
        lo, hi = self.sizes[0], self.sizes[2]
        return (self.batch[0] <= batch <= self.batch[2] and lo[0] <= hw[0] <= hi[0] and lo[1] <= hw[1] <= hi[1])


def parse_batch(text: str | int | tuple) -> tuple[int, int, int]:
    """'8' -> (8, 8, 8); '1:4:8' -> (1, 4, 8); '1:8' -> (1, 8, 8) (opt = max)."""
    if isinstance(text, int):
        return (text, text, text)
    if isinstance(text, (tuple, list)):
        return tuple(int(v) for v in text)  # type: ignore[return-value]
    parts = str(text).split(":")
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"--batch must be N or MIN:OPT:MAX (e.g. 1:4:8), got {text!r}") from None
    if len(vals) == 1:
        return (vals[0],) * 3
    if len(vals) == 2:
        return (vals[0], vals[1], vals[1])
    if len(vals) == 3:
        return tuple(vals)  # type: ignore[return-value]
    raise ValueError(f"--batch must be N or MIN:OPT:MAX (e.g. 1:4:8), got {text!r}")


def _parse_hw(text: str) -> HW:
    t = text.strip().lower()
    if "x" in t:
        h, _, w = t.partition("x")
    else:
        h = w = t
    try:
        return int(h), int(w)
    except ValueError:
        raise ValueError(f"--size must be HxW (e.g. 300x300) or MIN:OPT:MAX sizes (e.g. 32x32:300x300:304x304), "
                         f"got {text!r}") from None


def parse_size(text) -> tuple[HW, HW, HW]:
    """'300x300' -> that size for min/opt/max; '32x32:64x64:300x300' -> a range; also (h, w) or ((h,w),...)."""
    if isinstance(text, (tuple, list)):
        if len(text) == 2 and all(isinstance(v, int) for v in text):
            return (tuple(text),) * 3  # type: ignore[return-value]
        return tuple(tuple(int(v) for v in hw) for hw in text)  # type: ignore[return-value]
    parts = [_parse_hw(p) for p in str(text).split(":")]
    if len(parts) == 1:
        return (parts[0],) * 3  # type: ignore[return-value]
    if len(parts) == 2:
        return (parts[0], parts[1], parts[1])
    if len(parts) == 3:
        return tuple(parts)  # type: ignore[return-value]
    raise ValueError(f"--size must be HxW or MIN:OPT:MAX sizes, got {text!r}")


def tensorrt_shapes(profile: Profile, c_in: int) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """Per-input (min, opt, max) shapes for `IOptimizationProfile.set_shape`."""
    sample = tuple((b, c_in, h, w) for b, (h, w) in zip(profile.batch, profile.sizes))
    timestep = tuple((b,) for b in profile.batch)
    return {"sample": sample, "timestep": timestep}  # type: ignore[dict-item]
