"""Wire models of the manager's DRS API: rules, cluster settings, recommendations, maintenance."""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from qmotion.api.vm import NAME_PATTERN, StrictModel

RuleKindName = Literal["affinity", "anti-affinity", "run-on", "not-run-on"]
HostStateName = Literal["up", "down", "maintenance", "entering-maintenance"]


class Automation(StrEnum):
    MANUAL = "manual"  # recommend only
    PARTIAL = "partial"  # place new VMs automatically, recommend moves
    FULL = "full"  # apply moves at or above the threshold's priority


class RuleCreate(StrictModel):
    """A placement rule. VMs may be named before they exist (a rule for a VM about to be
    created); hosts must exist."""

    name: str = Field(pattern=NAME_PATTERN)
    kind: RuleKindName
    strength: Literal["must", "should"] = "must"
    vms: list[str] = Field(min_length=1, max_length=256)
    hosts: list[str] = Field(default_factory=list, max_length=256)

    @field_validator("vms", "hosts")
    @classmethod
    def _names(cls, names: list[str]) -> list[str]:
        for n in names:
            if not re.fullmatch(NAME_PATTERN, n):
                raise ValueError(f"{n!r} is not a valid name")
        if len(set(names)) != len(names):
            raise ValueError("a name is given twice")
        return names

    @model_validator(mode="after")
    def _shape(self) -> RuleCreate:
        if self.kind in ("affinity", "anti-affinity"):
            if len(self.vms) < 2:
                raise ValueError(f"an {self.kind} rule needs at least two VMs")
            if self.hosts:
                raise ValueError(f"an {self.kind} rule names VMs only, not hosts")
        elif not self.hosts:
            raise ValueError(f"a {self.kind} rule needs the hosts it names (hosts)")
        return self


class RuleOut(BaseModel):
    name: str
    kind: RuleKindName
    strength: Literal["must", "should"]
    vms: list[str]
    hosts: list[str]
    missing_vms: list[str] = Field(description="named VMs that do not exist (yet)")
    broken_by: list[str] = Field(description="VMs whose placement breaks the rule now")
    created_at: datetime


class DrsSettings(BaseModel):
    # Partial: new VMs are placed by DRS, balancing moves are recommended.
    automation: Automation = Automation.PARTIAL
    threshold: int = Field(default=3, ge=1, le=5)
    interval_s: int = Field(default=300, ge=10, le=7 * 86400)
    max_moves: int = Field(
        default=8, ge=0, le=1000, description="balancing migrations per run (storm control)"
    )
    cooldown_s: int = Field(
        default=3600, ge=0, le=7 * 86400, description="a VM moved by DRS stays this long"
    )
    proactive: bool = Field(
        default=False,
        description="evacuate hosts whose agent reports degraded health (a failing datastore)",
    )
    down_grace_s: int = Field(
        default=60, ge=0, le=86400, description="an agent silent this long marks its host down"
    )


class SettingsSet(StrictModel):
    """``key=value`` pairs, e.g. ``drs.automation=full``, ``drs.interval=5m``."""

    values: dict[str, str] = Field(min_length=1, max_length=32)


class RecommendationState(StrEnum):
    PENDING = "pending"
    APPLYING = "applying"
    APPLIED = "applied"
    FAILED = "failed"
    SKIPPED = "skipped"
    SUPERSEDED = "superseded"


class RecommendationOut(BaseModel):
    id: int
    run_id: int
    vm: str
    source: str
    target: str
    priority: int = Field(description="1 mandatory (evacuation, must rule) ... 5 slight gain")
    reason: str
    gain: float = Field(description="expected reduction of the imbalance, net of its cost")
    wave: int
    state: RecommendationState
    task_id: int | None
    message: str | None
    created_at: datetime
    retry_after: datetime | None = Field(
        default=None,
        description="a failed move: not planned again before this (back-off after failures)",
    )


class DrsRunOut(BaseModel):
    run_id: int
    planned_at: datetime
    automation: Automation
    threshold: int
    imbalance_before: float
    imbalance_after: float
    recommendations: list[RecommendationOut]
    unplaced: list[dict[str, str]]
    broken_should_rules: list[dict[str, object]]
    applied_task: int | None = Field(
        default=None, description="with automation full: the task applying the moves"
    )
    measured_vms: int = Field(description="VMs whose demand came from measured samples")
    left: list[dict[str, str]] = Field(
        default_factory=list,
        description="VMs DRS would have moved but left, with why: a move the guest would "
        "notice (throttled) or that would not converge over the link, or one backing off "
        "after failing",
    )


class DrsState(BaseModel):
    """The live cluster's balance, as DRS measures it now."""

    imbalance: float = Field(description="RMS of the spreads of hosts' normalised CPU and memory")
    broken_must_rules: int = Field(description="VMs placed against a must rule")
    measured_vms: int


class ApplyRequest(StrictModel):
    # Recommendation ids are the database's 64-bit integer keys.
    ids: list[Annotated[int, Field(ge=1, le=2**63 - 1)]] = Field(
        default_factory=list, max_length=1000
    )
    all: bool = False

    @model_validator(mode="after")
    def _some(self) -> ApplyRequest:
        if not self.ids and not self.all:
            raise ValueError("give recommendation ids or all")
        if self.ids and self.all:
            raise ValueError("give recommendation ids or all, not both")
        return self


class MoveOutcome(BaseModel):
    """One VM of a DRS operation (apply, maintenance): where it went, or why it did not."""

    vm: str
    source: str
    target: str | None
    outcome: Literal["moved", "failed", "skipped", "unplaced", "pending"]
    task_id: int | None = None
    reason: str | None = None


class OperationReport(BaseModel):
    """The result of a DRS operation task (drs-apply, maintenance, maintenance-exit)."""

    kind: str
    host: str | None = None
    moves: list[MoveOutcome] = Field(default_factory=list)
    spread: dict[str, int] = Field(
        default_factory=dict, description="VMs moved to each host by this operation"
    )
    remaining: list[str] = Field(default_factory=list, description="VMs still on the host")
    wall_ms: float = 0.0


class MaintenanceEnter(StrictModel):
    pass


class MaintenanceExit(StrictModel):
    return_vms: bool = Field(
        default=False, description="move the VMs evacuated by the last maintenance back"
    )


class MaintenanceOut(BaseModel):
    host: str
    state: HostStateName
    task_id: int | None
    reason: str | None = Field(description="why the host is not empty yet, if it is stuck")


class PlacementCandidate(BaseModel):
    host: str
    feasible: bool
    score: float
    reasons: list[str]


class Placement(BaseModel):
    """Why a new VM went where it did: the chosen host and the runners-up."""

    host: str
    chosen_by: Literal["drs", "operator"]
    candidates: list[PlacementCandidate]


class TargetRefusal(BaseModel):
    """One reason a migration to the target would be refused at submission."""

    code: str = Field(
        description="the error code the submission would answer with, e.g. bridge_missing, "
        "datastore_unreachable, host_unavailable, rule_violation"
    )
    message: str = Field(description="why, as the submission's error would say it")
    field: str | None = Field(
        default=None, description="the request field it concerns (to, datastore), if any"
    )


class MigrationTarget(BaseModel):
    """One host as a target of moving an existing VM (the Migrate wizard's target step):
    DRS's ranking of it and the pre-checks' verdict. A refused host is listed, never hidden."""

    host: str = Field(description="the host's name")
    current: bool = Field(
        description="the VM's host now: with a datastore, the target of a storage move (the VM "
        "stays, its disks move); without, not a target"
    )
    feasible: bool = Field(
        description="the move may be submitted: the ranking allows the host and no pre-check "
        "refuses it (checks that need an agent, listed in notes, run at submission)"
    )
    score: float = Field(
        description="the ranking's score, as `drs place` and `vm create` rank hosts: the "
        "change of the cluster's imbalance with the VM there, plus 1 if a should rule is "
        "broken; lower is better, comparable between hosts of one answer only"
    )
    reasons: list[str] = Field(
        description="the ranking's reasons: current host, maintenance, health, memory, the "
        "rules it breaks, or the CPU and memory committed after the move"
    )
    refusals: list[TargetRefusal] = Field(
        description="the pre-checks' verdict: what a submission would refuse (the must rules "
        "first); empty when it would be accepted"
    )
    free_memory_mib_after: int = Field(
        description="the host's memory for VMs (less its reservation and migrations under way) "
        "minus what its VMs allocate, with this VM moved there (the current host: now); "
        "negative when it does not fit"
    )
    cpu_committed_after: float = Field(
        description="the host's CPU demand with this VM there, as a fraction of its cores "
        "(measured demand where sampled, else vCPUs; the current host: now)"
    )
    datastores: list[str] = Field(description="the datastores the host reaches, from its facts")
    notes: list[str] = Field(
        default_factory=list,
        description="what is checked only at submission, as it asks a host's agent (free "
        "space on the datastore for the disks)",
    )
