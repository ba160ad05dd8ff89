"""The HTTP service on loopback: protocol, exact per-request results under load, refusals, slow and vanishing clients,
shutdown, the unmodified tritonclient, and the CLI."""
import concurrent.futures
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

from ddpm_engine.engine import load
from ddpm_engine.serve.serve_http import Service, make_server

H = W = 8
URL = "/v2/models/tiny"


class Running:
    """A Service under the shipped uvicorn server (make_server) in a thread, on a free loopback port."""

    def __init__(self, engine, **kwargs):
        self.service = Service(engine, "tiny", **kwargs)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.server = make_server(self.service, log_level="warning")
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)

    def stop(self):
        self.service.begin_shutdown()
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive(), "server did not shut down"
        self.sock.close()

    def metric(self, name):
        text = httpx.get(self.base + "/metrics").text
        return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


@pytest.fixture(scope="module")
def engine(tiny_engine_dir):
    return load(tiny_engine_dir, backend="onnxruntime")


class Gated:
    """The engine, but each sample() call first waits for `gate` (and optionally sleeps): deterministic timing."""

    def __init__(self, engine, delay_s=0.0):
        self.engine, self.delay_s, self.gate = engine, delay_s, threading.Event()
        self.gate.set()

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def sample(self, *args, **kwargs):
        assert self.gate.wait(60)
        time.sleep(self.delay_s)
        return self.engine.sample(*args, **kwargs)


@pytest.fixture(scope="module")
def server(engine):
    running = Running(Gated(engine), max_queue=4, batch_window_ms=20, read_timeout_s=2.0, max_body_bytes=200_000,
                      batching="request")  # Gated holds sample() calls: the request-level batcher makes them
    yield running
    running.stop()


def tile(seed, rows=1, h=H, w=W):
    g = np.random.default_rng(seed)
    return (g.uniform(-1, 1, (rows, 1, h, w)).astype(np.float32), g.uniform(-1, 1, (rows, 1, h, w)).astype(np.float32),
            (g.uniform(size=(1, 1, h, w)) > 0.5).astype(np.float32))


def json_input(name, array):
    return {"name": name, "shape": list(array.shape), "datatype": "FP32", "data": array.ravel().tolist()}


def infer_json(bg, mask=None, x_init=None, **params):
    inputs = [json_input("background", bg)]
    inputs += [json_input(n, a) for n, a in (("mask", mask), ("x_init", x_init)) if a is not None]
    return {"inputs": inputs, "parameters": params}


def infer_binary(bg, mask=None, x_init=None, **params):
    """A body with the binary tensor data extension: (bytes, headers)."""
    arrays = [("background", bg)] + ([("mask", mask), ("x_init", x_init)] if mask is not None else [])
    head = {"inputs": [{"name": n, "shape": list(a.shape), "datatype": "FP32",
                        "parameters": {"binary_data_size": a.nbytes}} for n, a in arrays],
            "outputs": [{"name": "sample", "parameters": {"binary_data": True}}], "parameters": params}
    head = json.dumps(head).encode()
    return head + b"".join(a.tobytes() for _, a in arrays), {"Inference-Header-Content-Length": str(len(head))}


def output(response):
    """The `sample` output of a 200 response, JSON or binary."""
    n = response.headers.get("inference-header-content-length")
    head = json.loads(response.content[:int(n)] if n else response.content)
    out = head["outputs"][0]
    assert out["name"] == "sample" and out["datatype"] == "FP32"
    if n:
        data = np.frombuffer(response.content[int(n):], dtype="<f4")
        assert data.nbytes == out["parameters"]["binary_data_size"]
    else:
        data = np.asarray(out["data"], dtype=np.float32)
    return data.reshape(out["shape"])


def test_health_metadata_and_unknown_names(server):
    get = lambda path: httpx.get(server.base + path)  # noqa: E731
    assert get("/v2/health/live").json() == {"live": True}
    assert get("/v2/health/ready").json() == {"ready": True}
    assert get(URL + "/ready").json() == {"name": "tiny", "ready": True}
    assert "binary_tensor_data" in get("/v2").json()["extensions"]
    meta = get(URL).json()
    assert meta == get(URL + "/versions/1").json()
    assert [i["name"] for i in meta["inputs"]] == ["background", "mask", "x_init"]
    assert meta["outputs"] == [{"name": "sample", "datatype": "FP32", "shape": [-1, 1, -1, -1]}]
    assert meta["parameters"]["max_batch"] == 4
    r = get("/v2/models/other")
    assert r.status_code == 404 and "unknown model 'other'; this server serves 'tiny'" in r.json()["error"]
    assert get(URL + "/versions/2").status_code == 404
    assert get("/nope").json() == {"error": "GET /nope: Not Found"}
    assert httpx.get(server.base + URL + "/infer").status_code == 405


def test_json_and_binary_infer_equal_a_direct_engine_call(server, engine):
    bg, x_init, mask = tile(1, rows=2)
    want = engine.sample(bg, mask=mask, x_init=x_init, timesteps=5, sampler="ddim", seed=42)
    r = httpx.post(server.base + URL + "/infer", json=infer_json(bg, mask, x_init, timesteps=5, sampler="ddim",
                                                                   seed=42) | {"id": "req-1"}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["id"] == "req-1" and r.json()["model_name"] == "tiny"
    np.testing.assert_array_equal(output(r), want)
    body, headers = infer_binary(bg, mask, x_init, timesteps=5, sampler="ddim", seed=42)
    r = httpx.post(server.base + URL + "/versions/1/infer", content=body, headers=headers, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    np.testing.assert_array_equal(output(r), want)
    bg3 = tile(2)[0][0]  # one image [C, H, W]; default parameters except timesteps
    r = httpx.post(server.base + URL + "/infer", json=infer_json(bg3, timesteps=3), timeout=30)
    np.testing.assert_array_equal(output(r), engine.sample(bg3, timesteps=3, seed=0))


def test_metrics_show_the_step_rows_measured_for_each_image_size(engine):
    running = Running(engine, batching="step")
    try:
        r = httpx.post(running.base + URL + "/infer", json=infer_json(tile(3)[0], timesteps=2), timeout=30)
        assert r.status_code == 200
        measured = running.service.batcher.measured[(8, 8)][0]
        assert running.metric('ddpm_engine_step_rows{size="8x8"}') == measured
    finally:
        running.stop()
    with pytest.raises(ValueError, match="step rows apply to step-level batching"):
        Service(engine, "tiny", batching="request", step_rows=2)


def test_twice_capacity_every_request_exact_or_503(server, engine):
    # capacity: 4 queued + 4 running rows; 16 clients at once, each with its own inputs and seed
    n = 16
    requests = []
    for k in range(n):
        bg, x_init, mask = tile(100 + k, rows=1 + (k % 5 == 0))
        masked = k % 2 == 0
        requests.append((bg, mask if masked else None, x_init if masked else None, 1000 + k))
    barrier = threading.Barrier(n)

    def call(k):
        bg, mask, x_init, seed = requests[k]
        body, headers = infer_binary(bg, mask, x_init, timesteps=24, seed=seed)
        with httpx.Client(timeout=60) as client:
            barrier.wait()
            start = time.perf_counter()
            r = client.post(server.base + URL + "/infer", content=body, headers=headers)
            return r, time.perf_counter() - start

    before = server.metric("ddpm_engine_batch_rows_count"), server.metric("ddpm_engine_batch_rows_sum")
    refused = lambda: server.metric('ddpm_engine_requests_total{code="503"}')  # noqa: E731
    refused_before = refused()
    gate = server.service.batcher.engine.gate
    gate.clear()  # the first batch holds the engine until every client has been either queued or refused
    try:
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            futures = [pool.submit(call, k) for k in range(n)]
            deadline = time.monotonic() + 30
            while (refused() - refused_before + server.metric("ddpm_engine_inflight_requests") < n
                   and time.monotonic() < deadline):
                time.sleep(0.02)
            gate.set()
            answers = [f.result() for f in futures]
    finally:
        gate.set()
    codes = [r.status_code for r, _ in answers]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(200) >= 4 and codes.count(503) >= n - 8, codes  # at most 4 queued + 4 rows running
    for (bg, mask, x_init, seed), (r, _) in zip(requests, answers):
        if r.status_code == 503:
            assert int(r.headers["retry-after"]) >= 1 and "server busy" in r.json()["error"]
            continue
        np.testing.assert_array_equal(output(r), engine.sample(bg, mask=mask, x_init=x_init, timesteps=24, seed=seed))
    batches = server.metric("ddpm_engine_batch_rows_count") - before[0]
    rows = server.metric("ddpm_engine_batch_rows_sum") - before[1]
    assert rows == sum(requests[k][0].shape[0] for k, c in enumerate(codes) if c == 200)
    assert batches < codes.count(200)  # requests shared engine calls
    latencies = sorted(t for (r, t) in answers if r.status_code == 200)
    print(f"\nload: {n} requests, {codes.count(200)} x 200, {codes.count(503)} x 503, {int(batches)} engine calls, "
          f"latency of 200s p50 {latencies[len(latencies) // 2]:.3f} s max {latencies[-1]:.3f} s")
    assert server.metric("ddpm_engine_queue_depth") == 0
    r = httpx.post(server.base + URL + "/infer", json=infer_json(requests[1][0], timesteps=2, seed=1), timeout=30)
    assert r.status_code == 200  # and the service carries on


BG = tile(0)[0]


@pytest.mark.parametrize("body, headers, status, message", [
    (b"{bad", {}, 400, "request body is not valid JSON"),
    (b"[1, 2]", {}, 400, "must be a JSON object"),
    (json.dumps({"inputs": []}).encode(), {}, 400, "non-empty 'inputs' list"),
    (json.dumps({"inputs": [json_input("image", BG)]}).encode(), {}, 400, "unknown input 'image'"),
    (json.dumps({"inputs": [json_input("x_init", BG)]}).encode(), {}, 400, "input 'background' is required"),
    (json.dumps(infer_json(np.zeros((1, 3, H, W), np.float32))).encode(), {}, 400,
     "background has 3 channels; this model takes 1"),
    (json.dumps(infer_json(np.zeros((1, 1, 64, 64), np.float32))).encode(), {}, 400,
     "image size 64x64 is outside what this engine was built for"),
    (json.dumps({"inputs": [json_input("background", BG) | {"shape": [1, 1, 8, 9]}]}).encode(), {}, 400,
     r"data has 64 values, shape \[1, 1, 8, 9\] needs 72"),
    (json.dumps({"inputs": [json_input("background", BG) | {"shape": [8, 8]}]}).encode(), {}, 400,
     "shape must be 3 or 4 positive integers"),
    (json.dumps({"inputs": [json_input("background", BG) | {"datatype": "INT8"}]}).encode(), {}, 400,
     "datatype must be one of"),
    (json.dumps({"inputs": [json_input("background", BG) | {"data": ["a"] * 64}]}).encode(), {}, 400,
     "data must be a"),
    (json.dumps(infer_json(BG, BG, None)).encode(), {}, 400, "mask given without x_init"),
    (json.dumps(infer_json(BG, BG * 3, BG)).encode(), {}, 400, r"mask values must lie in \[0, 1\]"),
    (json.dumps(infer_json(BG, sampler="euler")).encode(), {}, 400, "unknown sampler 'euler'"),
    (json.dumps(infer_json(BG, timesteps="ten")).encode(), {}, 400, "parameter 'timesteps' must be int"),
    (json.dumps(infer_json(BG, timesteps=5000)).encode(), {}, 400, r"'timesteps' must be in \[1, 1000\]"),
    (json.dumps(infer_json(BG, t_start=0.2, t_end=0.5)).encode(), {}, 400, "t_start must be greater than t_end"),
    (json.dumps(infer_json(BG, seed=-3)).encode(), {}, 400, r"seed must be an integer in \[0, 2\^63\)"),
    (json.dumps(infer_json(np.where(BG > 0.5, np.nan, BG))).encode(), {}, 400, "input 'background' contains NaN"),
    (json.dumps(infer_json(BG) | {"outputs": [{"name": "eps"}]}).encode(), {}, 400, "unknown output 'eps'"),
    (json.dumps(infer_json(BG, timestep=4, seeed=9)).encode(), {}, 400,
     r"unknown parameter 'timestep' in the request; accepted: \['timesteps', 'sampler', 'seed', 't_start', 't_end', "
     r"'eta', 'binary_data_output', 'timeout', 'priority'\]"),
    (json.dumps(infer_json(BG, timesteps=2, binary_data_output="false")).encode(), {}, 400,
     "parameter 'binary_data_output' must be a JSON boolean"),
    (json.dumps(infer_json(BG) | {"outputs": [{"name": "sample", "parameters": {"binary_data": "true"}}]}).encode(),
     {}, 400, "parameter 'binary_data' must be a JSON boolean"),
    (json.dumps(infer_json(BG) | {"outputs": [{"name": "sample", "parameters": {"classification": 3}}]}).encode(),
     {}, 400, "unknown parameter 'classification' of output 'sample'"),
    (json.dumps({"inputs": [json_input("background", BG) | {"parameters": {"shared_memory_region": "r"}}]}).encode(),
     {}, 400, r"unknown parameter 'shared_memory_region' of input 'background'; accepted: \['binary_data_size'\]"),
    (json.dumps(infer_json(BG, timesteps=4.5)).encode(), {}, 400, "parameter 'timesteps' must be int, got 4.5"),
    (json.dumps(infer_json(BG, seed=True)).encode(), {}, 400, "parameter 'seed' must be int, got True"),
    (infer_binary(BG)[0][:-4], infer_binary(BG)[1], 400, "binary bytes, 256 declared"),
    (infer_binary(BG)[0] + b"xx", infer_binary(BG)[1], 400, "2 binary bytes after the declared inputs"),
    (infer_binary(BG)[0], {"Inference-Header-Content-Length": "99999"}, 400, "outside the body"),
    (infer_binary(BG)[0], {"Inference-Header-Content-Length": "ab"}, 400, "must be an integer"),
    (json.dumps(infer_json(BG)).encode(), {"Content-Encoding": "gzip"}, 415, "Content-Encoding 'gzip'"),
    (b"0" * 300_000, {}, 413, "exceeds the limit of 200000"),
], ids=lambda v: v if isinstance(v, str) and not v.startswith("{") else "")
def test_bad_requests_are_refused_naming_the_problem(server, body, headers, status, message):
    r = httpx.post(server.base + URL + "/infer", content=body, headers=headers, timeout=30)
    assert r.status_code == status, r.text
    assert re.search(message, r.json()["error"]), r.json()["error"]


def test_integral_json_numbers_and_tritonclient_parameters_are_accepted(server, engine):
    r = httpx.post(server.base + URL + "/infer", json=infer_json(BG, timesteps=4.0, seed=9.0, t_end=0, priority=1,
                                                                   timeout=10**7), timeout=30)
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(output(r), engine.sample(BG, timesteps=4, seed=9))


MIXED = [dict(sampler="ddpm"), dict(sampler="ddim"), dict(sampler="ddim", eta=0.5),
         dict(sampler="ddpm", t_start=0.8, t_end=0.1)]


def test_a_burst_of_mixed_settings_gets_each_its_own_result(engine):
    """Samplers, t_start/t_end, eta and masks mixed in one burst: each reply equals its own direct call."""
    sizes = []
    gated = Gated(engine)
    running = Running(gated, max_queue=16, batch_window_ms=20, batching="request")
    running.service.batcher.on_batch = lambda rows, s: sizes.append(rows)
    post = lambda body: httpx.post(running.base + URL + "/infer", json=body, timeout=60)  # noqa: E731
    try:
        requests = []
        for k in range(8):
            bg, x_init, mask = tile(300 + k, rows=1 + k % 2)
            masked = k % 3 == 0
            requests.append((bg, mask if masked else None, x_init if masked else None, MIXED[k % 4], 50 + k))
        with concurrent.futures.ThreadPoolExecutor(9) as pool:
            gated.gate.clear()  # a first request holds the engine while the burst queues up behind it
            first = pool.submit(post, infer_json(BG, timesteps=2))
            deadline = time.monotonic() + 30
            while running.metric("ddpm_engine_inflight_requests") < 1 or running.metric("ddpm_engine_queue_depth"):
                assert time.monotonic() < deadline
                time.sleep(0.02)
            calls = [pool.submit(post, infer_json(bg, mask, x_init, timesteps=4, seed=seed, **settings))
                     for bg, mask, x_init, settings, seed in requests]
            while running.metric("ddpm_engine_queue_depth") < len(requests):
                assert time.monotonic() < deadline
                time.sleep(0.02)
            gated.gate.set()
            answers = [c.result() for c in calls]
            assert first.result().status_code == 200
    finally:
        gated.gate.set()
        running.stop()
    for (bg, mask, x_init, settings, seed), r in zip(requests, answers):
        assert r.status_code == 200, r.text
        want = engine.sample(bg, mask=mask, x_init=x_init, timesteps=4, seed=seed, **settings)
        np.testing.assert_array_equal(output(r), want, err_msg=str(settings))
    assert len(sizes) < len(requests) + 1  # some requests shared an engine call


def test_idle_connections_lock_no_one_out_and_time_out(engine):
    running = Running(engine, max_queue=2, read_timeout_s=1.0)
    idle = [socket.create_connection(("127.0.0.1", running.port)) for _ in range(63)]  # connect, send nothing
    try:
        r = httpx.post(running.base + URL + "/infer", json=infer_json(BG, timesteps=2), timeout=30)
        assert r.status_code == 200 or (r.status_code == 503 and r.headers["retry-after"] and r.json()["error"])
        assert httpx.get(running.base + "/v2/health/ready", timeout=10).json() == {"ready": True}
        for s in idle:  # the server hangs up on a connection that sends no request within read_timeout_s
            s.settimeout(10)
            assert s.recv(1) == b""
    finally:
        for s in idle:
            s.close()
        running.stop()


def test_huge_chunked_body_is_cut_off(server):
    def chunks():
        for _ in range(100):
            yield b"1" * 10_000

    r = httpx.post(server.base + URL + "/infer", content=chunks(), timeout=30)  # no Content-Length: chunked
    assert r.status_code == 413 and "exceeds the limit" in r.json()["error"]


def raw_request(port, body: bytes, declared: int | None = None) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(f"POST {URL}/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              f"Content-Length: {declared or len(body)}\r\n\r\n".encode() + body)
    return s


def test_slow_client_gets_408_without_holding_up_others(server):
    slow = raw_request(server.port, b'{"inputs": [', declared=5000)  # then stalls
    try:
        start = time.perf_counter()
        r = httpx.post(server.base + URL + "/infer", json=infer_json(BG, timesteps=2), timeout=30)
        assert r.status_code == 200 and time.perf_counter() - start < 2.0  # read timeout is 2 s
        slow.settimeout(10)
        reply = slow.recv(4096).decode()
        assert reply.startswith("HTTP/1.1 408") and "not received within 2 s" in reply
    finally:
        slow.close()


def test_vanishing_clients_do_not_wedge_the_batcher(server):
    before = server.metric("ddpm_engine_batch_rows_sum")
    gate = server.service.batcher.engine.gate
    gate.clear()  # the engine is held busy with the first request
    try:
        busy = threading.Thread(target=lambda: httpx.post(server.base + URL + "/infer",
                                                          json=infer_json(BG, timesteps=3), timeout=60))
        busy.start()
        time.sleep(0.3)
        gone = [raw_request(server.port, json.dumps(infer_json(BG, timesteps=7, seed=s)).encode()) for s in range(3)]
        deadline = time.monotonic() + 10
        while server.metric("ddpm_engine_queue_depth") < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        for s in gone:  # queued behind the busy request, then disconnect
            s.close()
        while server.metric('ddpm_engine_requests_total{code="499"}') < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        gate.set()
    busy.join(60)
    r = httpx.post(server.base + URL + "/infer", json=infer_json(BG, timesteps=2, seed=9), timeout=30)
    assert r.status_code == 200
    assert server.metric("ddpm_engine_queue_depth") == 0
    assert server.metric('ddpm_engine_requests_total{code="499"}') >= 3
    assert server.metric("ddpm_engine_batch_rows_sum") - before == 2  # the vanished requests never ran


def test_requests_past_their_timeout_get_504(engine):
    running = Running(Gated(engine, delay_s=0.6), max_queue=8, batch_window_ms=5, timeout_s=0.3, batching="request")
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            calls = [pool.submit(httpx.post, running.base + URL + "/infer", json=infer_json(BG, timesteps=2, seed=s),
                                 timeout=30) for s in range(4)]
            answers = [c.result() for c in calls]
        assert [r.status_code for r in answers] == [504] * 4
        assert "no result within the 0.3 s timeout" in answers[0].json()["error"]
        running.service.batcher.engine.delay_s = 0.0
        r = httpx.post(running.base + URL + "/infer", json=infer_json(BG, timesteps=2), timeout=30)
        assert r.status_code == 200
    finally:
        running.stop()


def shutdown_with_queue(engine, drain_timeout_s, hold_s):
    """Three requests in flight (one running, two queued, engine held), then stop(): their status codes."""
    gated = Gated(engine)
    running = Running(gated, max_queue=8, max_batch=1, batch_window_ms=1, drain_timeout_s=drain_timeout_s,
                      batching="request")
    gated.gate.clear()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        calls = [pool.submit(httpx.post, running.base + URL + "/infer", json=infer_json(BG, timesteps=2, seed=s),
                             timeout=30) for s in range(3)]
        deadline = time.monotonic() + 10
        while running.metric("ddpm_engine_queue_depth") < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        running.service.begin_shutdown()  # what SIGTERM does first (then uvicorn closes the listening socket)
        assert httpx.get(running.base + "/v2/health/ready").status_code == 503  # draining: readiness drops...
        late = httpx.post(running.base + URL + "/infer", json=infer_json(BG, timesteps=2), timeout=30)
        assert late.status_code == 503 and "shutting down" in late.json()["error"]  # ...and new work is refused
        stopper = pool.submit(running.stop)
        time.sleep(hold_s)
        gated.gate.set()
        codes = [c.result().status_code for c in calls]
        stopper.result()  # the server thread has exited
    return codes


def test_shutdown_finishes_what_is_queued(engine):
    assert shutdown_with_queue(engine, drain_timeout_s=30, hold_s=0.2) == [200, 200, 200]


def test_shutdown_rejects_what_it_cannot_finish_in_time(engine):
    codes = shutdown_with_queue(engine, drain_timeout_s=0.2, hold_s=0.5)
    assert sorted(codes) == [200, 503, 503]  # the running request finishes; the queued ones are told, not dropped


def test_readiness_drops_when_draining(engine):
    running = Running(engine)
    try:
        running.service.begin_shutdown()
        assert httpx.get(running.base + "/v2/health/ready").status_code == 503
        r = httpx.post(running.base + URL + "/infer", json=infer_json(BG, timesteps=2))
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
    finally:
        running.stop()


def test_unmodified_tritonclient(server, engine):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("tiny")
    assert client.get_model_metadata("tiny")["outputs"][0]["name"] == "sample"
    bg, x_init, mask = tile(7, rows=2)
    want = engine.sample(bg, mask=mask, x_init=x_init, timesteps=4, seed=5)
    for binary in (True, False):
        inputs = []
        for name, array in (("background", bg), ("mask", mask), ("x_init", x_init)):
            tensor = httpclient.InferInput(name, list(array.shape), "FP32")
            tensor.set_data_from_numpy(array, binary_data=binary)
            inputs.append(tensor)
        outputs = [httpclient.InferRequestedOutput("sample", binary_data=binary)]
        result = client.infer("tiny", inputs, outputs=outputs, parameters={"timesteps": 4, "seed": 5}, priority=1,
                              timeout=10**7)  # tritonclient's own parameters: accepted and ignored
        np.testing.assert_array_equal(result.as_numpy("sample"), want)
    result = client.infer("tiny", inputs, parameters={"timesteps": 4, "seed": 5})  # default: binary output
    np.testing.assert_array_equal(result.as_numpy("sample"), want)
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException, match="unknown sampler 'euler'"):
        client.infer("tiny", inputs, parameters={"timesteps": 4, "sampler": "euler"})
    client.close()


def test_cli_serves_until_sigterm(tiny_engine_dir):
    port, proc = start_cli(tiny_engine_dir, "--max-queue", "2")
    try:
        r = httpx.post(f"http://127.0.0.1:{port}/v2/models/sst/infer", json=infer_json(BG, timesteps=2), timeout=30)
        assert r.status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0  # a drained stop is a success (Docker, Kubernetes, set -e scripts)
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_sigterm_with_requests_running_and_queued_answers_each_and_exits_0(tiny_engine_dir, engine):
    port, proc = start_cli(tiny_engine_dir, "--max-batch", "1", "--max-queue", "8", "--timeout-s", "30")
    base = f"http://127.0.0.1:{port}"
    try:
        jobs = [(tile(400 + k)[0], 500 + k) for k in range(4)]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            calls = [pool.submit(httpx.post, base + "/v2/models/sst/infer", json=infer_json(bg, timesteps=200, seed=s),
                                 timeout=120) for bg, s in jobs]
            deadline = time.monotonic() + 60
            while not re.search(r"^ddpm_engine_queue_depth [2-9]", httpx.get(base + "/metrics").text, re.M):
                assert time.monotonic() < deadline and proc.poll() is None, "requests never queued"
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)  # one request running, two or three queued
            answers = [c.result() for c in calls]
        assert proc.wait(60) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    codes = [r.status_code for r in answers]
    assert codes[0] == 200, codes
    for (bg, seed), r in zip(jobs, answers):
        if r.status_code == 503:  # a clean rejection: JSON naming the shutdown
            assert "shut" in r.json()["error"] and r.headers["retry-after"]
            continue
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(output(r), engine.sample(bg, timesteps=200, seed=seed))


def start_cli(engine_dir, *flags):
    """`ddpm-engine serve` in a subprocess as model 'sst' on a free port, once it answers ready: (port, process)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "ddpm_engine.engine.cli", "serve", str(engine_dir), "--port",
                             str(port), "--name", "sst", "--log-level", "warning", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = json.loads(proc.stdout.readline())
    assert line["serving"] == "sst" and line["url"].endswith(f":{port}/v2/models/sst")
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/models/sst/ready").status_code == 200:
                return port, proc
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
        time.sleep(0.1)


def test_cli_refuses_a_missing_engine_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ddpm_engine.engine.cli", "serve", str(tmp_path / "none")],
                       capture_output=True, text=True, timeout=60, env=os.environ | {"PYTHONWARNINGS": "ignore"})
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "ddpm-engine serve: error:" in r.stderr
