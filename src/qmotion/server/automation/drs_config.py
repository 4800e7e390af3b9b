"""The operator's DRS configuration in the database, settings and placement rules, and the
checks of one move against the rules and the live cluster.

The checks decide on a snapshot (``qmotion.drs.recheck``, pure); this gathers it.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import ValidationError
from sqlalchemy import select

from qmotion.api.drs import DrsSettings, RuleCreate, RuleOut, SettingsSet
from qmotion.api.sizes import parse_duration_s
from qmotion.drs.errors import SnapshotError
from qmotion.drs.model import HostSpec, Rule, Snapshot, VmSpec
from qmotion.drs.recheck import LiveCluster, LiveHost, recheck, rule_refusal
from qmotion.drs.rules import broken_by_move, validate
from qmotion.server.automation.operations import PlannedMove
from qmotion.server.db import ACTIVE_TASK_STATES, Database, Host, PlacementRule, Task, Vm
from qmotion.server.errors import Conflict, Invalid, NotFound

SETTINGS_KEY = "drs"
# ``cluster set`` keys: the DrsSettings field and how its value is written.
SETTING_KEYS = {
    "drs.automation": "automation",
    "drs.threshold": "threshold",
    "drs.interval": "interval_s",
    "drs.max-moves": "max_moves",
    "drs.cooldown": "cooldown_s",
    "drs.proactive": "proactive",
    "host.down-grace": "down_grace_s",
}
DURATIONS = {"interval_s", "cooldown_s", "down_grace_s"}


def model_rule(r: PlacementRule) -> Rule:
    return Rule(
        name=r.name,
        kind=r.kind.replace("-", "_"),
        strength=r.strength,
        vms=list(r.vms),
        hosts=list(r.hosts),
    )


class DrsConfig:
    """DRS's settings (``cluster set``) and placement rules (``rule create``), and whether a
    move keeps to them."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # ------------------------------------------------------------------ settings

    def settings(self) -> DrsSettings:
        return DrsSettings.model_validate(self.db.setting(SETTINGS_KEY) or {})

    def set_settings(self, req: SettingsSet) -> DrsSettings:
        values = self.settings().model_dump()
        for key, text in req.values.items():
            name = SETTING_KEYS.get(key)
            if name is None:
                raise Invalid(
                    f"unknown setting {key!r} (settings: {', '.join(SETTING_KEYS)})", field=key
                )
            try:
                values[name] = parse_duration_s(text) if name in DURATIONS else text
            except ValueError as exc:
                raise Invalid(f"{key}: {exc}", field=key) from exc
        try:
            out = DrsSettings.model_validate(values)
        except ValidationError as exc:
            e = exc.errors()[0]
            key = next(k for k, v in SETTING_KEYS.items() if v == e["loc"][0])
            raise Invalid(f"{key}: {e['msg']}", field=key) from exc
        self.db.set_setting(SETTINGS_KEY, out.model_dump(mode="json"))
        return out

    # ------------------------------------------------------------------ rules

    def _rule_out(self, r: PlacementRule, placement: dict[str, str]) -> RuleOut:
        missing = [v for v in r.vms if v not in placement]
        model = model_rule(r)
        broken = sorted(
            {
                vm
                for vm in r.vms
                # Whatever the rule's strength: a should rule broken is what an operator
                # looks for in ``rule list`` too (DRS repairs it only when it pays).
                if vm in placement
                and broken_by_move([model], placement, vm, placement[vm], ("must", "should"))
            }
        )
        return RuleOut(
            name=r.name,
            kind=r.kind,
            strength=r.strength,
            vms=list(r.vms),
            hosts=list(r.hosts),
            missing_vms=missing,
            broken_by=broken,
            created_at=r.created_at,
        )

    def _placement(self) -> dict[str, str]:
        with self.db.session() as s:
            return {n: h for n, h in s.execute(select(Vm.name, Host.name).join(Vm.host))}

    def list_rules(self) -> list[RuleOut]:
        placement = self._placement()
        with self.db.session() as s:
            rows = s.scalars(select(PlacementRule).order_by(PlacementRule.name))
            return [self._rule_out(r, placement) for r in rows]

    def get_rule(self, name: str) -> RuleOut:
        placement = self._placement()
        with self.db.session() as s:
            r = s.scalars(select(PlacementRule).where(PlacementRule.name == name)).first()
            if r is None:
                raise NotFound(f"no rule named {name!r}")
            return self._rule_out(r, placement)

    def delete_rule(self, name: str) -> None:
        with self.db.session() as s:
            r = s.scalars(select(PlacementRule).where(PlacementRule.name == name)).first()
            if r is None:
                raise NotFound(f"no rule named {name!r}")
            s.delete(r)

    def create_rule(self, req: RuleCreate) -> RuleOut:
        new = Rule(
            name=req.name,
            kind=req.kind.replace("-", "_"),
            strength=req.strength,
            vms=req.vms,
            hosts=req.hosts,
        )
        with self.db.session() as s:
            if s.scalars(select(PlacementRule).where(PlacementRule.name == req.name)).first():
                raise Conflict(f"a rule named {req.name!r} exists", field="name")
            hosts = [h.name for h in s.scalars(select(Host))]
            unknown = [h for h in req.hosts if h not in hosts]
            if unknown:
                raise Invalid(
                    f"no host named {', '.join(unknown)} (hosts: {', '.join(sorted(hosts))})",
                    field="hosts",
                )
            existing = [model_rule(r) for r in s.scalars(select(PlacementRule))]
            vms = set(s.scalars(select(Vm.name)))
            # Contradictions are a property of the rules, whichever VMs exist: check them on
            # every VM any rule names.
            named = sorted(vms | {v for r in [*existing, new] for v in r.vms})
            probe = Snapshot(
                hosts=[HostSpec(name=h, cpu_capacity=1, memory_mib=1) for h in hosts],
                vms=[VmSpec(name=v, host=hosts[0], memory_mib=1) for v in named] if hosts else [],
                rules=[*existing, new],
            )
            if hosts:
                try:
                    validate(probe)
                except SnapshotError as exc:
                    raise Conflict(f"{exc}", code="rule_contradiction", field="name") from exc
            row = PlacementRule(
                name=req.name, kind=req.kind, strength=req.strength, vms=req.vms, hosts=req.hosts
            )
            s.add(row)
            s.flush()
            placement = {n: h for n, h in s.execute(select(Vm.name, Host.name).join(Vm.host))}
            return self._rule_out(row, placement)

    def rules(self) -> list[Rule]:
        with self.db.session() as s:
            return [model_rule(r) for r in s.scalars(select(PlacementRule))]

    # ------------------------------------------------------------------ checks

    def live(self, hosts: bool = False) -> LiveCluster:
        """The inventory the checks decide on: placement, rules, migrations under way, and
        with ``hosts`` the hosts and ``drs.proactive``."""
        with self.db.session() as s:
            placement = {n: h for n, h in s.execute(select(Vm.name, Host.name).join(Vm.host))}
            rules = [model_rule(r) for r in s.scalars(select(PlacementRule))]
            active = select(Task).where(
                Task.state.in_(ACTIVE_TASK_STATES), Task.destination.is_not(None)
            )
            inflight = {t.vm: t.destination for t in s.scalars(active) if t.vm and t.destination}
            states = {
                h.name: LiveHost(
                    state=h.state,
                    health=(h.facts or {}).get("health"),
                    health_reasons=tuple((h.facts or {}).get("health_reasons") or ()),
                )
                for h in (s.scalars(select(Host)) if hosts else ())
            }
        proactive = self.settings().proactive if hosts else False
        return LiveCluster(placement, rules, inflight, states, proactive)

    def check_move(self, vm: str, to: str, *, new: bool = False) -> None:
        """Refuse (409, naming the rule) a VM on ``to`` that a must rule forbids; ``new``: a
        VM being created."""
        why = rule_refusal(self.live(), vm, to, new=new)
        if why is not None:
            raise Conflict(why, code="rule_violation", vm=vm, host=to, field="to")

    def recheck(
        self,
        move: PlannedMove,
        planned: Sequence[PlannedMove] = (),
        submitted: Sequence[PlannedMove] = (),
    ) -> str | None:
        """A planned move against the live inventory, just before it starts (see
        ``qmotion.drs.recheck.recheck``): None to go ahead, else why not."""
        return recheck(
            self.live(hosts=True),
            move.vm,
            move.source,
            move.target,
            planned={m.vm: m.target for m in planned},
            submitted={m.vm: m.target for m in submitted},
        )
