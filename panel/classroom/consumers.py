"""The websocket of the teacher's grid: ws/classes/SLUG/.

The grid (templates/classroom/class_detail.html, static/js/live.js and
static/js/classroom.js) follows its students' servers without a reload:

  - their status, as a dashboard's: the class's events (`customer-ID`, sent by
    panel/guests/events.vserver_changed), each read once per change and
    process (consumers.snapshot_after);
  - while the page is visible, every seat's CPU, memory and last activity,
    sampled for all the class's watchers at once (panel/classroom/sampler.py:
    one GET /1.0/stats per host and interval, group `classroom-ID`).

Who: what panel/guests/consumers.LiveConsumer checks for every live page (the
session, read afresh, and its second factor; the Origin, in panel/asgi.py;
the rechecks every RECHECK seconds, on every message and at once on a logout
or a change of memberships), and the class must be one of
`views.classes_of(user)`: a teacher's, TA's, owner's or admin's, any for
staff. Another class, a student, or a class that is gone: 4404, exactly like
a class that never was.

What: a teacher (and staff) every seat of the class; a TA only the seats of
their groups (views.seats_visible). Filtered here, per socket, never by group:
each status event is checked against the user's access to that server as it
is now (consumers.may_see, VServer.visible_to's rule, once per event for every
page of the class in this process), and each sample carries the class's
teachers and TAs' groups as they were read with it. A row the user may no
longer see is taken off the page (`hidden`, or left out of the next `usage`).

To the browser:

    {"type": "state", "vservers": [...]}         on connect: every visible seat's
                                                 server (events.snapshot)
    {"type": "vserver", "vserver": {...}, "ts"}  one of them changed
    {"type": "deleted", "vserver": {"id": ID}}   one of them is gone
    {"type": "hidden", "vserver": {"id": ID}}    one of them is no longer the user's
    {"type": "usage", "rows": [...], "ts": T}    while watched: every visible seat's
                                                 {seat, vserver, running, cpu,
                                                  memory, memory_mb, activity, error}
    {"type": "closing", "code": C, "reason": R}  before a close

From the browser: `{"type": "watch-usage"}`, `{"type": "unwatch-usage"}` (live.js
sends them as the page is shown and hidden), `{"type": "ping"}`.
"""

from __future__ import annotations

import time
from typing import Any

from channels.db import database_sync_to_async

from panel.classroom import sampler
from panel.classroom.models import Classroom, Seat
from panel.classroom.views import classes_of, seats_visible
from panel.guests import events
from panel.guests.consumers import (
    CLOSE_MISSING,
    LiveConsumer,
    may_see,
    snapshot_after,
)

__all__ = ["ClassConsumer"]


class ClassConsumer(LiveConsumer):
    """One class's grid: its seats' statuses (`customer-ID`) and, while watched, their
    usage (`classroom-ID`), as far as the user may see them."""

    watching = False

    async def begin(self) -> bool:
        self.slug = str(self.scope["url_route"]["kwargs"]["slug"])
        found = await database_sync_to_async(self._find)()
        if found is None:
            await self.refuse(CLOSE_MISSING, "no such class")
            return False
        self.classroom_id, self.customer_id = found
        if not self.user.is_staff:
            self.count_in({self.customer_id})
        # Joined before the state is read: a change in between is sent, not missed.
        await self.join(f"customer-{self.customer_id}")
        await self.join(sampler.group(self.classroom_id))
        self.class_vs, snaps = await database_sync_to_async(self._state)()
        self.known = {s["id"] for s in snaps}
        await self.send_json({"type": "state", "vservers": snaps})
        return True

    def _find(self) -> tuple[int, int] | None:
        c = classes_of(self.user).filter(customer__slug=self.slug).first()
        return None if c is None else (c.pk, c.customer_id)

    def _visible_seats(self) -> Any:
        """The seats of the class whose servers the user may see (views.seats_visible)."""
        return seats_visible(self.user, Classroom.objects.select_related("customer").get(
            pk=self.classroom_id))

    def _state(self) -> tuple[set[int], list[dict[str, Any]]]:
        """(every server of the class, the visible ones' snapshots)."""
        class_vs = set(Seat.objects.filter(classroom_id=self.classroom_id,
                                           vserver__isnull=False)
                       .values_list("vserver_id", flat=True))
        shown = [s.vserver for s in self._visible_seats() if s.vserver is not None]
        return class_vs, list(events.snapshots(shown).values())

    def _still(self) -> tuple[set[int], set[int]] | None:
        """(every server of the class, the visible ones) now; None if the class is no
        longer the user's."""
        if self._find() is None:
            return None
        class_vs = set(Seat.objects.filter(classroom_id=self.classroom_id,
                                           vserver__isnull=False)
                       .values_list("vserver_id", flat=True))
        visible = {s.vserver_id for s in self._visible_seats() if s.vserver_id is not None}
        return class_vs, visible

    async def allowed(self) -> bool:
        """The class still the user's (closed 4404 if not); rows no longer theirs hidden."""
        still = await database_sync_to_async(self._still)()
        if still is None:
            await self.refuse(CLOSE_MISSING, "no such class")
            return False
        self.class_vs, visible = still
        for vs_id in sorted(self.known - visible):
            await self._hide(vs_id)
        return True

    async def disconnect(self, code: int) -> None:
        await self._unwatch()
        await super().disconnect(code)

    # --- the page's requests ---

    async def command(self, kind: str, content: dict[str, Any]) -> bool:
        if kind == "watch-usage":
            if not self.watching:
                self.watching = True
                last = await sampler.SAMPLER.watch(self.classroom_id)
                if last is not None:
                    await self._send_usage(last)
            return True
        if kind == "unwatch-usage":
            await self._unwatch()
            return True
        return False

    async def _unwatch(self) -> None:
        if self.watching:
            self.watching = False
            await sampler.SAMPLER.unwatch(self.classroom_id)

    # --- status events ---

    async def _hide(self, vs_id: int) -> None:
        if vs_id in self.known:
            self.known.discard(vs_id)
            await self.send_json({"type": "hidden", "vserver": {"id": vs_id}})

    async def vserver_changed(self, event: dict[str, Any]) -> None:
        vs_id = int(event["vserver"]["id"])
        if self.closing or vs_id not in self.class_vs:
            return  # not a student's server of this class
        if not self.user.is_staff and not await may_see(self.user, self.customer_id, vs_id,
                                                        event.get("eid")):
            await self._hide(vs_id)
            return
        snap = await snapshot_after(event)
        if snap is None:
            await self.vserver_deleted(event)
            return
        self.known.add(vs_id)
        await self.send_json({"type": "vserver", "vserver": snap, "ts": event.get("ts")})

    async def vserver_deleted(self, event: dict[str, Any]) -> None:
        # Only a server this page was shown: telling that it is gone reveals nothing.
        vs_id = int(event["vserver"]["id"])
        if self.closing or vs_id not in self.known:
            return
        self.known.discard(vs_id)
        await self.send_json({"type": "deleted", "vserver": {"id": vs_id},
                              "ts": event.get("ts")})

    # --- usage ---

    async def classroom_usage(self, event: dict[str, Any]) -> None:
        # This process's sampler only: with channels-redis the group spans processes.
        if not self.watching or self.closing or event.get("source") != sampler.SAMPLER.token:
            return
        await self._send_usage(event)

    def _rows_for_user(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        """The rows of EVENT this user may see, by the scoping read with them."""
        rows: list[dict[str, Any]] = event.get("rows") or []
        if self.user.is_staff or self.user.pk in (event.get("teachers") or ()):
            return rows
        groups = set((event.get("assistants") or {}).get(str(self.user.pk), ()))
        return [r for r in rows if r.get("group") is not None and r["group"] in groups]

    async def _send_usage(self, event: dict[str, Any]) -> None:
        self.class_vs = {int(r["vserver"]) for r in event.get("rows") or ()
                         if r.get("vserver") is not None}
        rows = self._rows_for_user(event)
        await self.send_json({"type": "usage", "rows": [
            {k: r.get(k) for k in ("seat", "vserver", "running", "cpu", "memory", "memory_mb",
                                   "activity", "error")} for r in rows],
            "ts": event.get("ts") or time.time()})
