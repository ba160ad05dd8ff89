"""Slots (engine.slots, kernels.fused_step_slots): requests at different steps of different samplers share each U-Net
call, and each one's result equals its own Engine.sample call, whenever it joined and whatever it ran beside."""
import numpy as np
import pytest
import torch

from ddpm_engine import kernels
from ddpm_engine.engine import CosineSchedule, load, step_table
from ddpm_engine.engine.slots import SlotRunner
from ddpm_engine.kernels import initial_torch, step_torch
from ddpm_engine.kernels.fused_step_slots import step_slots_torch

H = W = 8


@pytest.fixture(scope="module")
def engine(tiny_engine_dir):
    return load(tiny_engine_dir, backend="onnxruntime", threads=1)


def tile(seed, rows=1):
    g = np.random.default_rng(seed)
    return (g.uniform(-1, 1, (rows, 1, H, W)).astype(np.float32), g.uniform(-1, 1, (rows, 1, H, W)).astype(np.float32),
            (g.uniform(size=(1, 1, H, W)) > 0.5).astype(np.float32))


# (rows, settings, masked): samplers, time ranges, eta, tau, init and step counts all differ
MIXED = [(1, dict(timesteps=7), True), (2, dict(timesteps=5, sampler="ddim"), False),
         (1, dict(timesteps=9, sampler="ddim", eta=0.5), True), (2, dict(timesteps=6, t_start=0.8, t_end=0.1), False),
         (1, dict(timesteps=4, tau=0.5), True), (1, dict(timesteps=3, init="background"), False),
         (2, dict(timesteps=8, sampler="ddim", tau=0.25), True), (1, dict(timesteps=6, sampler="dpmpp-2m"), True),
         (2, dict(timesteps=5, sampler="dpmpp-2m-sde", spacing="logsnr", t_start=0.6), False)]


def requests(base=0):
    out = []
    for k, (rows, settings, masked) in enumerate(MIXED):
        bg, x_init, mask = tile(base + k, rows)
        out.append(dict(background=bg, mask=mask if masked else None, x_init=x_init if masked else None,
                        seed=1000 + base + k, **settings))
    return out


def run_staggered(runner: SlotRunner, reqs, joins):
    """Admit request k once `joins[k]` steps have run (and slots are free); returns {k: result} and rows per step."""
    parts = [runner.prepare(**r) for r in reqs]
    queue = [(k, p) for k in sorted(range(len(reqs)), key=lambda k: joins[k]) for p in parts[k]]
    results, busy, steps = {}, [], 0
    while queue or runner.jobs:
        while queue and joins[queue[0][0]] <= steps and runner.fits(queue[0][1]):
            runner.admit(queue.pop(0)[1])
        busy.append(runner.busy)
        for job in runner.step():
            results[id(job)] = job.result
        steps += 1
    return {k: torch.cat([results[id(p)] for p in parts[k]]).numpy() for k in range(len(reqs))}, busy


@pytest.mark.parametrize("joins", [[0] * 9, [0, 3, 1, 0, 6, 2, 9, 1, 4], [4, 0, 0, 8, 1, 1, 3, 2, 0]], ids=str)
def test_each_request_equals_its_own_engine_sample_bitwise(engine, one_thread, joins):
    runner = SlotRunner(engine, slots=4)
    reqs = requests()
    got, busy = run_staggered(runner, reqs, joins)
    assert max(busy) == 4 and len(set(busy)) > 2  # requests really shared steps, and the batch size changed
    for k, r in enumerate(reqs):
        np.testing.assert_array_equal(got[k], engine.sample(**r), err_msg=f"request {k}: {MIXED[k]}")


def test_a_request_larger_than_max_batch_runs_in_engine_sample_chunks(engine, one_thread):
    bg, x_init, mask = tile(5, rows=6)  # max_batch 4: chunks of 4 and 2 rows with seeds 7 and 8
    runner = SlotRunner(engine)
    parts = runner.prepare(bg, mask=mask, x_init=x_init, timesteps=4, seed=7)
    assert [p.rows for p in parts] == [4, 2]
    got, _ = run_staggered(runner, [dict(background=bg, mask=mask, x_init=x_init, timesteps=4, seed=7)], [0])
    np.testing.assert_array_equal(got[0], engine.sample(bg, mask=mask, x_init=x_init, timesteps=4, seed=7))


def test_evicted_rows_are_free_at_once_and_the_others_carry_on(engine, one_thread):
    runner = SlotRunner(engine, slots=2)
    a, b = requests()[:2]
    doomed, (kept,) = runner.prepare(**(a | dict(timesteps=50))), runner.prepare(**(b | dict(background=b[
        "background"][:1])))
    runner.admit(doomed[0])
    runner.admit(kept)
    assert not runner.fits(doomed[0])
    runner.step()
    runner.evict(doomed)
    assert runner.busy == 1 and runner.fits(doomed[0])
    while runner.jobs:
        runner.step()
    want = engine.sample(**(b | dict(background=b["background"][:1])))
    np.testing.assert_array_equal(kept.result.numpy(), want)


def test_preempted_jobs_resume_exactly_where_they_left(engine, one_thread):
    """At every step a different subset holds the slots (the rest preempted, their state on the job): each request
    still equals its own Engine.sample bitwise, multistep history and masks included."""
    runner = SlotRunner(engine, slots=4)
    reqs = requests(base=60)
    parts = [runner.prepare(**r) for r in reqs]
    pending, results, rng, preemptions = [p for ps in parts for p in ps], {}, np.random.default_rng(0), 0
    while pending:
        order = list(rng.permutation(len(pending)))
        chosen, rows = [], 0
        for k in order:
            if rows + pending[k].rows <= runner.slots:
                chosen.append(pending[k])
                rows += pending[k].rows
        out = [j for j in runner.jobs if j not in chosen]
        preemptions += len(out)
        runner.preempt(out)
        assert all(j.preempted is not None and j.start < 0 for j in out)
        for job in chosen:
            if job not in runner.jobs:
                runner.admit(job)
        for job in runner.step():
            results[id(job)] = job.result
            pending.remove(job)
    assert preemptions > 10
    for k, r in enumerate(reqs):
        got = torch.cat([results[id(p)] for p in parts[k]]).numpy()
        np.testing.assert_array_equal(got, engine.sample(**r), err_msg=f"request {k}: {MIXED[k]}")


def test_unet_seconds_times_each_row_count_while_idle(engine, one_thread):
    runner = SlotRunner(engine, slots=3)
    seconds = runner.unet_seconds((H, W), rounds=2)
    assert len(seconds) == 3 and all(0 < s < 5 for s in seconds)
    job, = runner.prepare(tile(0)[0], timesteps=2)
    runner.admit(job)
    with pytest.raises(RuntimeError, match="while no job is admitted"):
        runner.unet_seconds((H, W))


def test_x0_previews_are_the_steps_own_x0_and_change_nothing(engine, one_thread):
    """A DPM-Solver++ job's preview after U-Net call k is the x0_hat its step k computes (the kernel stores it as the
    history); a DDPM job's is Ho et al. eq. 15 from the state, the U-Net output and the schedule's alpha_bar at
    the step's time; and the results stay each request's own Engine.sample, bitwise."""
    runner = SlotRunner(engine, slots=4)
    bg, x_init, mask = tile(70)
    reqs = [dict(background=bg, mask=mask, x_init=x_init, timesteps=6, sampler="dpmpp-2m", seed=1),
            dict(background=bg, timesteps=6, seed=2)]
    previews, expected = {0: [], 1: []}, []

    def ddpm_preview(step, x0):  # called after the U-Net call, before the step: the buffers hold x_i and eps_i
        job, b = jobs[1], runner._bufs
        abar = float(engine.schedule.alpha_cumprod(np.float64(job.table.rows[job.step, 0])))
        x, eps = b.x[job.start].double(), b.eps[job.start].double()
        expected.append(((x - np.sqrt(1 - abar) * eps) / np.sqrt(abar)).numpy())
        previews[1].append((step, x0))

    jobs = [runner.prepare(**r)[0] for r in reqs]
    jobs[0].preview_every, jobs[0].on_preview = 2, lambda step, x0: previews[0].append((step, x0))
    jobs[1].preview_every, jobs[1].on_preview = 3, ddpm_preview
    for job in jobs:
        runner.admit(job)
    history = []
    while runner.jobs:
        rows = slice(jobs[0].start, jobs[0].start + 1)
        runner.step()
        if jobs[0].result is None:
            history.append(runner._bufs.x0_prev[rows].numpy().copy())
    assert [step for step, _ in previews[0]] == [2, 4, 6] and [step for step, _ in previews[1]] == [3, 6]
    for step, x0 in previews[0][:2]:
        np.testing.assert_array_equal(x0, history[step - 1])
    for (_, x0), want in zip(previews[1], expected):
        assert np.abs(x0[0] - want).max() < 2e-7 * np.abs(want).max()  # fp32 against fp64: measured 8.4e-8
    for job, r in zip(jobs, reqs):
        np.testing.assert_array_equal(job.result.numpy(), engine.sample(**r))


def test_refusals_name_the_problem(engine):
    with pytest.raises(ValueError, match=r"slots must be in \[1, 4\]"):
        SlotRunner(engine, slots=5)
    runner = SlotRunner(engine, slots=1)
    with pytest.raises(ValueError, match="a request of 2 images cannot run: this server steps at most 1"):
        runner.prepare(tile(0, rows=2)[0])
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        runner.prepare(tile(0)[0], sampler="euler")
    with pytest.raises(ValueError, match="mask given without x_init"):
        runner.prepare(tile(0)[0], mask=tile(0)[2])
    small, = runner.prepare(tile(0)[0], timesteps=3)
    big, = runner.prepare(np.zeros((1, 1, 16, 16), np.float32), timesteps=3)
    runner.admit(small)
    with pytest.raises(ValueError, match=r"does not fit: 1/1 slots busy with size \(8, 8\)"):
        runner.admit(big)


def test_with_the_triton_step_each_request_gets_its_own_philox_noise(tiny_engine_dir, one_thread):
    """A Triton-step engine keys noise in-kernel by (seed, phase, plane): the slots draw it by the request's seed, its
    own step and its own rows (Triton's interpreter on CPU), and each result equals that engine's sample() bitwise."""
    engine = load(tiny_engine_dir, backend="onnxruntime", step="triton", threads=1)
    reqs = requests(base=30)
    got, _ = run_staggered(SlotRunner(engine, slots=4), reqs, [0, 3, 1, 0, 6, 2, 9, 1, 4])
    for k, r in enumerate(reqs):
        np.testing.assert_array_equal(got[k], engine.sample(**r), err_msg=f"request {k}: {MIXED[k]}")


def test_torch_backend_rows_depend_on_the_batch_only_in_the_last_bits(tiny_engine_dir, one_thread):
    """The torch U-Net on CPU is not batch-invariant bitwise (its GEMMs block differently per batch size); ONNX Runtime
    is (the tests above). Per U-Net call rows differ by up to ~4e-7; after up to 9 steps (DDIM at t = 1 amplifies
    x0 100x) slot results were measured within 3.1e-5 of the direct call (values of order 1)."""
    engine = load(tiny_engine_dir, backend="torch")
    reqs = requests(base=50)
    got, _ = run_staggered(SlotRunner(engine, slots=4), reqs, [0, 3, 1, 0, 6, 2, 9, 1, 4])
    worst = max(float(np.abs(got[k] - engine.sample(**r)).max()) for k, r in enumerate(reqs))
    print(f"\ntorch backend: largest |slot - direct| {worst:.3g}")
    assert worst < 2e-4


def mixed_slots(seed=0):
    """Ten slots at different steps of five tables (last step, blending or not, noise or not, x0 history):
    (tables, layout [(table, step, masked)], the step_slots_* arguments)."""
    g = torch.Generator().manual_seed(seed)
    s = CosineSchedule()
    tables = [step_table(s, "ddpm", 5, tau=0.6), step_table(s, "ddim", 3), step_table(s, "ddim", 4, eta=0.3),
              step_table(s, "dpmpp-2m", 5), step_table(s, "dpmpp-2m-sde", 4, spacing="logsnr")]
    layout = [(0, 0, True), (0, 2, True), (0, 4, True), (1, 1, False), (1, 2, True), (2, 0, True), (2, 3, False),
              (3, 2, True), (3, 4, False), (4, 1, True)]
    B, C = len(layout), 2
    randn = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    x, eps, eps1, eps2, x_init = (randn(B, C, H, W) for _ in range(5))
    mask = (torch.rand(B, 1, H, W, generator=g) > 0.5).float().expand(B, C, H, W).contiguous()
    offsets = np.cumsum([0] + [t.timesteps for t in tables])
    as_long = lambda v: torch.tensor(v, dtype=torch.int64)  # noqa: E731
    flags = lambda name: torch.tensor([getattr(tables[t], name) for t, _, _ in layout])  # noqa: E731
    args = dict(x=x, eps_hat=eps, table=torch.cat([t.rows for t in tables]),
                offset=as_long([offsets[t] for t, _, _ in layout]), step=as_long([i for _, i, _ in layout]),
                length=as_long([tables[t].timesteps for t, _, _ in layout]), eps2=eps2, eps1=eps1,
                draws=flags("draws_step_noise"), masked=torch.tensor([m for _, _, m in layout]),
                x0_form=flags("x0_form"), history=flags("history"), x0_prev=randn(B, C, H, W),
                model_in=randn(B, C + 1, H, W), t_in=randn(B), mask=mask, x_init=x_init)
    return tables, layout, args


def copies(args):
    return {k: v.clone() for k, v in args.items()}


def test_per_row_step_equals_the_spec_row_by_row(one_thread):
    """Every slot row, at any step of any table (last step, blending or not, noise or not), equals step_torch."""
    tables, layout, args = mixed_slots()
    got = copies(args)
    step_slots_torch(**got)
    for b, (t, i, masked) in enumerate(layout):
        row = slice(b, b + 1)
        want = {k: args[k][row].clone() for k in ("x", "model_in", "t_in", "x0_prev")}
        step_torch(want["x"], args["eps_hat"][row], tables[t].rows, i,
                   args["eps2"][row] if tables[t].draws_step_noise else None, args["eps1"][row],
                   model_in=want["model_in"], t_in=want["t_in"], mask=args["mask"][row] if masked else None,
                   x_init=args["x_init"][row], x0_form=tables[t].x0_form,
                   x0_prev=want["x0_prev"] if tables[t].history else None)
        for k in ("x", "model_in", "x0_prev", "t_in"):  # x0_prev: the history, x0 of this step or left alone
            assert torch.equal(got[k][row], want[k]), (k, layout[b])


@pytest.mark.skipif(not kernels.HAS_TRITON, reason="needs the triton package (pip install 'ddpm-engine[triton]')")
def test_the_per_slot_triton_kernel_equals_the_spec_with_paired_noise(one_thread):
    from ddpm_engine.kernels.fused_step_slots_triton import step_slots_triton

    _, _, args = mixed_slots(1)
    want, got = copies(args), copies(args)
    step_slots_torch(**want)
    B = args["x"].shape[0]
    zeros = torch.zeros(B, dtype=torch.int64)
    step_slots_triton(**got, seed=zeros, plane0=zeros)
    for k in ("x", "model_in", "x0_prev", "t_in"):
        assert torch.equal(got[k], want[k]), k


@pytest.mark.skipif(not kernels.HAS_TRITON, reason="needs the triton package (pip install 'ddpm-engine[triton]')")
def test_the_per_slot_triton_kernel_draws_each_row_as_step_triton_draws_its_request_alone(one_thread):
    """In-kernel Philox keyed by the row's own seed, phase (its step + 1) and planes (plane0[b] + c): each row equals
    step_triton on that row alone with the same seed and plane_offset, noise and all."""
    from ddpm_engine.kernels import step_triton
    from ddpm_engine.kernels.fused_step_slots_triton import step_slots_triton

    tables, layout, args = mixed_slots(2)
    del args["eps1"], args["eps2"]
    B, C = args["x"].shape[:2]
    seed = torch.tensor([11 + b % 3 for b in range(B)], dtype=torch.int64)  # rows share seeds: planes tell apart
    plane0 = torch.tensor([(b % 2) * C for b in range(B)], dtype=torch.int64)
    got = copies(args)
    step_slots_triton(**got, seed=seed, plane0=plane0)
    for b, (t, i, masked) in enumerate(layout):
        row = slice(b, b + 1)
        want = {k: args[k][row].clone() for k in ("x", "model_in", "t_in", "x0_prev")}
        step_triton(want["x"], args["eps_hat"][row], tables[t].rows, torch.tensor([i]), seed[row],
                    model_in=want["model_in"], t_in=want["t_in"], mask=args["mask"][row] if masked else None,
                    x_init=args["x_init"][row] if masked else None, draws_step_noise=tables[t].draws_step_noise,
                    x0_form=tables[t].x0_form, x0_prev=want["x0_prev"] if tables[t].history else None,
                    plane_offset=int(plane0[b]))
        for k in ("x", "model_in", "x0_prev", "t_in"):
            assert torch.equal(got[k][row], want[k]), (k, layout[b])


@pytest.mark.skipif(not kernels.HAS_TRITON, reason="needs the triton package (pip install 'ddpm-engine[triton]')")
def test_the_per_slot_triton_kernel_refuses_bad_per_row_tensors(one_thread):
    from ddpm_engine.kernels.fused_step_slots_triton import step_slots_triton

    _, _, args = mixed_slots()
    B = args["x"].shape[0]
    ok = dict(seed=torch.zeros(B, dtype=torch.int64), plane0=torch.zeros(B, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"step must be a contiguous torch.int64 \[10\] tensor"):
        step_slots_triton(**(copies(args) | dict(step=args["step"].int())), **ok)
    with pytest.raises(ValueError, match=r"seed must be a contiguous torch.int64 \[10\] tensor"):
        step_slots_triton(**copies(args), seed=torch.zeros(B - 1, dtype=torch.int64), plane0=ok["plane0"])
    with pytest.raises(ValueError, match="paired noise needs both eps1 and eps2"):
        step_slots_triton(**(copies(args) | dict(eps1=None)), **ok)


def test_admission_runs_the_initial_step_for_the_new_rows_only(engine, one_thread):
    runner = SlotRunner(engine, slots=4)
    first, = runner.prepare(**requests()[0])
    runner.admit(first)
    runner.step()
    state = runner._bufs.x[:1].clone()
    second, = runner.prepare(**requests()[1])
    runner.admit(second)  # the batch grows from 1 to 3 rows: the running row moves along unchanged
    assert torch.equal(runner._bufs.x[:1], state)
    rows = slice(second.start, second.start + second.rows)
    want_x = torch.empty(second.rows, 1, H, W)
    eps0 = torch.randn(want_x.shape, generator=torch.Generator().manual_seed(1001))
    initial_torch(want_x, second.table.rows, eps0, model_in=torch.empty(2, 2, H, W), t_in=torch.empty(2))
    assert torch.equal(runner._bufs.x[rows], want_x)


@pytest.mark.cuda
def test_slots_on_cuda_with_the_torch_step(tiny_engine_dir):
    """On CUDA the slots draw each request's noise from its own CUDA generator (the torch step). cuDNN may choose other
    kernels per batch size, so the U-Net rows (and the results) agree to a tolerance, not bitwise."""
    engine = load(tiny_engine_dir, backend="torch", device="cuda", step="torch")
    reqs = requests(base=80)
    got, _ = run_staggered(SlotRunner(engine, slots=4), reqs, [0, 3, 1, 0, 6, 2, 9, 1, 4])
    for k, r in enumerate(reqs):
        np.testing.assert_allclose(got[k], engine.sample(**r), atol=2e-4, err_msg=f"request {k}: {MIXED[k]}")


def test_each_slot_count_keeps_its_per_row_tensors_so_its_cuda_graph_stays_valid(engine, one_thread):
    """A slot count's captured graph reads that buffer set's per-row tensors: a new mix of requests at the same count
    is copied into them (same addresses, graph kept); only a longer concatenated table reallocates, dropping the
    graph so that it is captured again. Checked here on the CPU, where the same layout code runs."""
    runner = SlotRunner(engine, slots=4)
    reqs = requests()
    a, = runner.prepare(**reqs[0])  # 1 row, 7 steps
    b, = runner.prepare(**reqs[1])  # 2 rows, 5 steps
    runner.admit(a)
    runner.admit(b)
    bufs = runner._bufs
    addresses = {k: t.data_ptr() for k, t in runner._per_row.items()}
    bufs.graphs["slots"] = graph = object()  # what capture_step would have stored for this count
    runner.step()
    runner.evict([a])
    c, = runner.prepare(**reqs[5])  # 1 row, 3 steps: 3 rows again, a shorter table than before
    runner.admit(c)
    assert runner._bufs is bufs and bufs.graphs["slots"] is graph
    assert {k: t.data_ptr() for k, t in runner._per_row.items()} == addresses
    assert runner._per_row["offset"].tolist() == [0, 0, 5] and runner._per_row["step"].tolist() == [1, 1, 0]
    runner.evict([c])
    d, = runner.prepare(**(reqs[0] | dict(timesteps=40)))  # 5 + 40 rows do not fit the 16-row table
    runner.admit(d)
    assert runner._per_row["table"].shape[0] == 64 and "slots" not in bufs.graphs


@pytest.mark.cuda
def test_slot_graphs_replay_what_the_slots_compute_uncaptured(tiny_engine_dir):
    """With the Triton step on CUDA the slots replay one captured graph per slot count, for any mix of requests:
    the results equal the same schedule stepped without graphs. (Not yet run on a GPU.)"""
    engine = load(tiny_engine_dir, backend="torch", device="cuda")
    assert engine.runner.step_impl == "triton" and engine.runner.cuda_graphs
    reqs, joins = requests(base=80), [0, 3, 1, 0, 6, 2, 9, 1, 4]
    graphed = SlotRunner(engine, slots=4)
    got, busy = run_staggered(graphed, reqs, joins)
    want, _ = run_staggered(SlotRunner(engine, slots=4, cuda_graphs=False), reqs, joins)
    for k in range(len(reqs)):
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5, err_msg=f"request {k}: {MIXED[k]}")
    assert all("slots" in graphed._runner.buffers(n, H, W).graphs for n in set(busy))
