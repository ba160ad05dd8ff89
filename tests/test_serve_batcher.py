"""Dynamic batching: Engine.sample(segments=...) keeps each request's result exact; the Batcher groups, bounds and
drains."""
import concurrent.futures
import threading
import time

import numpy as np
import pytest
import torch

from ddpm_engine.engine import load
from ddpm_engine.serve.batcher import Batcher, Job, QueueFull, ShuttingDown, run_group, split_groups

H = W = 8


@pytest.fixture(scope="module")
def engine(tiny_engine_dir):
    return load(tiny_engine_dir, backend="onnxruntime")


def arrays(rows, seed, h=H, w=W):
    g = np.random.default_rng(seed)
    bg = g.uniform(-1, 1, (rows, 1, h, w)).astype(np.float32)
    x_init = g.uniform(-1, 1, (rows, 1, h, w)).astype(np.float32)
    mask = (g.uniform(size=(1, 1, h, w)) > 0.5).astype(np.float32)
    return bg, mask, x_init


def test_segments_give_each_block_the_result_of_its_own_call(engine):
    parts = [arrays(r, s) for r, s in ((1, 0), (2, 1), (1, 2))]
    seeds = [5, 7, 9]
    bg = np.concatenate([p[0] for p in parts])
    x_init = np.concatenate([p[2] for p in parts])
    mask = np.concatenate([np.broadcast_to(p[1], p[0].shape) for p in parts])
    for sampler in ("ddpm", "ddim", "dpmpp-2m", "dpmpp-2m-sde"):  # the 2M samplers' x0 history is per row
        together = engine.sample(bg, mask=mask, x_init=x_init, timesteps=6, sampler=sampler,
                                 segments=[(1, 5), (2, 7), (1, 9)])
        alone = [engine.sample(b, mask=m, x_init=x, timesteps=6, sampler=sampler, seed=s)
                 for (b, m, x), s in zip(parts, seeds)]
        np.testing.assert_array_equal(together, np.concatenate(alone))  # bitwise: noise and U-Net rows alike


@pytest.mark.parametrize("kwargs, match", [
    ({"segments": [(1, 5), (2, 7)]}, "summing to the batch size 4"),
    ({"segments": [(4, -1)]}, r"segment seed must be an integer in \[0, 2\^63\)"),
    ({"segments": [(4, 1)], "generator": torch.Generator()}, "give segments or generator, not both"),
    ({"segments": [3]}, r"segments must be a sequence of \(rows, seed\) pairs"),
])
def test_bad_segments_are_refused(engine, kwargs, match):
    with pytest.raises(ValueError, match=match):
        engine.sample(np.zeros((4, 1, H, W), np.float32), timesteps=2, **kwargs)


def test_segments_cannot_exceed_the_built_batch(engine):
    with pytest.raises(ValueError, match="at most max_batch=4 run in one call"):
        engine.sample(np.zeros((6, 1, H, W), np.float32), timesteps=2, segments=[(3, 1), (3, 2)])


def test_split_groups_keeps_keys_apart_and_rows_bounded():
    a = [Job(np.zeros((r, 1, H, W), np.float32), timesteps=t) for r, t in ((1, 5), (2, 5), (1, 6), (2, 5), (5, 5))]
    groups = split_groups(a, max_rows=4)
    assert [[a.index(j) for j in g] for g in groups] == [[0, 1], [2], [3], [4]]


# Settings that must never share an engine call; the first two differ only in the sampler.
MIXED = [dict(sampler="ddpm"), dict(sampler="ddim"), dict(sampler="ddim", eta=0.5),
         dict(sampler="ddpm", t_start=0.8, t_end=0.1)]


def test_batcher_batches_mixed_requests_and_each_result_is_exact(engine):
    sizes = []
    batcher = Batcher(engine, max_queue=16, window_s=0.2, on_batch=lambda rows, s: sizes.append(rows))
    try:
        jobs = []
        for k in range(12):  # samplers, t_start/t_end, eta, masked or not, rows 1 or 2, all seeds different
            bg, mask, x_init = arrays(1 + k % 2, 10 + k)
            masked = k % 3 == 0
            jobs.append(Job(bg, mask=mask if masked else None, x_init=x_init if masked else None, timesteps=4,
                            seed=100 + k, **MIXED[k % 4]))
        futures = [batcher.submit(j) for j in jobs]
        results = [f.result(timeout=60) for f in futures]
    finally:
        batcher.close()
    for job, got in zip(jobs, results):
        want = engine.sample(job.background, mask=job.mask, x_init=job.x_init, timesteps=4, seed=job.seed,
                             sampler=job.sampler, t_start=job.t_start, t_end=job.t_end, eta=job.eta)
        np.testing.assert_array_equal(got, want, err_msg=f"{job.sampler} {job.t_start} {job.t_end} {job.eta}")
    assert sum(sizes) == sum(j.rows for j in jobs) and len(sizes) < len(jobs)  # requests shared engine calls


def test_full_queue_refuses_and_close_finishes_or_rejects(engine):
    gate = threading.Event()
    original = engine.sample

    class Slow:  # an engine whose first call blocks until the test lets it go
        runner, max_batch, c_out = engine.runner, engine.max_batch, engine.c_out

        def sample(self, *args, **kwargs):
            gate.wait(30)
            return original(*args, **kwargs)

    batcher = Batcher(Slow(), max_queue=2, window_s=0.0)
    bg = arrays(1, 0)[0]
    running = batcher.submit(Job(bg, timesteps=2, seed=1))
    deadline = time.monotonic() + 10
    while batcher.depth and time.monotonic() < deadline:  # the worker has taken the first job
        time.sleep(0.01)
    queued = [batcher.submit(Job(bg, timesteps=3, seed=s)) for s in (2, 3)]
    with pytest.raises(QueueFull) as full:
        batcher.submit(Job(bg, timesteps=2, seed=4))
    assert full.value.retry_after_s >= 1
    queued[1].cancel()  # a client that went away: never run
    closer = threading.Thread(target=batcher.close, args=(0.2,))
    closer.start()
    time.sleep(0.3)
    with pytest.raises(ShuttingDown):
        batcher.submit(Job(bg, timesteps=2, seed=5))
    gate.set()
    closer.join(30)
    assert running.result(timeout=30).shape == (1, 1, H, W)
    # after the drain timeout, what was still queued is rejected, not left hanging
    with pytest.raises((ShuttingDown, concurrent.futures.CancelledError)):
        queued[1].result(timeout=1)
    with pytest.raises(ShuttingDown, match="shut down before this request ran"):
        queued[0].result(timeout=1)


def test_without_host_noise_a_group_runs_one_call_per_request(engine):
    calls = []

    class TritonStep:  # the CUDA path keys noise in-kernel: segments are not available there
        runner = type("R", (), {"step_impl": "triton"})()
        max_batch, c_out = engine.max_batch, engine.c_out

        def sample(self, background, **kwargs):
            calls.append((background.shape[0], kwargs.get("segments"), kwargs.get("seed")))
            return engine.sample(background, **kwargs)

    jobs = [Job(arrays(1 + k, k)[0], timesteps=3, seed=20 + k) for k in range(2)]
    results = run_group(TritonStep(), jobs)
    assert calls == [(1, None, 20), (2, None, 21)]
    for job, got in zip(jobs, results):
        np.testing.assert_array_equal(got, engine.sample(job.background, timesteps=3, seed=job.seed))


def test_one_bad_job_does_not_fail_its_group(engine):
    good = Job(arrays(1, 0)[0], timesteps=3, seed=1)
    bad = Job(arrays(1, 1)[0], mask=np.full((1, 1, H, W), 2.0, np.float32), x_init=arrays(1, 1)[2], timesteps=3)
    bad2 = Job(arrays(1, 2)[0], mask=np.ones((1, 1, H, W), np.float32), x_init=arrays(1, 2)[2], timesteps=3, seed=4)
    results = run_group(engine, [bad, bad2])
    assert isinstance(results[0], ValueError) and "mask values must lie in [0, 1]" in str(results[0])
    np.testing.assert_array_equal(results[1], engine.sample(bad2.background, mask=bad2.mask, x_init=bad2.x_init,
                                                            timesteps=3, seed=4))
    np.testing.assert_array_equal(run_group(engine, [good])[0], engine.sample(good.background, timesteps=3, seed=1))
