"""Which requests run: admission into free cache slots (continuous batching) and the
rows of each step.

Every running request takes part in every step: drafting rows draft a chunk with the
pilot (and have it scored by the base), continuing rows decode a block with the base.
Waiting requests are admitted first-come first-served whenever a slot is free — at the
start of any step, so a request that arrives while others are half done joins the next
step; a full batch makes new requests wait, never fail.
"""
from __future__ import annotations

from collections import deque

from .errors import RequestError
from .request import Phase, Request


class Scheduler:
    def __init__(self, n_slots: int):
        self._free = list(range(n_slots - 1, -1, -1))   # pop() hands out slot 0 first
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []               # holding a slot, admission order
        self._ids: dict[object, Request] = {}           # every request not yet forgotten

    # ---- requests in and out ----------------------------------------------------------
    def add(self, req: Request) -> None:
        if req.request_id in self._ids:
            raise RequestError(f"request id {req.request_id!r} is already in use; give each "
                               "unfinished request its own id")
        self._ids[req.request_id] = req
        self._waiting.append(req)

    def get(self, request_id) -> Request | None:
        return self._ids.get(request_id)

    def admit(self) -> list[Request]:
        """Waiting requests moved into free slots (they are prefilled this step)."""
        admitted = []
        while self._waiting and self._free:
            req = self._waiting.popleft()
            req.slot, req.phase = self._free.pop(), Phase.DRAFTING
            self._running.append(req)
            admitted.append(req)
        return admitted

    def release(self, req: Request) -> None:
        """A request left the batch (finished, failed or aborted): its slot is free."""
        if req in self._waiting:
            self._waiting.remove(req)
        if req.slot is not None:
            self._running.remove(req)
            self._free.append(req.slot)
            req.slot = None

    def forget(self, req: Request) -> None:
        """Its id may be used again (its last output was handed out)."""
        if self._ids.get(req.request_id) is req:
            del self._ids[req.request_id]

    # ---- the rows of a step -----------------------------------------------------------
    def drafting(self) -> list[Request]:
        return [r for r in self._running if r.phase is Phase.DRAFTING]

    def continuing(self) -> list[Request]:
        return [r for r in self._running if r.phase is Phase.CONTINUING]

    def requests(self) -> list[Request]:
        return list(self._ids.values())

    @property
    def n_waiting(self) -> int:
        return len(self._waiting)

    @property
    def n_running(self) -> int:
        return len(self._running)
