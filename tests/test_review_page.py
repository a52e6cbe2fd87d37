"""The review page (``atelier review RUN --serve``): a person decides a review gate in a real headless Chromium,
and the run, resumed, carries that person's picks into its finals' lineage. Plus what the server refuses."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from atelier.cli import app
from atelier.review import open_gates
from atelier.review_page import serve_review
from store import open_store, queries
from store.schema import Review, Run, RunAsset
from tests.conftest import tiny_home, with_refs, write_brief

pytestmark = pytest.mark.slow  # a campaign through Prefect and a browser (make test-fast skips them)

BRIEF = """\
campaign: reviewpage
profile: tiny
seed: 11
brand:
  style_refs: [refs/*.jpg]
rounds: [{vary: subtle, drafts: 2, keep: 2}]
review: last
deliverables:
  - name: hero
    prompt: "a red bicycle against a brick wall"
    aspect: "1:1"
    drafts: 4
    keep: 2
    size: 128x128
"""


@pytest.fixture(scope="module")
def review_run(prefect_server, models_dir, tmp_path_factory) -> dict:
    """A run that stops at its review gate: round 0 selected by CLIP, round 1's four variations await a person."""
    folder = with_refs(tmp_path_factory.mktemp("brief"))
    home = tiny_home(tmp_path_factory.mktemp("home"), models_dir)
    res = CliRunner().invoke(app, ["run", str(write_brief(folder, BRIEF)), "--home", str(home), "--no-report"])
    assert res.exit_code == 0, res.output
    assert "awaits review" in res.output, res.output
    st = open_store(home)
    with st.sessions() as s:
        run_id = s.scalars(select(Run.id)).one()
        assert s.get(Run, run_id).status == "awaiting review"
    [gate] = open_gates(st, run_id)
    assert gate.round == 1 and len(gate.candidates) == 4 and len(gate.suggestion) == 2
    return {"home": home, "run_id": run_id, "store": st}


class Served:
    """``serve_review`` in a thread: its URL, and its result once it stops."""

    def __init__(self, store, run_id: str, **kwargs) -> None:
        self.messages: list[str] = []
        self.result: list[bool] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: self.result.append(serve_review(
            store, run_id, announce=self.messages.append, timeout=300, stop=self.stop, **kwargs)), daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.messages and time.monotonic() < deadline:
            time.sleep(0.05)
        found = re.search(r"http://\S+/", self.messages[0] if self.messages else "")
        assert found, self.messages
        self.url = found.group(0)
        self.port = int(self.url.split(":")[2].split("/")[0])
        self.token = self.url.rstrip("/").rsplit("/", 1)[1]

    def close(self) -> bool | None:
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive()
        return self.result[0] if self.result else None


def _request(url: str, data: bytes | None = None, headers: dict | None = None, method: str | None = None):
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _post_json(url: str, body: dict, **headers):
    return _request(url, json.dumps(body).encode(), {"Content-Type": "application/json", **headers}, "POST")


def _reviews(store) -> list[Review]:
    with store.sessions() as s:
        return list(s.scalars(select(Review)))


# ----------------------------------------------------------------------------------- what it refuses
def test_the_server_listens_on_loopback_only_behind_its_token(review_run) -> None:
    st, run_id = review_run["store"], review_run["run_id"]
    [gate] = open_gates(st, run_id)
    served = Served(st, run_id)
    try:
        assert served.url.startswith("http://127.0.0.1:") and len(served.token) >= 32
        # bound to 127.0.0.1, not to every interface: another loopback address (and IPv6's) find nothing
        for family, address in ((socket.AF_INET, "127.0.0.2"), (socket.AF_INET6, "::1")):
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.settimeout(5)
                try:
                    assert sock.connect_ex((address, served.port)) != 0, address
                except OSError:  # no IPv6 here: nothing can listen there either
                    pass
        listening = Path("/proc/net/tcp")
        if listening.is_file():  # Linux: the listening socket's own address is 127.0.0.1
            rows = [line.split() for line in listening.read_text().splitlines()[1:]]
            mine = [r[1] for r in rows if r[3] == "0A" and int(r[1].split(":")[1], 16) == served.port]
            assert mine == [f"0100007F:{served.port:04X}"], mine

        # the page is there under the token, and self-contained
        status, page = _request(served.url)
        assert status == 200 and page.count(b"data-candidate=") == 4
        assert b"http://" not in page and b"https://" not in page
        status, png = _request(f"{served.url}image/{gate.decision}/1")
        assert status == 200 and png.startswith(b"\x89PNG")

        # without the token (or with another one): a bare 404 and nothing else
        base = f"http://127.0.0.1:{served.port}"
        wrong = served.url.replace(served.token, served.token[:-4] + "AAAA")
        for url in (base + "/", base + "/favicon.ico", wrong, wrong + "decide", base + "/" + served.token,
                    f"{wrong}image/{gate.decision}/1", f"{base}/../{served.token}/"):
            status, body = _request(url)
            assert status in (403, 404) and gate.decision.encode() not in body and len(body) < 40, (url, status)
        status, body = _post_json(wrong + "decide", {"token": served.token, "decision": gate.decision, "keep": [1]})
        assert status in (403, 404) and len(body) < 40
        # the right path but not the token in the body, another site's Origin, another Host: 403
        decide = served.url + "decide"
        for body, headers in (({"decision": gate.decision, "keep": [1]}, {}),
                              ({"token": "nope", "decision": gate.decision, "keep": [1]}, {}),
                              ({"token": served.token, "decision": gate.decision, "keep": [1]},
                               {"Origin": "https://evil.example"}),
                              ({"token": served.token, "decision": gate.decision, "keep": [1]},
                               {"Host": f"evil.example:{served.port}"})):
            status, _ = _post_json(decide, body, **headers)
            assert status == 403, (body, headers)
        # too big, or not JSON / a form: refused before anything is read into a decision
        status, _ = _request(decide, b"{" + b" " * 70_000 + b"}", {"Content-Type": "application/json"}, "POST")
        assert status == 413
        status, _ = _request(decide, b"keep=1", {"Content-Type": "text/plain"}, "POST")
        assert status == 415
        status, _ = _request(served.url, method="DELETE")
        assert status == 405

        # a mistake is one clear message (JSON for the page's script, a page for a plain form), not a traceback
        status, body = _post_json(decide, {"token": served.token, "decision": gate.decision, "keep": []})
        assert status == 400 and json.loads(body) == {"ok": False, "error": json.loads(body)["error"]}
        assert "keep at least one candidate" in json.loads(body)["error"]
        status, body = _post_json(decide, {"token": served.token, "decision": gate.decision, "keep": [1, 9]})
        assert status == 400 and "candidate 9 does not exist" in json.loads(body)["error"]
        status, body = _post_json(decide, {"token": served.token, "decision": gate.decision, "keep": [1],
                                           "reject": [1]})
        assert status == 400 and "keep and reject both name candidate 1" in json.loads(body)["error"]
        status, body = _request(decide, f"token={served.token}&decision={gate.decision}&keep=&stars=2%3D7".encode(),
                                {"Content-Type": "application/x-www-form-urlencoded"}, "POST")
        assert status == 400 and b"keep at least one candidate" in body and b"Traceback" not in body
        assert _reviews(st) == [] and len(open_gates(st, run_id)) == 1  # nothing recorded
    finally:
        assert served.close() is False  # stopped with nothing decided
    assert any("stopped" in m for m in served.messages)


def test_ctrl_c_stops_the_server(review_run) -> None:
    """Ctrl-C (a KeyboardInterrupt in the main thread, where the CLI serves) stops it; nothing decided: False."""
    import _thread
    import signal

    messages: list[str] = []

    def announce(message: str) -> None:
        messages.append(message)
        if len(messages) == 1:  # the server is up: interrupt it as a person's Ctrl-C would
            threading.Timer(0.5, _thread.interrupt_main).start()

    # A suite started in the background of a non-interactive shell runs with SIGINT ignored, and
    # interrupt_main then does nothing: give this test a terminal's disposition.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert serve_review(review_run["store"], review_run["run_id"], announce=announce, timeout=120) is False
    finally:
        signal.signal(signal.SIGINT, previous)
    assert messages[-1].endswith("stopped (nothing decided)"), messages
    port = int(re.search(r"127\.0\.0\.1:(\d+)/", messages[0]).group(1))
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0  # nothing listens any more


def test_a_run_with_nothing_awaiting_review_serves_nothing(tmp_path, review_run) -> None:
    messages: list[str] = []
    st = open_store(tmp_path / "home")
    with st.sessions.begin() as s:
        s.add(Run(id="r1", campaign="c", brief_path="b.yaml", brief_sha256="0" * 64, profile="tiny",
                  status="completed", started_at=datetime(2026, 1, 1), info={}))
    assert serve_review(st, "r1", announce=messages.append) is False
    assert messages == ["run r1: nothing awaits review"]


# ------------------------------------------------------------------------------ a person decides in Chromium
def test_a_person_decides_in_the_browser_and_the_run_resumes_with_their_picks(review_run, browser, tmp_path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from atelier.cli.run import resume_run

    st, run_id, home = review_run["store"], review_run["run_id"], review_run["home"]
    [gate] = open_gates(st, run_id)
    cand = {c.number: c for c in gate.candidates}
    others = [n for n in cand if n not in gate.suggestion]
    clicks = sorted(others, reverse=True)  # not CLIP's picks, and not in the order the page lists them
    rejected, starred = gate.suggestion[0], clicks[1]
    assert clicks != gate.suggestion and len(clicks) == 2

    served = Served(st, run_id, by="ada")
    try:
        browser.get(served.url)
        section = browser.find_element(By.CSS_SELECTOR, "section.gate[data-deliverable='hero']")
        assert section.get_attribute("data-round") == "1" and section.get_attribute("data-decision") == gate.decision
        figures = section.find_elements(By.CSS_SELECTOR, "figure[data-candidate]")
        assert [f.get_attribute("data-candidate") for f in figures] == ["1", "2", "3", "4"]
        assert [f.get_attribute("data-key") for f in figures] == [c.key for c in gate.candidates]
        assert all(browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img)
                   for img in section.find_elements(By.CSS_SELECTOR, "figure img"))  # the thumbnails decode
        # CLIP's suggestion is marked, with its rank and scores
        marked = section.find_elements(By.CSS_SELECTOR, "figure.clip-kept")
        assert sorted(int(f.get_attribute("data-candidate")) for f in marked) == sorted(gate.suggestion)
        first = browser.find_element(By.ID, f"g1-c{gate.suggestion[0]}")
        assert "CLIP #1" in first.text and f"CLIP rank {cand[gate.suggestion[0]].clip_rank}" in first.text
        assert f"total {cand[1].total:+.3f}" in browser.find_element(By.ID, "g1-c1").text
        assert browser.find_element(By.ID, "by-1").get_attribute("value") == "ada"  # prefilled

        # recording nothing kept: a clear message on the page, nothing recorded
        browser.find_element(By.ID, "submit-1").click()
        msg = browser.find_element(By.ID, "msg-1")
        WebDriverWait(browser, 30).until(lambda d: "error" in msg.get_attribute("class"))
        assert "keep at least one candidate" in msg.text and "Traceback" not in msg.text
        assert _reviews(st) == []

        # keep two (click order = order kept), un-keep and keep again, reject one, star one, a note and a name
        img = {n: browser.find_element(By.CSS_SELECTOR, f"#g1-c{n} img") for n in cand}
        img[clicks[1]].click()
        img[clicks[1]].click()  # un-kept again
        img[clicks[0]].click()
        img[clicks[1]].click()
        browser.find_element(By.CSS_SELECTOR, f"#g1-c{rejected} button.reject").click()
        browser.find_element(By.CSS_SELECTOR, f"#g1-c{starred} button.star[data-stars='4']").click()
        assert browser.find_element(By.ID, "keep-1").get_attribute("value") == ",".join(map(str, clicks))
        assert browser.find_element(By.ID, "reject-1").get_attribute("value") == str(rejected)
        assert browser.find_element(By.ID, "stars-1").get_attribute("value") == f"{starred}=4"
        assert [browser.find_element(By.CSS_SELECTOR, f"#g1-c{n} .order").text for n in clicks] == ["1", "2"]
        assert "rejected" in browser.find_element(By.ID, f"g1-c{rejected}").get_attribute("class")
        assert len(browser.find_elements(By.CSS_SELECTOR, f"#g1-c{starred} button.star.on")) == 4
        browser.find_element(By.ID, "note-1").send_keys("the warmer two; the first is off-brief")
        name = browser.find_element(By.ID, "by-1")
        name.clear()
        name.send_keys("grace")
        browser.find_element(By.ID, "submit-1").click()
        done = browser.find_element(By.ID, "done")
        WebDriverWait(browser, 30).until(lambda d: "shown" in done.get_attribute("class"))
        assert f"atelier resume {run_id}" in done.text
        assert "ok" in msg.get_attribute("class") and f"kept #{clicks[0]}, #{clicks[1]}" in msg.text
        shot = tmp_path / "review-page.png"
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        served.thread.join(30)  # every open gate decided: the server stops by itself
        assert not served.thread.is_alive() and served.result == [True]
    finally:
        served.close()
    assert any("all decisions recorded" in m for m in served.messages)
    with socket.socket() as sock:  # the server is gone
        assert sock.connect_ex(("127.0.0.1", served.port)) != 0

    [review] = _reviews(st)
    assert review.kept == [cand[n].key for n in clicks]
    assert review.rejected == [cand[rejected].key]
    assert review.stars == {cand[starred].key: 4}
    assert review.note == "the warmer two; the first is off-brief" and review.by == "grace"
    assert review.decision == gate.decision and review.run_id == run_id and review.round == 1
    assert open_gates(st, run_id) == []

    # resumed (as `atelier review --serve --resume` / `atelier resume` do): the finals descend from the picks
    resume_run(run_id, home, None, None, report=False)
    with st.sessions() as s:
        assert s.get(Run, run_id).status == "completed"
        finals = [ra.asset_key for ra in s.scalars(select(RunAsset).where(RunAsset.run_id == run_id,
                                                                          RunAsset.final.is_(True)))]
        assert len(finals) == 2
        picks = {}
        for key in finals:
            stack = [queries.ancestry(s, key)]
            while stack:
                node = stack.pop()
                if node["asset"].stage == "pick":
                    picks[node["asset"].key] = node
                stack.extend(node["parents"])
    assert len(picks) == 2
    by_parent = {}
    for node in picks.values():
        [(parent, role)] = [(p["asset"].key, p["role"]) for p in node["parents"]]
        assert role == "source"
        by_parent[parent] = node["asset"].params
    assert set(by_parent) == {cand[n].key for n in clicks}  # the person's picks, not CLIP's
    for order, n in enumerate(clicks, start=1):
        params = by_parent[cand[n].key]
        assert params["kept_by"] == "grace" and params["note"] == "the warmer two; the first is off-brief"
        assert params["clip_rank"] == cand[n].clip_rank and params["order"] == order
        assert params["review"] == review.id and params["gate"] == gate.decision
    assert by_parent[cand[starred].key]["stars"] == 4
