"""Step-level batching in the service (serve.scheduler): mixed requests share steps and each gets exactly its own
Engine.sample result; cancellation and deadlines free a slot within one step; a full queue is a JSON 503."""
import concurrent.futures
import json
import socket
import threading
import time

import httpx
import numpy as np
import pytest

from ddpm_engine.engine import load
from ddpm_engine.serve.batcher import Job, QueueFull, RequestTimeout, ShuttingDown
from ddpm_engine.serve.scheduler import StepScheduler, choose_step_rows

from test_serve_http import URL, Running, infer_json, output, tile


@pytest.fixture(scope="module")
def engine(tiny_engine_dir):
    return load(tiny_engine_dir, backend="onnxruntime")


def until(condition, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


class Steps:
    """on_batch hook: counts steps and records the busy rows of each."""

    def __init__(self):
        self.rows = []

    def __call__(self, rows, seconds):
        self.rows.append(rows)


def direct(engine, job: Job):
    return engine.sample(job.background, mask=job.mask, x_init=job.x_init, timesteps=job.timesteps,
                         sampler=job.sampler, t_start=job.t_start, t_end=job.t_end, eta=job.eta, seed=job.seed)


def test_cancelling_a_running_request_frees_its_slot_within_one_step(engine):
    steps = Steps()
    scheduler = StepScheduler(engine, max_batch=1, on_batch=steps)
    try:
        long = Job(tile(1)[0], timesteps=1000, seed=1)
        scheduler.submit(long)
        until(lambda: len(steps.rows) >= 3, what="the long request to run")
        done_at_cancel = len(steps.rows)
        assert long.future.cancel()  # what the service does when the client disconnects
        until(lambda: scheduler.slots.busy == 0, 10, "the slot to be freed")
        time.sleep(0.1)
        assert len(steps.rows) - done_at_cancel <= 1  # the step running at the cancel may finish, no other
        assert scheduler.depth == 0 and not scheduler._running
        waiting = Job(tile(2)[0], timesteps=5, seed=2)
        np.testing.assert_array_equal(scheduler.submit(waiting).result(30), direct(engine, waiting))
    finally:
        scheduler.close()


def test_a_short_request_overtakes_running_long_ones_which_resume_exactly(engine):
    """Shortest remaining work first: a 5-step request that arrives while two long ones hold both slots runs at the
    next step boundary (one long request is preempted), and the long ones still return their own exact results."""
    order, steps = [], Steps()
    scheduler = StepScheduler(engine, max_batch=2, step_rows=2, on_batch=steps)
    try:
        longs = [Job(tile(30 + k)[0], timesteps=300, seed=30 + k) for k in range(2)]
        for job in longs:
            scheduler.submit(job).add_done_callback(lambda f, job=job: order.append(job))
        until(lambda: len(steps.rows) >= 5, what="the long requests to run")
        short = Job(tile(32)[0], timesteps=5, seed=32, mask=tile(32)[2], x_init=tile(32)[1])
        scheduler.submit(short).add_done_callback(lambda f: order.append(short))
        until(lambda: len(order) == 3, 60, "all three requests")
        assert order[0] is short
        for job in [short, *longs]:
            np.testing.assert_array_equal(job.future.result(), direct(engine, job))
        assert sum(steps.rows) == 2 * 300 + 5  # every row step ran once: preemption repeated nothing
    finally:
        scheduler.close()


def test_a_short_request_finishes_within_its_own_steps_after_arriving(engine):
    steps, finished_at = Steps(), []
    scheduler = StepScheduler(engine, max_batch=2, step_rows=2, on_batch=steps)
    try:
        longs = [Job(tile(40 + k)[0], timesteps=400, seed=40 + k) for k in range(2)]
        for job in longs:
            scheduler.submit(job)
        until(lambda: len(steps.rows) >= 3, what="the long requests to run")
        short = Job(tile(42)[0], timesteps=6, seed=42)
        at_submit = len(steps.rows)
        scheduler.submit(short).add_done_callback(lambda f: finished_at.append(len(steps.rows)))
        until(lambda: finished_at, 60, "the short request")
        assert finished_at[0] - at_submit <= short.timesteps + 1  # the step under way at arrival, then its own
    finally:
        for job in longs:
            job.future.cancel()
        scheduler.close()


def test_a_stream_of_short_requests_does_not_starve_a_long_one(engine):
    """Priority is arrival + remaining steps: short requests that keep arriving overtake a long one only while they
    arrived before its own length had passed, so it finishes long before the stream ends (pure SRPT: last)."""
    steps, finished = Steps(), []
    scheduler = StepScheduler(engine, max_batch=1, on_batch=steps)
    shorts = [Job(tile(60 + k)[0], timesteps=10, seed=60 + k) for k in range(12)]

    def submit_next(_=None):  # a new short request as soon as the previous one ends: always one waiting
        if shorts:
            job = shorts.pop(0)
            scheduler.submit(job).add_done_callback(lambda f, job=job: (finished.append(job), submit_next()))

    try:
        long = Job(tile(59)[0], timesteps=40, seed=59)
        scheduler.submit(long).add_done_callback(lambda f: finished.append(long))
        until(lambda: len(steps.rows) >= 3, what="the long request to run")
        submit_next()
        until(lambda: len(finished) == 13, 60, "every request")
        assert 2 <= finished.index(long) <= 5  # overtaken by the first few short requests only
        np.testing.assert_array_equal(long.future.result(), direct(engine, long))
    finally:
        scheduler.close()


def test_cancelling_a_preempted_request_drops_it_without_another_step(engine):
    steps = Steps()
    scheduler = StepScheduler(engine, max_batch=1, on_batch=steps)
    try:
        long = Job(tile(45)[0], timesteps=1000, seed=45)
        scheduler.submit(long)
        until(lambda: len(steps.rows) >= 3, what="the long request to run")
        short = Job(tile(46)[0], timesteps=200, seed=46)
        scheduler.submit(short)
        until(lambda: scheduler.slots.jobs and scheduler.slots.jobs[0].remaining < 200, what="the short one to run")
        ran_long = 1000 - next(p for p in scheduler._running if p.table.timesteps == 1000).remaining
        assert long.future.cancel()  # while preempted
        np.testing.assert_array_equal(short.future.result(30), direct(engine, short))
        until(lambda: not scheduler._running and scheduler.depth == 0, 10, "the cancelled request to be dropped")
        time.sleep(0.1)
        assert len(steps.rows) == ran_long + 200  # it never ran again
    finally:
        scheduler.close()


@pytest.mark.parametrize("seconds,rows", [
    ([1.0, 2.0, 3.0, 4.0], 4),  # a row costs the same in any batch: all slots
    ([1.0, 1.02, 1.05, 1.1], 4),  # batching is nearly free (a GPU): all slots
    ([1.0, 1.2, 3.6, 4.2], 2),  # cheapest per row at 2, wider steps cost more per row
    ([1.0, 2.0, 3.0, 4.06], 4),  # 1.5 % more per row at 4: inside the tolerance
    ([1.0, 2.0, 3.0, 4.1], 3),  # 2.5 % more per row at 4: one row fewer
    ([1.0, 2.5, 3.6, 5.0], 1),  # a lone row is the cheapest
])
def test_step_rows_are_the_most_within_tolerance_of_the_cheapest_per_row(seconds, rows):
    assert choose_step_rows(seconds) == rows


def test_step_rows_are_measured_once_per_image_size(engine):
    scheduler = StepScheduler(engine, max_batch=4)
    try:
        job = Job(tile(50)[0], timesteps=3, seed=50)
        np.testing.assert_array_equal(scheduler.submit(job).result(30), direct(engine, job))
        (size, (rows, seconds)), = scheduler.measured.items()
        assert size == (8, 8) and len(seconds) == 4 and rows == choose_step_rows(seconds)
        scheduler.submit(Job(tile(51)[0], timesteps=2, seed=51)).result(30)
        assert scheduler.measured[size][1] is seconds  # not measured again
        with pytest.raises(ValueError, match=r"step rows \(--step-rows\) must be in \[1, 4\]"):
            StepScheduler(engine, max_batch=4, step_rows=5)
    finally:
        scheduler.close()


def test_a_running_request_past_its_deadline_is_stopped_and_told(engine):
    steps = Steps()
    scheduler = StepScheduler(engine, max_batch=2, on_batch=steps)
    try:
        late = Job(tile(3)[0], timesteps=1000, seed=3, deadline=time.monotonic() + 0.3)
        scheduler.submit(late)
        with pytest.raises(RequestTimeout, match="passed its deadline while running"):
            late.future.result(30)
        n = len(steps.rows)
        assert n < 1000 and scheduler.slots.busy == 0
        time.sleep(0.1)
        assert len(steps.rows) == n  # nothing runs once it is gone
    finally:
        scheduler.close()


def test_another_image_size_waits_for_a_batch_of_its_own(engine):
    sizes = []
    scheduler = StepScheduler(engine, max_batch=4, on_batch=lambda rows, s: sizes.append(scheduler.slots.size))
    try:
        jobs = [Job(tile(10)[0], timesteps=30, seed=10), Job(tile(11, h=16, w=16)[0], timesteps=4, seed=11),
                Job(tile(12)[0], timesteps=3, seed=12)]
        for job in jobs:
            scheduler.submit(job)
        for job in jobs:
            np.testing.assert_array_equal(job.future.result(30), direct(engine, job))
    finally:
        scheduler.close()
    assert (16, 16) in sizes  # it ran, after the 8x8 batch drained, not mixed into it (admit would refuse)


def test_full_queue_and_shutdown(engine):
    scheduler = StepScheduler(engine, max_queue=1, max_batch=1)
    with engine.lock:  # holds the worker at its first admission: nothing runs, the queue fills
        first = scheduler.submit(Job(tile(4)[0], timesteps=3, seed=4))
        until(lambda: scheduler.depth == 0, what="the first request to leave the queue")
        queued = Job(tile(5)[0], timesteps=3, seed=5)
        scheduler.submit(queued)
        with pytest.raises(QueueFull) as refused:
            scheduler.submit(Job(tile(6)[0], timesteps=3))
        assert refused.value.retry_after_s >= 1
        with pytest.raises(ValueError, match="unknown sampler 'euler'"):
            scheduler.submit(Job(tile(6)[0], sampler="euler"))  # refused before it takes a place in the queue
    np.testing.assert_array_equal(queued.future.result(30), direct(engine, queued))
    assert first.result(30).shape == (1, 1, 8, 8)
    scheduler.close()
    with pytest.raises(ShuttingDown):
        scheduler.submit(Job(tile(7)[0], timesteps=3))


# -- through the HTTP API ------------------------------------------------------------------------

SETTINGS = [dict(timesteps=20), dict(timesteps=7, sampler="ddim"), dict(timesteps=12, sampler="ddim", eta=0.5),
            dict(timesteps=9, t_start=0.8, t_end=0.1), dict(timesteps=3), dict(timesteps=15, sampler="ddpm")]


def mixed_requests(n, base):
    out = []
    for k in range(n):
        bg, x_init, mask = tile(base + k, rows=1 + (k % 4 == 1))
        masked = k % 3 != 2
        out.append((bg, mask if masked else None, x_init if masked else None, SETTINGS[k % len(SETTINGS)], base + k))
    return out


def triton_infer(port, bg, mask, x_init, settings, seed):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{port}", network_timeout=120)
    try:
        inputs = []
        for name, array in (("background", bg), ("mask", mask), ("x_init", x_init)):
            if array is not None:
                tensor = httpclient.InferInput(name, list(array.shape), "FP32")
                tensor.set_data_from_numpy(array, binary_data=True)
                inputs.append(tensor)
        result = client.infer("tiny", inputs, parameters=dict(settings, seed=seed))
        return result.as_numpy("sample")
    finally:
        client.close()


def test_concurrent_mixed_load_through_tritonclient_each_reply_exact(engine):
    """Staggered clients with different step counts, samplers, time ranges, masks and seeds: every reply equals its own
    direct Engine.sample, bitwise, and the requests really shared steps at changing batch compositions."""
    running = Running(engine, max_queue=32, batching="step", step_rows=4)  # 4 rows a step, whatever this CPU measures
    steps = Steps()
    running.service.batcher.on_batch = steps
    requests = mixed_requests(14, base=700)
    try:
        with concurrent.futures.ThreadPoolExecutor(14) as pool:
            calls = []
            for r in requests:
                calls.append(pool.submit(triton_infer, running.port, *r))
                time.sleep(0.01)  # staggered: later requests join a batch that is already running
            answers = [c.result(120) for c in calls]
    finally:
        running.stop()
    for (bg, mask, x_init, settings, seed), got in zip(requests, answers):
        want = engine.sample(bg, mask=mask, x_init=x_init, seed=seed, **settings)
        np.testing.assert_array_equal(got, want, err_msg=str(settings))
    assert max(steps.rows) == 4 and len(set(steps.rows)) >= 3, steps.rows  # shared, and the batch changed
    total = sum(r[0].shape[0] * r[3]["timesteps"] for r in requests)
    assert sum(steps.rows) == total  # every row step ran exactly once: no request lost, none ran twice
    print(f"\n{len(requests)} requests, {sum(r[3]['timesteps'] for r in requests)} request-steps in {len(steps.rows)} "
          f"U-Net calls")


def test_twice_capacity_no_request_lost_or_mixed(engine):
    running = Running(engine, max_queue=4, batching="step")
    n = 16  # capacity: 4 queued + 4 slots
    requests = mixed_requests(n, base=900)
    barrier = threading.Barrier(n)

    def call(k):
        bg, mask, x_init, settings, seed = requests[k]
        with httpx.Client(timeout=120) as client:
            barrier.wait()
            return client.post(running.base + URL + "/infer", json=infer_json(bg, mask, x_init, seed=seed, **settings))

    refused = lambda: running.metric('ddpm_engine_requests_total{code="503"}')  # noqa: E731
    try:
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            engine.lock.acquire()  # the worker stops at its first admission until every client is queued or refused
            try:
                futures = [pool.submit(call, k) for k in range(n)]
                until(lambda: refused() + running.metric("ddpm_engine_inflight_requests") >= n, 60, "the clients")
            finally:
                engine.lock.release()
            answers = [f.result(120) for f in futures]
        codes = [r.status_code for r in answers]
        assert set(codes) <= {200, 503} and codes.count(503) >= n - 8, codes
        for (bg, mask, x_init, settings, seed), r in zip(requests, answers):
            if r.status_code == 503:
                assert int(r.headers["retry-after"]) >= 1 and "server busy" in r.json()["error"]
                continue
            np.testing.assert_array_equal(output(r), engine.sample(bg, mask=mask, x_init=x_init, seed=seed,
                                                                   **settings))
        assert running.metric("ddpm_engine_queue_depth") == 0
        r = httpx.post(running.base + URL + "/infer", json=infer_json(requests[0][0], timesteps=2), timeout=30)
        assert r.status_code == 200  # and the service carries on
    finally:
        running.stop()


def test_a_client_that_disconnects_frees_its_slot(engine):
    running = Running(engine, max_queue=4, max_batch=1, batching="step")
    scheduler = running.service.batcher
    try:
        s = socket.create_connection(("127.0.0.1", running.port))
        body = json.dumps(infer_json(tile(20)[0], timesteps=1000, seed=20)).encode()
        s.sendall(f"POST {URL}/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        until(lambda: scheduler.slots.busy == 1, what="the request to run")
        s.close()
        until(lambda: scheduler.slots.busy == 0, 10, "the slot to be freed")
        until(lambda: running.metric('ddpm_engine_requests_total{code="499"}') == 1, 10, "the 499")
        bg = tile(21)[0]
        r = httpx.post(running.base + URL + "/infer", json=infer_json(bg, timesteps=4, seed=21), timeout=30)
        np.testing.assert_array_equal(output(r), engine.sample(bg, timesteps=4, seed=21))
    finally:
        running.stop()


# -- previews: generate_stream (server-sent events) ------------------------------------------------

def stream_events(base, body, timeout=60):
    """(status, [event dicts]) of a generate_stream request."""
    with httpx.stream("POST", base + URL + "/generate_stream", json=body, timeout=timeout) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, [r.json()]
        assert r.headers["content-type"].startswith("text/event-stream")
        return 200, [json.loads(line[len("data: "):]) for line in r.iter_lines() if line]


def test_generate_stream_sends_x0_previews_then_the_exact_sample(engine):
    running = Running(engine, batching="step")
    bg, x_init, mask = tile(80)
    try:
        status, events = stream_events(running.base, {
            "id": "r1", "background": bg.tolist(), "mask": mask.tolist(), "x_init": x_init.tolist(),
            "parameters": {"timesteps": 10, "sampler": "ddim", "seed": 8, "preview_every": 4}})
    finally:
        running.stop()
    assert status == 200
    assert [(e["step"], e["steps"], "x0_preview" in e) for e in events] == [(4, 10, True), (8, 10, True),
                                                                          (10, 10, False)]
    assert all(e["id"] == "r1" and e["model_name"] == "tiny" for e in events)
    assert np.asarray(events[0]["x0_preview"]).shape == (1, 1, 8, 8)
    want = engine.sample(bg, mask=mask, x_init=x_init, timesteps=10, sampler="ddim", seed=8)
    np.testing.assert_array_equal(np.asarray(events[-1]["sample"], np.float32), want)


@pytest.mark.parametrize("body,message", [
    ({"background": [[[[0.0]]]], "parameters": {"preview_every": 0}}, "'preview_every' must be an integer >= 1"),
    ({"background": [[[[0.0]]]], "parameters": {"preview_every": 2.5}}, "'preview_every' must be an integer >= 1"),
    ({"backgrund": [[[[0.0]]]]}, "unknown key 'backgrund'"),
    ({"background": "zeros"}, "input 'background'"),
    ({"background": np.zeros((5, 1, 8, 8)).tolist(), "parameters": {"timesteps": 2}},
     "previews need a request of at most 4 images"),
    ({"background": np.zeros((1, 1, 8, 8)).tolist(), "parameters": {"samplr": "ddim"}}, "unknown parameter 'samplr'"),
], ids=["zero", "fraction", "typo", "not-numbers", "too-many-images", "unknown-parameter"])
def test_generate_stream_refuses_bad_requests_naming_the_problem(engine, body, message):
    running = Running(engine, batching="step")
    try:
        status, (reply,) = stream_events(running.base, body)
    finally:
        running.stop()
    assert status == 400 and message in reply["error"], reply


def test_generate_stream_needs_step_level_batching(engine):
    running = Running(engine, batching="request")
    try:
        status, (reply,) = stream_events(running.base, {"background": tile(81)[0].tolist()})
    finally:
        running.stop()
    assert status == 400 and "previews need step-level batching" in reply["error"]


def test_a_stream_client_that_goes_away_frees_its_slot(engine):
    running = Running(engine, max_batch=1, batching="step")
    scheduler, steps = running.service.batcher, Steps()
    scheduler.on_batch = steps
    try:
        body = {"background": tile(82)[0].tolist(), "parameters": {"timesteps": 1000, "preview_every": 1}}
        with httpx.stream("POST", running.base + URL + "/generate_stream", json=body, timeout=30) as r:
            first = next(line for line in r.iter_lines() if line)
            assert json.loads(first[len("data: "):])["step"] == 1
        until(lambda: scheduler.slots.busy == 0 and not scheduler._running, 10, "the slot to be freed")
        assert len(steps.rows) < 1000  # stopped, not run to the end
    finally:
        running.stop()
