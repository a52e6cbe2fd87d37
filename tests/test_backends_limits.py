"""The bound on requests in flight per backend, seen from the provider's side: a stand-in that takes a while to
answer counts the most requests it was answering at once. Threads of one process and separate processes (as
Dask workers are) share the bound."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from atelier import backends as B
from atelier.backends import limits
from atelier.profiles import ModelSpec
from tests.conftest import REPO
from tests.standins import OpenAIStandIn

KEY = "sk-atelier-FAKE-limits-0a9b8c7d6e5f"
GPT = ModelSpec("gpt-image-1", "remote", "openai:gpt-image-1", options=(("quality", "low"),))


@pytest.fixture
def server(monkeypatch, tmp_path):
    with OpenAIStandIn(KEY, latency=0.4) as s:
        monkeypatch.setenv("OPENAI_API_KEY", KEY)
        monkeypatch.setenv("OPENAI_BASE_URL", s.url + "/v1")
        monkeypatch.setenv("ATELIER_SLOTS_DIR", str(tmp_path / "slots"))  # this test's slots, no one else's
        yield s


def test_bounds_come_from_the_defaults_or_the_setting(monkeypatch):
    monkeypatch.delenv("ATELIER_CONCURRENCY", raising=False)
    assert limits.bounds() == limits.DEFAULT_CONCURRENCY
    monkeypatch.setenv("ATELIER_CONCURRENCY", "openai=2, replicate=12")
    assert limits.bounds()["openai"] == 2 and limits.bounds()["replicate"] == 12 and limits.bounds()["fal"] == 8
    monkeypatch.setenv("ATELIER_CONCURRENCY", "3")
    assert set(limits.bounds().values()) == {3}
    for bad, message in (("midjourney=2", "backends: openai, replicate"), ("openai=0", "whole number"),
                         ("openai", "is not <backend>=<n>"), ("openai=two", "whole number")):
        monkeypatch.setenv("ATELIER_CONCURRENCY", bad)
        with pytest.raises(ValueError, match=message):
            limits.bounds()


def test_a_bad_setting_fails_the_request_before_sending(server, monkeypatch):
    monkeypatch.setenv("ATELIER_CONCURRENCY", "openai=-1")
    with pytest.raises(B.BackendError, match="openai:gpt-image-1 for hero: not configured: ATELIER_CONCURRENCY") as e:
        B.generate(B.target_of(GPT), B.RemoteRequest("a boat"), context="hero")
    assert e.value.kind == "config" and not server.requests


@pytest.mark.parametrize("bound", [1, 3])
def test_threads_run_in_parallel_up_to_the_bound_and_never_beyond(server, monkeypatch, bound):
    monkeypatch.setenv("ATELIER_CONCURRENCY", f"openai={bound}")
    t0 = time.perf_counter()
    made = B.generate_items(GPT, "a boat", "", 1024, 1024, tuple(range(6)), concurrency=6)
    elapsed = time.perf_counter() - t0
    assert len(made) == 6 and len(server.api_requests()) == 6
    assert server.max_in_flight == bound  # reached, and never passed
    assert elapsed >= 0.4 * 6 / bound - 0.05  # the requests queued for their slots


def test_processes_share_the_bound(server, monkeypatch, tmp_path):
    """Two processes (as two Dask workers), 4 requests each with 4 threads, bound 3: the provider sees 3 at most."""
    monkeypatch.setenv("ATELIER_CONCURRENCY", "openai=3")
    server.latency = 0.6
    script = (
        "from atelier import backends as B\n"
        "from atelier.profiles import ModelSpec\n"
        "spec = ModelSpec('gpt-image-1', 'remote', 'openai:gpt-image-1', options=(('quality', 'low'),))\n"
        "assert len(B.generate_items(spec, 'a boat', '', 1024, 1024, (1, 2, 3, 4), concurrency=4)) == 4\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, cwd=REPO, stderr=subprocess.PIPE)
             for _ in range(2)]
    errors = [p.communicate(timeout=120)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    assert len(server.api_requests()) == 8 and server.max_in_flight == 3
    assert KEY not in "".join(errors)


def test_a_slot_is_free_again_after_a_failure(server, monkeypatch):
    monkeypatch.setenv("ATELIER_CONCURRENCY", "openai=1")
    with pytest.raises(B.BackendError, match="refused"):
        B.generate(B.target_of(GPT), B.RemoteRequest("a FORBIDDEN boat"))
    assert len(B.generate(B.target_of(GPT), B.RemoteRequest("a boat"))) == 1  # not stuck waiting
