"""Adapters use the pool scheduler's read-only view and its event methods, never its internals (issue 23).

`PoolScheduler` (core/scheduler.py) keeps its state private; adapters (every package of `conserve` but the core,
and benchmarks/) read it through `SchedulerView` (core/view.py) and change it through the scheduler's event
methods. This test reads the adapters' source and fails on:
- an attribute of something named `scheduler` that PoolScheduler does not define on its class (its state lives
  on the instance, so only the view's queries and the event methods pass), or that is private (`_...`);
- an assignment to (or deletion of) an attribute of something named `scheduler`;
- any `.ledger`, or any of the scheduler's private state names (`._ledger`, `._pending`, ...) read through any
  other name than `self`: the capacity ledger is the scheduler's alone.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from conserve.core.scheduler import PoolScheduler

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "operator" / "conserve"
#: The scheduler's own state, as its instances hold it (computed, so state added later is covered too).
PRIVATE_STATE = frozenset(name for name in vars(PoolScheduler()) if name.startswith("_"))


def adapter_sources() -> Iterator[Path]:
    for path in sorted(PACKAGE.rglob("*.py")):
        if PACKAGE / "core" not in path.parents:
            yield path
    yield from sorted((REPO / "benchmarks").rglob("*.py"))


def _named_scheduler(node: ast.expr) -> bool:
    """`scheduler`, `pool.scheduler`, `self.scheduler`, ...: the expression names a pool scheduler."""
    return (isinstance(node, ast.Name) and node.id == "scheduler") or (
        isinstance(node, ast.Attribute) and node.attr == "scheduler"
    )


def _allowed(attr: str) -> bool:
    """A query of the view, an event method, or a class-level constant of PoolScheduler."""
    return not attr.startswith("_") and hasattr(PoolScheduler, attr)


def violations(source: str, where: str) -> list[str]:
    found: list[str] = []
    nodes = sorted(ast.walk(ast.parse(source)), key=lambda n: (getattr(n, "lineno", 0), getattr(n, "col_offset", 0)))
    for node in nodes:
        if not isinstance(node, ast.Attribute):
            continue
        at = f"{where}:{node.lineno}: {ast.unparse(node)}"
        if _named_scheduler(node.value):
            if not isinstance(node.ctx, ast.Load):
                found.append(f"{at} (the scheduler changes only through its event methods)")
            elif not _allowed(node.attr):
                found.append(f"{at} (not in the scheduler's view or events)")
        elif node.attr == "ledger" or (
            node.attr in PRIVATE_STATE and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
        ):
            found.append(f"{at} (the scheduler's internals)")
    return found


def test_the_guard_sees_every_kind_of_reach_past_the_view() -> None:
    source = """
pool.scheduler.ledger.holding(key)
scheduler.conversations[key]
self.scheduler._pending
pool.scheduler.gaps.extend(gaps)
pool.scheduler.settings = settings
sched = pool.scheduler; sched._ledger.reserve(key, decoder, 1)
runtime.ledger.snapshot()
pool.scheduler.holding(key); pool.scheduler.restore_history([], []); self._pending = {}
"""
    found = violations(source, "x.py")
    assert [f.split(": ", 1)[1].split(" (")[0] for f in found] == [
        "pool.scheduler.ledger",
        "scheduler.conversations",
        "self.scheduler._pending",
        "pool.scheduler.gaps",
        "pool.scheduler.settings",
        "sched._ledger",
        "runtime.ledger",
    ]


def test_adapters_read_the_scheduler_through_its_view_only() -> None:
    sources = list(adapter_sources())
    scanned = {p.relative_to(REPO).as_posix() for p in sources}
    assert {"operator/conserve/controller/engine.py", "operator/conserve/sim/policies.py"} <= scanned
    assert {"_ledger", "_conversations", "_pending", "_gaps", "_growth", "_kv"} <= PRIVATE_STATE
    found = [v for p in sources for v in violations(p.read_text(), p.relative_to(REPO).as_posix())]
    assert not found, "adapters reach past the scheduler's view:\n" + "\n".join(found)
