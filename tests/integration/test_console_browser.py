"""The web console in a real browser against the real manager and a real lab: a running guest
moved through the Migrate wizard and watched to the end over server-sent events, a Storage
vMotion, a host in maintenance greyed with its reason, an evacuation from the host page, a
must rule's refusal in the page, and a viewer offered nothing to press.

Each outcome is checked through the API and in the guest (its memory checker), not taken
from the page. The screenshots in docs/console/ are made here (``make screenshots``).
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

from playwright.sync_api import Page, expect

from qmotion.api.access import Role
from qmotion.api.server import DiskCreate, TaskState
from qmotion.api.vm import VmState
from qmotion.client.server import ServerClient
from qmotion.lab import Lab
from qmotion.lab.netns import run_in
from qmotion.probe.guest import mem_check
from tests.integration.browser import (
    NARROW,
    chromium,
    overflow,
    page_for,
    shot,
    shots_dir,
    unlabelled,
)
from tests.integration.conftest import MakeVm, ip_of

TASK_TIMEOUT_MS = 240_000


def sign_in(page: Page, base: str, token: str) -> None:
    page.goto(f"{base}/ui/")
    expect(page).to_have_url(re.compile(r"/ui/login\?next="))
    page.get_by_label("API token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Cluster")).to_be_visible()


def labelled(page: Page) -> None:
    assert unlabelled(page) == [], f"controls without a label on {page.url}"


def finish_and_watch(page: Page) -> int:
    """Press Finish; the task page follows the task over its stream to the end."""
    page.get_by_role("button", name="Finish").click()
    expect(page).to_have_url(re.compile(r"/ui/tasks/\d+$"))
    task_id = int(page.url.rsplit("/", 1)[1])
    expect(page.locator("#task-state")).to_have_text(
        re.compile("succeeded|failed|cancelled"), timeout=TASK_TIMEOUT_MS
    )
    return task_id


def token_for(server: ServerClient, user: str, role: Role) -> str:
    with contextlib.suppress(Exception):
        server.add_user(user, role)
    return server.create_token(user, "console test").token


def test_wizard_live_migration_and_storage_vmotion_in_a_browser(
    lab: Lab, server: ServerClient, make_vm: MakeVm, tmp_path: Path
) -> None:
    base = lab.record.manager_url
    assert base is not None
    shots = shots_dir(tmp_path)
    live = make_vm("h1", fill=24, dirty=8)  # it writes while it moves
    disked = make_vm("h1", fill=8, disk=DiskCreate(datastore="shared", size_mib=64))
    token = token_for(server, "cora", Role.OPERATOR)
    with chromium(base) as browser:
        page, guard = page_for(browser, base)
        sign_in(page, base, token)
        expect(page.locator(f'tr[data-vm="{live.name}"]')).to_be_visible()
        labelled(page)
        shot(page, shots, "cluster")

        # The wizard from the VM's page, step 1 by keyboard: the first kind is chosen,
        # Tab reaches Next, Enter goes on.
        page.goto(f"{base}/ui/vms/{live.name}")
        page.get_by_role("link", name="Migrate…").click()
        expect(page.get_by_role("radio", name="Change host")).to_be_checked()
        expect(page.get_by_role("radio", name="Move while stopped")).to_be_disabled()
        labelled(page)
        shot(page, shots, "wizard-1-type")
        page.get_by_role("radio", name="Change host").focus()
        page.keyboard.press("ArrowDown")
        expect(page.get_by_role("radio", name="Change datastore (Storage vMotion)")).to_be_checked()
        page.keyboard.press("ArrowUp")
        expect(page.get_by_role("radio", name="Change host")).to_be_checked()
        next_button = page.get_by_role("button", name="Next")
        for _ in range(4):  # the radio group is one stop, then Cancel, then Next
            page.keyboard.press("Tab")
            if next_button.evaluate("b => b === document.activeElement"):
                break
        expect(next_button).to_be_focused()
        page.keyboard.press("Enter")

        # Step 2: every host, ranked as the API ranks them, the current one refused.
        expect(page.locator("table.targets")).to_be_visible()
        ranked = server.migration_targets(live.name)
        rows = page.locator("table.targets tbody tr")
        assert [rows.nth(i).get_attribute("data-host") for i in range(rows.count())] == [
            t.host for t in ranked
        ]
        expect(page.locator("#to-h1")).to_be_disabled()
        target = next(t.host for t in ranked if t.feasible)
        expect(page.locator(f"#to-{target}")).to_be_checked()
        labelled(page)
        shot(page, shots, "wizard-2-target")
        page.get_by_role("button", name="Next").click()

        # Step 3: convergence knobs and when.
        page.get_by_label("Longest pause at switchover (ms)").fill("400")
        page.get_by_label("Priority", exact=True).select_option("high")
        labelled(page)
        shot(page, shots, "wizard-3-options")
        page.get_by_role("button", name="Next").click()

        # Step 4: what will happen, and the dry run's prediction on request.
        expect(page.locator("#review")).to_contain_text(f"to {target}")
        expect(page.locator("#review")).to_contain_text("High priority")
        page.get_by_role("button", name="Predict").click()
        expect(page.locator("#prediction")).to_contain_text("Converges", timeout=90_000)
        shot(page, shots, "wizard-4-review")
        requests: list[str] = []
        page.on("request", lambda r: requests.append(r.url))
        task_id = finish_and_watch(page)
        expect(page.locator("#task-state")).to_have_text("succeeded")
        expect(page.locator("figure.chart svg")).to_be_visible()
        assert page.locator("figure.chart svg circle").count() >= 1
        shot(page, shots, "task-finished")
        # The stream pushed the progress: the page opened its event stream, and was loaded
        # twice at most (opened, and once done), never polled.
        assert any(u.endswith(f"/ui/tasks/{task_id}/events") for u in requests), requests
        loads = [u for u in requests if u.endswith(f"/ui/tasks/{task_id}")]
        assert 1 <= len(loads) <= 2, loads

        t = server.task(task_id)
        assert t.state == TaskState.SUCCEEDED and t.result is not None
        assert "high priority" in t.events[0].message, t.events[0]
        moved = server.vm(live.name)
        assert moved.host == target and moved.state == VmState.RUNNING
        assert run_in(lab.record.client_namespace, lambda: mem_check(ip_of(live)))["consistent"]

        # A Storage vMotion through the same wizard.
        page.goto(f"{base}/ui/vms/{disked.name}/migrate")
        page.get_by_role("radio", name="Change datastore (Storage vMotion)").check()
        page.get_by_role("button", name="Next").click()
        expect(page.locator("#ds-shared")).to_be_disabled()  # its disk is there already
        page.get_by_role("radio", name="local-h1").check()
        shot(page, shots, "wizard-2-datastore")
        page.get_by_role("button", name="Next").click()
        page.get_by_role("button", name="Next").click()
        expect(page.locator("#review")).to_contain_text("datastore local-h1")
        finish_and_watch(page)
        expect(page.locator("#task-state")).to_have_text("succeeded")
        after = server.vm(disked.name)
        assert after.host == "h1" and [d.datastore for d in after.disks] == ["local-h1"]
        assert run_in(lab.record.client_namespace, lambda: mem_check(ip_of(disked)))["consistent"]

        # A narrow window: nothing but the tables' own boxes scrolls sideways.
        small, _ = page_for(browser, base, NARROW)
        sign_in(small, base, token)
        assert overflow(small) <= 0, overflow(small)
        shot(small, shots, "cluster-narrow")
        assert guard.foreign == [], guard.foreign


def test_maintenance_refusals_and_a_viewer_in_a_browser(
    lab: Lab, server: ServerClient, make_vm: MakeVm, tmp_path: Path
) -> None:
    base = lab.record.manager_url
    assert base is not None
    shots = shots_dir(tmp_path)
    vm = make_vm("h2", fill=8)
    operator = token_for(server, "cora", Role.OPERATOR)
    viewer = token_for(server, "vic", Role.VIEWER)
    rule = f"keep-{vm.name}"
    try:
        with chromium(base) as browser:
            page, guard = page_for(browser, base)
            sign_in(page, base, operator)

            # Maintenance from the host page: the evacuation, VM by VM, to the end.
            page.goto(f"{base}/ui/hosts/h2")
            page.get_by_role("button", name="Enter maintenance").click()
            expect(page).to_have_url(re.compile(r"/ui/tasks/\d+$"))
            expect(page.locator("#task-state")).to_have_text("succeeded", timeout=TASK_TIMEOUT_MS)
            expect(page.locator(f'table.moves tr[data-vm="{vm.name}"]')).to_contain_text("moved")
            shot(page, shots, "maintenance-evacuation")
            now = server.vm(vm.name).host
            assert now != "h2"
            assert run_in(lab.record.client_namespace, lambda: mem_check(ip_of(vm)))["consistent"]

            # The host in maintenance is offered greyed, with why.
            page.goto(f"{base}/ui/vms/{vm.name}/migrate?step=target&kind=host")
            row = page.locator('table.targets tr[data-host="h2"]')
            expect(row).to_contain_text("maintenance")
            expect(page.locator("#to-h2")).to_be_disabled()
            shot(page, shots, "wizard-2-refused-target")

            # A must rule created in the console; the move it forbids refused in the page,
            # worded as the CLI words it, the choices kept.
            other = next(h for h in ("h1", "h3") if h != now)
            page.goto(f"{base}/ui/rules")
            page.get_by_label("Name").fill(rule)
            page.get_by_label("Kind").select_option("not-run-on")
            page.get_by_label("VMs (comma-separated)").fill(vm.name)
            page.get_by_label("Hosts (run-on and not-run-on; comma-separated)").fill(other)
            page.get_by_role("button", name="Create rule").click()
            expect(page.locator(f'tr[data-rule="{rule}"]')).to_be_visible()
            page.goto(
                f"{base}/ui/vms/{vm.name}/migrate?step=review&kind=host&to={other}"
                "&max_downtime_ms=900"
            )
            page.get_by_role("button", name="Finish").click()
            alert = page.get_by_role("alert")
            expect(alert).to_contain_text("[rule_violation]")
            expect(alert).to_contain_text(rule)
            kept = page.locator('#wizard input[name="max_downtime_ms"]')
            assert kept.get_attribute("value") == "900"
            shot(page, shots, "refused-by-rule")
            assert server.vm(vm.name).host == now

            # Exit maintenance from the host page.
            page.goto(f"{base}/ui/hosts/h2")
            page.get_by_role("button", name="Exit maintenance").click()
            expect(page.locator("#task-state")).to_have_text("succeeded", timeout=TASK_TIMEOUT_MS)
            assert server.maintenance("h2").state == "up"
            assert guard.foreign == [], guard.foreign

            # A viewer sees the same pages and is offered nothing that changes anything.
            seen, _ = page_for(browser, base)
            sign_in(seen, base, viewer)
            expect(seen.locator(f'tr[data-vm="{vm.name}"]')).to_be_visible()
            expect(seen.get_by_role("link", name="Migrate…")).to_have_count(0)
            seen.goto(f"{base}/ui/vms/{vm.name}")
            expect(seen.locator("#migrate")).to_have_count(0)
            seen.goto(f"{base}/ui/hosts/h2")
            expect(seen.get_by_role("button", name="Enter maintenance")).to_have_count(0)
            seen.goto(f"{base}/ui/rules")
            expect(seen.get_by_role("button", name="Create rule")).to_have_count(0)
    finally:
        with contextlib.suppress(Exception):
            server.delete_rule(rule)
        if server.maintenance("h2").state != "up":
            server.exit_maintenance("h2")
