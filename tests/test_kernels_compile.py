"""The fused step kernels compile for sm_90 (H100/H200) without a GPU: catches what the interpreter accepts but
the compiler rejects (every kernel with each integer argument at 1, at a multiple of 16 and at another value: the
specialisations the JIT makes), and checks the generated PTX for what the interpreter cannot show (no mask or Philox
work on paths that do not need it, 128-bit vector accesses on aligned tiles).

Runs in a subprocess without TRITON_INTERPRET (the @triton.jit decorator picks interpreter or compiler at
import time, and the other kernel tests import triton in interpreter mode on CPU-only machines).
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

triton = pytest.importorskip("triton")

SCRIPT = textwrap.dedent(r"""
    import json, re, torch
    from ddpm_engine.kernels import fused_step_triton as k
    from ddpm_engine.kernels import fused_step_slots_triton as ks

    def params_loaded(ptx, kernel):
        return {int(n) for n in re.findall(r"ld\.param\.\w+\s+%\w+,\s*\[" + kernel + r"_param_(\d+)\]", ptx)}

    out = {}
    step_args = list(k._step_kernel.arg_names)
    configs = {
        "ddpm_mask_bf16": dict(model_dtype=torch.bfloat16, eps_dtype=torch.bfloat16),
        "ddim_plain_fp32": dict(model_dtype=torch.float32, eps_dtype=torch.float32, has_mask=False,
                                has_noise=False, has_out=False),
        "ddim_mask_fp16": dict(model_dtype=torch.float16, eps_dtype=torch.float16, has_noise=False),
        "ddpm_plain_fp32": dict(model_dtype=torch.float32, eps_dtype=torch.float32, has_mask=False),
        "paired_mask": dict(paired_noise=True),
        "unaligned": dict(ints=dict(mi_sb=2 * 90300, mi_sc=90300, m_sb=90300, m_sc=90300, HW=90300)),
        "large_offset": dict(ints=dict(mi_sb=2**31 + 2 * 90000, plane_offset=2**40)),
        "precise_math": dict(fast_math=False),
        "x0_form_fp32": dict(model_dtype=torch.float32, eps_dtype=torch.float32, has_mask=False, has_noise=False,
                             has_x0=True),
        "dpmpp_2m_mask_bf16": dict(has_noise=False, has_x0=True, has_hist=True),
        "dpmpp_2m_sde_three_channels": dict(has_x0=True, has_hist=True, ints=dict(C=3)),
        "dpmpp_2m_unaligned": dict(has_x0=True, has_hist=True,
                                   ints=dict(mi_sb=2 * 90300, mi_sc=90300, m_sb=90300, m_sc=90300, HW=90300)),
    }
    for name, kw in configs.items():
        ck = k.compile_step_kernel(90, **kw)
        ptx = ck.asm["ptx"]
        loaded = params_loaded(ptx, "_step_kernel")
        out[name] = dict(
            cubin=len(ck.asm["cubin"]), target=ck.asm["ptx"].split(".target")[1].split()[0],
            philox="mul.hi.u32" in ptx, log="lg2.approx" in ptx, v4_loads="ld.global.v4" in ptx,
            fast_trig="sin.approx" in ptx and "cos.approx" in ptx, lines=len(ptx.splitlines()),
            loads_mask=step_args.index("mask_ptr") in loaded, loads_x_init=step_args.index("x_init_ptr") in loaded,
            loads_seed=step_args.index("seed_ptr") in loaded,
            loads_x0_prev=step_args.index("x0_prev_ptr") in loaded,
        )
    for name, kw in {"initial_all": {}, "initial_plain_fp16": dict(model_dtype=torch.float16, has_mask=False,
                                                                    has_init=False)}.items():
        ck = k.compile_initial_kernel(90, **kw)
        out[name] = dict(cubin=len(ck.asm["cubin"]), philox="mul.hi.u32" in ck.asm["ptx"])
    for name, kw in {"slots_bf16": {}, "slots_paired_fp32": dict(model_dtype=torch.float32, eps_dtype=torch.float32,
                                                                 paired_noise=True),
                     "slots_three_channels_unaligned": dict(ints=dict(C=3, HW=90300, mi_sb=4 * 90300,
                                                                      mi_sc=90300))}.items():
        ck = ks.compile_step_slots_kernel(90, **kw)
        out[name] = dict(cubin=len(ck.asm["cubin"]), target=ck.asm["ptx"].split(".target")[1].split()[0],
                         philox="mul.hi.u32" in ck.asm["ptx"])
    # Each integer argument at 1 (a constexpr unless do_not_specialize), at a multiple of 16 and at another value.
    failures = {}
    for compile_fn, ints in ((k.compile_step_kernel, k.STEP_INTS), (k.compile_initial_kernel, k.INITIAL_INTS),
                             (k.compile_noise_kernel, k.NOISE_INTS),
                             (ks.compile_step_slots_kernel, ks.STEP_SLOTS_INTS)):
        for name in ints:
            for value in (1, 4096, 7):
                try:
                    compile_fn(90, ints={name: value})
                except Exception as exc:  # noqa: BLE001 - reported per case by the test
                    failures[f"{compile_fn.__name__} {name}={value}"] = str(exc).strip().splitlines()[-1][:300]
    out["specialisation_failures"] = failures
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton build has no NVIDIA backend, so it cannot compile for CUDA targets")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache"))  # really compile, every run
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_every_kernel_compiles_with_each_integer_argument_at_1_at_16k_and_at_another_value(compiled):
    assert compiled["specialisation_failures"] == {}


def test_every_kernel_variant_compiles_to_an_sm90_cubin(compiled):
    compiled = {k: v for k, v in compiled.items() if k != "specialisation_failures"}
    for name, info in compiled.items():
        assert info["cubin"] > 1000, name
    assert all(info["target"].startswith("sm_90") for name, info in compiled.items() if "target" in info)


def test_plain_ddim_path_reads_no_mask_and_draws_no_noise(compiled):
    plain = compiled["ddim_plain_fp32"]
    assert not plain["philox"] and not plain["log"]
    assert not plain["loads_mask"] and not plain["loads_x_init"] and not plain["loads_seed"]


def test_masked_ddim_draws_only_the_blend_noise_and_ddpm_draws_without_the_mask(compiled):
    assert compiled["ddim_mask_fp16"]["philox"] and compiled["ddim_mask_fp16"]["loads_mask"]
    assert compiled["ddpm_plain_fp32"]["philox"] and not compiled["ddpm_plain_fp32"]["loads_mask"]
    assert not compiled["paired_mask"]["philox"] and not compiled["paired_mask"]["loads_seed"]
    assert compiled["initial_all"]["philox"] and compiled["initial_plain_fp16"]["philox"]


def test_noise_uses_the_gpu_approximate_log_sin_cos(compiled):
    ddpm = compiled["ddpm_mask_bf16"]
    assert ddpm["log"] and ddpm["fast_trig"]
    assert not compiled["precise_math"]["fast_trig"]
    assert ddpm["lines"] < compiled["precise_math"]["lines"] / 2  # libdevice's precise sin/cos/log are long


def test_the_per_slot_kernel_draws_in_kernel_unless_given_paired_noise(compiled):
    assert compiled["slots_bf16"]["philox"] and compiled["slots_three_channels_unaligned"]["philox"]
    assert not compiled["slots_paired_fp32"]["philox"]


def test_aligned_tiles_get_128_bit_vector_accesses(compiled):
    assert compiled["ddim_plain_fp32"]["v4_loads"]
    assert compiled["ddpm_mask_bf16"]["v4_loads"]


def test_x0_work_and_the_history_buffer_compile_only_where_flagged(compiled):
    assert not any(compiled[name]["loads_x0_prev"] for name in ("ddpm_mask_bf16", "ddim_plain_fp32", "x0_form_fp32"))
    assert compiled["dpmpp_2m_mask_bf16"]["loads_x0_prev"] and compiled["dpmpp_2m_sde_three_channels"]["loads_x0_prev"]
    # the seed's step is the same code as before the x0 columns existed: the x0-form variant is longer
    assert compiled["ddim_plain_fp32"]["lines"] < compiled["x0_form_fp32"]["lines"]
