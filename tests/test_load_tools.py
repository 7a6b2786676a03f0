"""The load test's own parts that its figures rest on (tools/load_stack.py, tools/load_report.py): the latency
proxy holds each request, not each connection or packet, and the knee is the first N that shows a limit. The
load test itself runs as `make load-test` / `make load-test-ci` (minutes, PostgreSQL): not here."""

from __future__ import annotations

import http.server
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import load_report  # noqa: E402
from load_stack import LatencyProxy  # noqa: E402


class _Ok(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: several requests on one connection, as the MLflow client does

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


def test_the_proxy_delays_every_request_on_a_kept_alive_connection():
    import requests

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    proxy = LatencyProxy(server.server_address[1], delay_s=0.3).start()
    try:
        with requests.Session() as s:
            times = []
            for _ in range(3):
                t0 = time.monotonic()
                assert s.get(proxy.url, timeout=5).text == "ok"
                times.append(time.monotonic() - t0)
        assert all(0.3 <= t < 1.0 for t in times), times
        assert proxy.requests == 3
        proxy.delay_s = 0.0
        t0 = time.monotonic()
        with urllib.request.urlopen(proxy.url, timeout=5) as r:
            assert r.read() == b"ok"
        assert time.monotonic() - t0 < 0.25
    finally:
        proxy.stop()
        server.shutdown()


def _phase(jobs: int, p95: float, drain: float, failed: int = 0) -> dict:
    return {"jobs": jobs, "steps": 1000, "step_ms": 20.0, "jobs_failed": failed, "timed_out": False,
            "log_batch_ms": {"p95": p95}, "drain_s": {"max": drain}, "offered_points_per_s": jobs * 400.0,
            "stored_points_per_s": jobs * 300.0, "check": {"lost_points": 0}}


def test_the_knee_is_the_first_phase_that_shows_a_limit():
    assert load_report.knee([_phase(5, 50, 0.5), _phase(10, 60, 1.0)])["jobs"] is None
    assert load_report.knee([_phase(5, 50, 0.5), _phase(10, 160, 1.0), _phase(20, 900, 30)])["jobs"] == 10
    k = load_report.knee([_phase(5, 50, 0.5), _phase(10, 60, 12.0)])
    assert k["jobs"] == 10 and "drained" in k["why"]
    assert load_report.knee([_phase(5, 50, 0.5, failed=1)])["jobs"] == 5
