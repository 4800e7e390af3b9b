"""The web console on the real manager over scripted agents: sign-in, CSRF, roles, every page,
the Migrate wizard to a finished task over its event stream, refusals shown in the page.

Outcomes are read back from the world's agents (where the VM runs) and from the API, not from
the page's word alone.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import httpx

from qmotion.api.access import Role
from qmotion.api.server import TaskOut
from qmotion.server.access import Identity
from qmotion.server.console import stream as stream_module
from qmotion.server.console.session import IDLE_S, MAX_AGE_S, Sessions
from qmotion.server.console.stream import MAX_STREAMS
from qmotion.server.db import Database
from tests.unit.agent_world import World
from tests.unit.manager_app import Client, run_manager

ORIGIN = {"Origin": "http://manager"}
RULE_UNKNOWN_HOST = 422  # hosts must exist: the field is named


def _cluster(tmp_path: Path) -> tuple[World, str]:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    db = Database(url)
    world = World(hosts=("h1", "h2", "h3"), polls_to_complete=2)
    world.register_hosts(db)
    world.add_running_vm(db, "web1", "h1", memory_mib=512)
    world.add_running_vm(db, "db1", "h2", memory_mib=512)
    db.engine.dispose()
    return world, url


async def sign_in(c: Client, token: str) -> httpx.AsyncClient:
    """A browser-like client: no bearer header, the session cookie from the sign-in."""
    b = httpx.AsyncClient(transport=c._transport, base_url="http://manager")
    r = await b.post("/ui/login", data={"token": token, "next": "/ui/"}, headers=ORIGIN)
    assert r.status_code == 303, r.text
    return b


def csrf_of(html: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', html)
    assert m, "no CSRF field in the page"
    return m.group(1)


def where(world: World, vm: str) -> str:
    copies = world.running_copies(vm)
    assert len(copies) == 1, copies
    return copies[0]


async def events(b: httpx.AsyncClient, task_id: int) -> list[tuple[str, str]]:
    """The task's event stream to its end, as (event, data) pairs."""
    out: list[tuple[str, str]] = []
    async with b.stream("GET", f"/ui/tasks/{task_id}/events", timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        name, data = "", []
        async for line in r.aiter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data.append(line[6:])
            elif line == "" and name:
                out.append((name, "\n".join(data)))
                if name == "done":
                    break
                name, data = "", []
    return out


async def user_token(c: Client, name: str, role: str) -> str:
    assert (await c.post("/v1/users", json={"name": name, "role": role})).status_code == 201
    r = await c.post(f"/v1/users/{name}/tokens", json={"label": "console"})
    token: str = r.json()["token"]
    return token


def test_wizard_moves_a_running_vm_and_the_task_page_streams_to_the_end(tmp_path: Path) -> None:
    world, url = _cluster(tmp_path)

    async def test(c: Client) -> None:
        b = await sign_in(c, await user_token(c, "olga", "operator"))
        page = (await b.get("/ui/")).text
        assert 'data-host="h1"' in page and 'data-vm="web1"' in page
        assert "/ui/vms/web1/migrate" in page  # an operator is offered Migrate
        # Step 1: every kind of move, the ones that cannot apply greyed with why.
        step1 = (await b.get("/ui/vms/web1/migrate")).text
        assert 'id="kind-host"' in step1 and "only a running VM moves live" not in step1
        assert re.search(r'id="kind-cold"[^>]*disabled', step1)
        # Step 2: every host, the current one greyed with its reason, never hidden.
        step2 = await b.get("/ui/vms/web1/migrate", params={"step": "target", "kind": "host"})
        assert step2.status_code == 200, step2.text
        for h in ("h1", "h2", "h3"):
            assert f'data-host="{h}"' in step2.text
        assert re.search(r'id="to-h1"[^>]*disabled', step2.text)
        # Step 3 and 4, then Finish.
        choice = {"kind": "host", "to": "h3", "max_downtime_ms": "500"}
        step3 = await b.get("/ui/vms/web1/migrate", params={"step": "options", **choice})
        assert step3.status_code == 200 and 'id="max_downtime_ms"' in step3.text
        review = await b.get("/ui/vms/web1/migrate", params={"step": "review", **choice})
        assert review.status_code == 200 and 'id="finish"' in review.text
        form = {**choice, "when": "now", "csrf": csrf_of(review.text)}
        done = await b.post("/ui/vms/web1/migrate", data=form, headers=ORIGIN)
        assert done.status_code == 303, done.text
        task_id = int(done.headers["location"].rsplit("/", 1)[1])
        stream = await events(b, task_id)
        assert stream[-1] == ("done", "succeeded"), stream[-3:]
        assert any(name == "progress" for name, _ in stream)
        final = (await b.get(f"/ui/tasks/{task_id}")).text
        assert "Flight recorder" in final and "<svg" in final
        # The outcome, from the API and from the agents.
        t = TaskOut.model_validate((await c.get(f"/v1/tasks/{task_id}")).json())
        assert t.state == "succeeded" and t.destination == "h3"
        assert (await c.get("/v1/vms/web1")).json()["host"] == "h3"
        assert where(world, "web1") == "h3"
        # The audit names the console's user and the task it started.
        audit = (await c.get("/v1/audit", params={"user": "olga"})).json()
        assert any(a["task_id"] == task_id for a in audit), audit
        await b.aclose()

    run_manager(world, url, test)


def test_a_viewer_sees_everything_and_is_offered_and_allowed_nothing(tmp_path: Path) -> None:
    world, url = _cluster(tmp_path)

    async def test(c: Client) -> None:
        b = await sign_in(c, await user_token(c, "vera", "viewer"))
        for path in (
            "/ui/",
            "/ui/vms/web1",
            "/ui/hosts/h1",
            "/ui/drs",
            "/ui/rules",
            "/ui/schedules",
            "/ui/tasks",
        ):
            r = await b.get(path)
            assert r.status_code == 200, (path, r.status_code)
            assert "Migrate…" not in r.text and "Enter maintenance" not in r.text, path
            assert "Create rule" not in r.text and "Apply all" not in r.text, path
        page = (await b.get("/ui/vms/web1")).text
        form = {"kind": "host", "to": "h3", "when": "now", "csrf": csrf_of(page)}
        r = await b.post("/ui/vms/web1/migrate", data=form, headers=ORIGIN)
        # Refused for the role (in the API's words), not for a missing CSRF token.
        assert r.status_code == 403 and "vera is viewer" in r.text, r.text
        r = await b.post("/ui/hosts/h1/maintenance", data={"csrf": csrf_of(page)}, headers=ORIGIN)
        assert r.status_code == 403 and "needs operator" in r.text, r.text
        assert where(world, "web1") == "h1"
        assert (await c.get("/v1/hosts/h1/maintenance")).json()["state"] == "up"
        await b.aclose()

    run_manager(world, url, test)


def test_sign_in_csrf_and_a_revoked_token_ending_the_session(tmp_path: Path) -> None:
    world, url = _cluster(tmp_path)

    async def test(c: Client) -> None:
        anon = httpx.AsyncClient(transport=c._transport, base_url="http://manager")
        r = await anon.get("/ui/vms/web1")
        assert r.status_code == 303 and r.headers["location"].startswith("/ui/login?next=")
        r = await anon.post("/ui/login", data={"token": "wrong-token-123456"}, headers=ORIGIN)
        assert r.status_code == 401 and "unknown or revoked token" in r.text
        # /v1 never takes the cookie.
        token = await user_token(c, "otto", "operator")
        b = await sign_in(c, token)
        assert (await b.get("/v1/vms")).status_code == 401
        page = (await b.get("/ui/hosts/h1")).text
        csrf = csrf_of(page)
        # A cross-site form post, and one without the session's token: refused, nothing done.
        evil = {"Origin": "https://evil.example"}
        r = await b.post("/ui/hosts/h1/maintenance", data={"csrf": csrf}, headers=evil)
        assert r.status_code == 403
        r = await b.post(
            "/ui/hosts/h1/maintenance", data={}, headers={"Sec-Fetch-Site": "same-origin"}
        )
        assert r.status_code == 403
        assert (await c.get("/v1/hosts/h1/maintenance")).json()["state"] == "up"
        # The token revoked: the session ends at once.
        tokens = (await c.get("/v1/users/otto/tokens")).json()
        assert (await c.delete(f"/v1/tokens/{tokens[0]['id']}")).status_code == 200
        r = await b.get("/ui/")
        assert r.status_code == 303 and "/ui/login" in r.headers["location"]
        r = await b.get("/ui/tasks/1/events")
        assert r.status_code == 401
        await b.aclose()
        await anon.aclose()

    run_manager(world, url, test)


def test_a_must_rule_refusal_is_shown_in_the_page_with_the_choices_kept(tmp_path: Path) -> None:
    world, url = _cluster(tmp_path)

    async def test(c: Client) -> None:
        rule = {"name": "apart", "kind": "anti-affinity", "vms": ["web1", "db1"]}
        assert (await c.post("/v1/rules", json=rule)).status_code == 201
        b = await sign_in(c, await user_token(c, "olga", "operator"))
        # Step 2 shows h2 refused, naming the rule.
        step2 = await b.get("/ui/vms/web1/migrate", params={"step": "target", "kind": "host"})
        row = step2.text.split('data-host="h2"', 1)[1].split("</tr>", 1)[0]
        assert "apart" in row and "disabled" in row
        # Submitted anyway (a stale page): the API's 409, worded as the CLI words it.
        review = await b.get(
            "/ui/vms/web1/migrate", params={"step": "review", "kind": "host", "to": "h2"}
        )
        form = {
            "kind": "host",
            "to": "h2",
            "max_downtime_ms": "700",
            "when": "now",
            "csrf": csrf_of(review.text),
        }
        r = await b.post("/ui/vms/web1/migrate", data=form, headers=ORIGIN)
        assert r.status_code == 409, r.text
        assert 'role="alert"' in r.text and "[rule_violation]" in r.text
        assert 'name="max_downtime_ms" value="700"' in r.text  # the choices kept
        assert where(world, "web1") == "h1"
        # A rule form refused keeps its values and marks the field.
        page = (await b.get("/ui/rules")).text
        bad = {
            "name": "x",
            "kind": "run-on",
            "vms": "web1",
            "hosts": "nohost",
            "csrf": csrf_of(page),
        }
        r = await b.post("/ui/rules", data=bad, headers=ORIGIN)
        assert r.status_code == RULE_UNKNOWN_HOST, r.text
        assert 'role="alert"' in r.text and "nohost" in r.text.split('role="alert"')[1]
        hosts_field = r.text.split('id="rule-hosts"')[1].split(">")[0]
        assert 'value="nohost"' in hosts_field and 'aria-invalid="true"' in hosts_field
        await b.aclose()

    run_manager(world, url, test)


def test_maintenance_from_the_host_page_shows_the_evacuation(tmp_path: Path) -> None:
    world, url = _cluster(tmp_path)

    async def test(c: Client) -> None:
        b = await sign_in(c, await user_token(c, "olga", "operator"))
        page = (await b.get("/ui/hosts/h1")).text
        r = await b.post("/ui/hosts/h1/maintenance", data={"csrf": csrf_of(page)}, headers=ORIGIN)
        assert r.status_code == 303, r.text
        task_id = int(r.headers["location"].rsplit("/", 1)[1])
        stream = await events(b, task_id)
        assert stream[-1] == ("done", "succeeded"), stream[-3:]
        final = (await b.get(f"/ui/tasks/{task_id}")).text
        assert 'data-vm="web1"' in final and "moved" in final
        assert where(world, "web1") != "h1"
        host = (await b.get("/ui/hosts/h1")).text
        assert 'id="host-state">maintenance' in host and "Exit maintenance" in host
        # Greyed in the wizard, with the reason.
        step2 = await b.get("/ui/vms/db1/migrate", params={"step": "target", "kind": "host"})
        row = step2.text.split('data-host="h1"', 1)[1].split("</tr>", 1)[0]
        assert "maintenance" in row and "disabled" in row
        await b.aclose()

    run_manager(world, url, test)


def test_schedules_drs_and_rules_from_their_pages(tmp_path: Path) -> None:
    world, url = _cluster(tmp_path)

    async def test(c: Client) -> None:
        b = await sign_in(c, await user_token(c, "olga", "operator"))
        # The wizard schedules a host move instead of running it.
        review = await b.get(
            "/ui/vms/web1/migrate", params={"step": "review", "kind": "host", "to": "h2"}
        )
        form = {
            "kind": "host",
            "to": "h2",
            "when": "at",
            "at": "2099-01-02T03:04",
            "csrf": csrf_of(review.text),
        }
        r = await b.post("/ui/vms/web1/migrate", data=form, headers=ORIGIN)
        assert r.status_code == 303 and r.headers["location"] == "/ui/schedules", r.text
        made = (await c.get("/v1/schedules")).json()
        assert [(s["action"], s["vm"], s["to"]) for s in made] == [("migrate", "web1", "h2")]
        assert datetime.fromisoformat(made[0]["at"]) == datetime(2099, 1, 2, 3, 4, tzinfo=UTC)
        assert where(world, "web1") == "h1"  # scheduled, not run
        # A bad cron refused in the page, naming the field, the values kept.
        page = (await b.get("/ui/schedules")).text
        bad = {"action": "drs", "cron": "every day", "csrf": csrf_of(page)}
        r = await b.post("/ui/schedules", data=bad, headers=ORIGIN)
        assert r.status_code == 422 and "field=cron" in r.text and 'value="every day"' in r.text
        # Deleted from its page.
        sid = made[0]["id"]
        r = await b.post(
            f"/ui/schedules/{sid}/delete", data={"csrf": csrf_of(page)}, headers=ORIGIN
        )
        assert r.status_code == 303 and (await c.get("/v1/schedules")).json() == []
        # DRS: plan now, from its page (a balanced cluster plans nothing).
        page = (await b.get("/ui/drs")).text
        r = await b.post("/ui/drs/run", data={"csrf": csrf_of(page)}, headers=ORIGIN)
        assert r.status_code == 303
        assert "No recommendations" in (await b.get("/ui/drs")).text
        # Apply with nothing chosen: the API's 422 in the page.
        r = await b.post(
            "/ui/drs/apply", data={"csrf": csrf_of(page), "which": "selected"}, headers=ORIGIN
        )
        assert r.status_code == 422 and 'role="alert"' in r.text
        # A rule created and deleted from its page.
        page = (await b.get("/ui/rules")).text
        rule = {
            "name": "apart",
            "kind": "anti-affinity",
            "strength": "should",
            "vms": "web1, db1",
            "csrf": csrf_of(page),
        }
        assert (await b.post("/ui/rules", data=rule, headers=ORIGIN)).status_code == 303
        assert [r["name"] for r in (await c.get("/v1/rules")).json()] == ["apart"]
        r = await b.post("/ui/rules/apart/delete", data={"csrf": csrf_of(page)}, headers=ORIGIN)
        assert r.status_code == 303 and (await c.get("/v1/rules")).json() == []
        await b.aclose()

    run_manager(world, url, test)


def test_sessions_end_when_they_should_and_forms_need_our_origin(tmp_path: Path) -> None:
    world, url = _cluster(tmp_path)

    async def test(c: Client) -> None:
        token = await user_token(c, "otto", "operator")
        anon = httpx.AsyncClient(transport=c._transport, base_url="http://manager")
        # The sign-in itself: refused from another site, and with no origin at all.
        r = await anon.post(
            "/ui/login", data={"token": token}, headers={"Origin": "https://evil.example"}
        )
        assert r.status_code == 403 and "qmotion" not in anon.cookies
        r = await anon.post("/ui/login", data={"token": token})
        assert r.status_code == 403
        # After signing in, only a console path: never another site.
        for evil in ("https://evil.example/", "//evil.example/ui/", "/\\\\evil.example"):
            r = await anon.post("/ui/login", data={"token": token, "next": evil}, headers=ORIGIN)
            assert r.status_code == 303 and r.headers["location"] == "/ui/", evil
        b = await sign_in(c, token)
        page = (await b.get("/ui/")).text
        # A form posted after the session ended goes to the sign-in and back to its page.
        r = await b.post("/ui/logout", data={"csrf": csrf_of(page)}, headers=ORIGIN)
        assert r.status_code == 303
        r = await b.post(
            "/ui/hosts/h1/maintenance",
            data={"csrf": csrf_of(page)},
            headers={**ORIGIN, "Referer": "http://manager/ui/hosts/h1"},
        )
        assert r.status_code == 303
        assert r.headers["location"] == "/ui/login?next=%2Fui%2Fhosts%2Fh1"
        assert (await c.get("/v1/hosts/h1/maintenance")).json()["state"] == "up"
        await anon.aclose()
        await b.aclose()

    run_manager(world, url, test)


def test_idle_and_old_sessions_end(db_url: str) -> None:
    class Tokens:
        def identify(self, token: str) -> Identity | None:
            return Identity("u", Role.OPERATOR) if token == "good" else None

        def identify_digest(self, d: str) -> Identity | None:
            return Identity("u", Role.OPERATOR)

    now = [1000.0]
    sessions = Sessions(Tokens(), Database(db_url), clock=lambda: now[0])  # type: ignore[arg-type]
    assert sessions.sign_in("bad") is None
    found = sessions.sign_in("good")
    assert found is not None
    secret = found[0]
    now[0] += IDLE_S - 1
    assert sessions.find(secret) is not None  # used: the idle clock starts again
    now[0] += IDLE_S - 1
    assert sessions.find(secret) is not None
    now[0] += IDLE_S + 1
    assert sessions.find(secret) is None  # idle too long
    secret = sessions.sign_in("good")[0]  # type: ignore[index]
    for _ in range(int(MAX_AGE_S // (IDLE_S / 2)) + 1):
        now[0] += IDLE_S / 2
        if sessions.find(secret) is None:
            break
    assert sessions.find(secret) is None and now[0] - 1000.0 < MAX_AGE_S + 4 * IDLE_S


def test_finish_refuses_a_kind_of_move_the_vm_no_longer_allows(tmp_path: Path) -> None:
    world, url = _cluster(tmp_path)

    async def test(c: Client) -> None:
        b = await sign_in(c, await user_token(c, "olga", "operator"))
        review = await b.get(
            "/ui/vms/web1/migrate", params={"step": "review", "kind": "host", "to": "h2"}
        )
        assert (await c.post("/v1/vms/web1/stop", json={"force": True})).status_code == 200
        form = {"kind": "host", "to": "h2", "when": "now", "csrf": csrf_of(review.text)}
        r = await b.post("/ui/vms/web1/migrate", data=form, headers=ORIGIN)
        # Reviewed as a live move; the VM stopped since: refused, not turned into a cold move.
        assert r.status_code == 409 and "not possible now" in r.text, r.text
        assert (await c.get("/v1/vms/web1")).json()["host"] == "h1"
        assert (await c.get("/v1/tasks")).json() == []
        # A scheduled move with options it would not carry: refused, naming the field.
        form = {
            "kind": "host",
            "to": "h2",
            "when": "cron",
            "cron": "0 2 * * *",
            "max_downtime_ms": "500",
            "csrf": csrf_of(review.text),
        }
        assert (await c.post("/v1/vms/web1/start")).status_code == 200
        r = await b.post("/ui/vms/web1/migrate", data=form, headers=ORIGIN)
        assert r.status_code == 422 and "field=when" in r.text, r.text
        assert (await c.get("/v1/schedules")).json() == []
        await b.aclose()

    run_manager(world, url, test)


def test_the_small_refusals_each_in_its_own_words(tmp_path: Path) -> None:
    world, url = _cluster(tmp_path)

    async def test(c: Client) -> None:
        b = await sign_in(c, await user_token(c, "olga", "operator"))
        # The sign-in is audited under the user who signed in.
        audit = (await c.get("/v1/audit", params={"user": "olga"})).json()
        assert any(a["route"] == "/ui/login" and a["outcome"] == "ok" for a in audit), audit
        page = (await b.get("/ui/drs")).text
        csrf = csrf_of(page)
        # The dry run is a state-changing call on the hosts: no CSRF token, no dry run.
        params = {"kind": "host", "to": "h2"}
        r = await b.post("/ui/vms/web1/migrate/predict", data=params, headers=ORIGIN)
        assert r.status_code == 403
        # Recommendation ids that are not numbers: 422 naming the field.
        r = await b.post("/ui/drs/apply", data={"csrf": csrf, "ids": "x"}, headers=ORIGIN)
        assert r.status_code == 422 and "field=ids" in r.text and "[invalid]" in r.text
        # Cancelling a task that does not exist: the console's own 404 page.
        r = await b.post("/ui/tasks/999/cancel", data={"csrf": csrf}, headers=ORIGIN)
        assert r.status_code == 404 and "text/html" in r.headers["content-type"]
        # A schedule would not carry the priority: refused, not dropped.
        form = {**params, "when": "at", "at": "2099-01-01T00:00", "priority": "high", "csrf": csrf}
        r = await b.post("/ui/vms/web1/migrate", data=form, headers=ORIGIN)
        assert r.status_code == 422 and "priority" in r.text and "field=when" in r.text
        assert (await c.get("/v1/schedules")).json() == []
        # An event stream of an unknown task: 404; of a finished one: ends at once.
        assert (await b.get("/ui/tasks/999/events")).status_code == 404
        await b.aclose()

    run_manager(world, url, test)


def test_a_session_opens_a_few_streams_at_most(tmp_path: Path) -> None:
    world, url = _cluster(tmp_path)

    async def test(c: Client) -> None:
        b = await sign_in(c, await user_token(c, "olga", "operator"))
        csrf = csrf_of((await b.get("/ui/")).text)  # the key of this session's streams
        task = (await c.post("/v1/vms/web1/migrate", json={"to": "h2"})).json()
        path = f"/ui/tasks/{task['id']}/events"
        # (The in-process transport buffers a whole response: the streams open "at once"
        # are stood in for by the count itself.)
        stream_module._open[csrf] = MAX_STREAMS
        try:
            assert (await b.get(path)).status_code == 429
        finally:
            del stream_module._open[csrf]
        got = await events(b, task["id"])
        assert got[-1] == ("done", "succeeded")
        assert csrf not in stream_module._open  # given back when the stream ended
        await b.aclose()

    run_manager(world, url, test)
