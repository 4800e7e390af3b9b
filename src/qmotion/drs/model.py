"""The cluster snapshot DRS plans on, its documented JSON form, and the policy.

Snapshot JSON (all sizes in MiB, CPU in cores)::

    {
      "hosts": [{"name": "h1", "cpu_capacity": 32, "memory_mib": 65536,
                 "health": "ok", "maintenance": false, "max_migrations": 4}],
      "vms":   [{"name": "web1", "host": "h1", "memory_mib": 4096, "vcpus": 2,
                 "cpu_demand": 1.5, "memory_demand_mib": 3000, "dirty_rate_mib_s": 10}],
      "rules": [{"name": "web-apart", "kind": "anti_affinity", "strength": "must",
                 "vms": ["web1", "web2"]},
                {"name": "db-fast", "kind": "run_on", "strength": "should",
                 "vms": ["db1"], "hosts": ["h1", "h2"]}],
      "links": [{"source": "h1", "target": "h2", "bandwidth_mib_s": 1100, "rtt_ms": 0.3}],
      "default_bandwidth_mib_s": 1024, "default_rtt_ms": 0.5
    }

``health`` is ok, degraded (VMs should leave), failed or quarantined (VMs must leave).
Rule kinds: affinity, anti_affinity (VM-VM), run_on, not_run_on (VM-host); strength must
(never broken) or should (broken only when nothing else fits, and reported).
``memory_demand_mib`` defaults to ``memory_mib``; ``cpu_demand`` to ``vcpus``.
``links``: what a migration stream carried between two hosts (measured; a link given one way
serves both); a pair with none uses the defaults. A move's cost and whether it converges come
from the migration's predicted course over its link (cost.py).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from qmotion.api.drs import Automation


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Health(StrEnum):
    OK = "ok"
    DEGRADED = "degraded"
    FAILED = "failed"
    QUARANTINED = "quarantined"


class HostSpec(Strict):
    name: str = Field(min_length=1)
    cpu_capacity: float = Field(gt=0, description="cores")
    memory_mib: int = Field(gt=0)
    health: Health = Health.OK
    maintenance: bool = False
    max_migrations: int = Field(default=4, ge=1)

    @property
    def usable(self) -> bool:
        """May receive VMs."""
        return self.health == Health.OK and not self.maintenance


class VmSpec(Strict):
    name: str = Field(min_length=1)
    host: str = Field(min_length=1)
    memory_mib: int = Field(gt=0)
    vcpus: int = Field(default=1, ge=1)
    cpu_demand: float | None = Field(default=None, ge=0)
    memory_demand_mib: float | None = Field(default=None, ge=0)
    dirty_rate_mib_s: float = Field(default=0.0, ge=0)

    @property
    def cpu(self) -> float:
        return self.vcpus if self.cpu_demand is None else self.cpu_demand

    @property
    def mem_demand(self) -> float:
        return self.memory_mib if self.memory_demand_mib is None else self.memory_demand_mib


ALLOCATION_WEIGHT = 0.04

RuleKind = Literal["affinity", "anti_affinity", "run_on", "not_run_on"]


class Rule(Strict):
    name: str = Field(min_length=1)
    kind: RuleKind
    strength: Literal["must", "should"] = "must"
    vms: list[str] = Field(min_length=1)
    hosts: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _shape(self) -> Rule:
        if self.kind in ("affinity", "anti_affinity"):
            if len(self.vms) < 2:
                raise ValueError(f"{self.kind} needs at least two VMs")
            if self.hosts:
                raise ValueError(f"{self.kind} rules name VMs only, not hosts")
        elif not self.hosts:
            raise ValueError(f"{self.kind} needs the hosts it names")
        return self


# A path with no measurement: 10 GbE less protocol overhead, a LAN's round trip.
DEFAULT_BANDWIDTH_MIB_S = 1024.0
DEFAULT_RTT_MS = 0.5


class Link(Strict):
    source: str = Field(min_length=1)
    target: str = Field(min_length=1)
    bandwidth_mib_s: float = Field(gt=0)
    rtt_ms: float = Field(default=DEFAULT_RTT_MS, ge=0)


class Snapshot(Strict):
    hosts: list[HostSpec]
    vms: list[VmSpec] = Field(default_factory=list)
    rules: list[Rule] = Field(default_factory=list)
    links: list[Link] = Field(default_factory=list)
    default_bandwidth_mib_s: float = Field(default=DEFAULT_BANDWIDTH_MIB_S, gt=0)
    default_rtt_ms: float = Field(default=DEFAULT_RTT_MS, ge=0)


class Policy(Strict):
    """``threshold`` 1 (only mandatory moves) ... 5 (aggressive): moves of priority <= it.

    ``max_moves`` caps the balancing moves of one plan (as hbal's ``--max-length``): the
    best ones come first, and planning again on the result goes on from there. Mandatory moves
    (evacuations, must-rule fixes) are never held back by it.
    """

    threshold: int = Field(default=3, ge=1, le=5)
    automation: Automation = Automation.MANUAL
    max_moves: int = Field(default=100_000, ge=0)
    # Weight, against demand, of balancing allocated memory and committed vCPUs; 0 balances
    # demand alone.
    allocation_weight: float = Field(default=ALLOCATION_WEIGHT, ge=0)
