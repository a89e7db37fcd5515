"""A reload's part in the server's registry (hbd.server_registry): the plan worked out a slice per
loop turn once the new configuration is read, the commit, then the peers' changes a slice per loop
turn, and what the reload replaced freed a slice per turn (hbd.retire).

``planner()`` is taken on the loop as a reload starts: it snapshots the expected peers in force
(reloads are serialised, so they are still in force at the commit) and is run, a slice per turn, by
the reload's load (hbd.reload_process) with the loaded configuration. ``commit()`` switches the
registry over (hbd.registry.begin) and starts the slices; ``when_applied()`` says when they are
done (the answer to ``hbd reload`` waits for it). ``may_apply`` can hold the slices back (the
supervisor, while a worker's pipe is full).
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import TYPE_CHECKING

from hbd.config import ServerConfig
from hbd.logs import log
from hbd.registry import APPLY_SLICE, ExpectedPlan, Registry, expected_peers, registry_settings
from hbd.registry_plan import plan_in_slices
from hbd.retire import Retirer

if TYPE_CHECKING:
    from hbd.loop import EventLoop, Timer

APPLY_RETRY = 0.01  # seconds before the next slice when may_apply() said no


class RegistryReload:
    def __init__(self, registry: Registry, loop: EventLoop, after: Callable[[], None]) -> None:
        self.registry = registry
        self.loop = loop
        self.after = after  # after each slice: carry out what it changed, re-arm the registry's timer
        self.may_apply: Callable[[], bool] = lambda: True
        self.slice = APPLY_SLICE  # changes applied per loop turn
        self.retirer = Retirer(loop)
        self._planned: tuple[ServerConfig, ExpectedPlan] | None = None  # a reload's plan, made before its commit
        self._timer: Timer | None = None  # the next slice
        self._waiters: list[Callable[[], None]] = []  # called once all changes are applied
        self._applying: ExpectedPlan | None = None  # the plan being applied (its list is retired after)
        self._began = 0.0

    def planner(self) -> Callable[[ServerConfig], Generator[None, None, None]]:
        """On the loop, as a reload starts: the plan of the loaded configuration, a slice per step."""
        base, timeout = self.registry.expected, self.registry.settings.heartbeat_timeout

        def plan(cfg: ServerConfig) -> Generator[None, None, None]:
            planned = yield from plan_in_slices(base, timeout, expected_peers(cfg), cfg.heartbeat_timeout)
            self._planned = (cfg, planned)

        return plan

    def commit(self, new: ServerConfig) -> None:
        """A reload committed: settings and who is expected now, the peers' changes from the next turn."""
        planned, self._planned = self._planned, None
        reg, settings = self.registry, registry_settings(new)
        if planned is None or planned[0] is not new:  # not planned off the loop (a test, say): O(peers) here
            planned = (new, reg.plan(settings, expected_peers(new)))
        plan = planned[1]
        self.finish()
        replaced = reg.expected
        reg.begin(settings, plan, self.loop.clock())
        if reg.expected is not replaced:  # (a dict nothing else changes: hbd.registry_plan)
            self.retirer.retire(replaced)
        if reg.applying():
            self._applying, self._began = plan, self.loop.clock()
            log.info(
                "expected peers: %d added, %d removed, %d changed; applying them %d per loop turn",
                plan.added,
                plan.removed,
                plan.changed,
                self.slice,
            )
            self._timer = self.loop.call_later(0, self._step)

    def _step(self) -> None:
        self._timer = None
        if not self.may_apply():
            self._timer = self.loop.call_later(APPLY_RETRY, self._step)
            return
        self.registry.apply_some(self.slice)
        self.after()
        if self.registry.applying():
            self._timer = self.loop.call_later(0, self._step)
            return
        log.info("expected peers applied in %.2f s", self.loop.clock() - self._began)
        self._done()

    def finish(self) -> None:
        """Apply what is left at once (at shutdown; before another reload's commit, which cannot come
        before this one's answer)."""
        if self._timer is None and not self.registry.applying():
            return
        self.loop.cancel(self._timer)
        self._timer = None
        self.registry.apply_some(None)
        self.after()
        self._done()

    def _done(self) -> None:
        if self._applying is not None:
            self.retirer.retire(self._applying.changes)
            self._applying = None
        waiters, self._waiters = self._waiters, []
        for done in waiters:
            done()

    def when_applied(self, done: Callable[[], None]) -> None:
        """Call ``done`` once the last reload's changes are all applied (now, if they are)."""
        if self._timer is None and not self.registry.applying():
            done()
        else:
            self._waiters.append(done)

    def close(self) -> None:
        self.finish()
        self.retirer.close()
