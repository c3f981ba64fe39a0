"""Sharing one model's KV cache between requests: threads, and suspended streams.

A `Model` has one static KV cache, so only one sequence can live in it at a time. Every
use of the cache happens while holding the model (`Model.reserved(owner)`), which

* waits for the model's lock: requests from several threads run one at a time;
* if the cache holds another owner's sequence that is still wanted (a stream suspended
  between two pieces), parks a copy of it with that owner first, and puts `owner`'s own
  parked sequence back if it has one.

So a request gets exactly the output it would get alone, whatever ran between its steps:
a copy of the valid cache positions is bit-exact, and it is only made when another
request really takes the model in between. Owners that are finished (or were one-shot
calls) are never copied, and a released owner drops its copies at once.

A switch that fails half-way (out of memory while copying, an interrupt) never leaves a
request running on a cache that is not its own: the cache counts as nobody's until a
switch completes, and a request whose sequence was lost (never parked, not resident)
gets a WSDError instead of a wrong answer.
"""
from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager

from .cache import StaticKVCache
from .errors import WSDError


class CacheOwner:
    """The identity of one sequence (one request) in models' caches. `keep=False`: its
    state is not worth saving when another owner takes a model (one-shot calls)."""

    __slots__ = ("keep", "_parked", "_homes", "__weakref__")

    def __init__(self, keep: bool = True):
        self.keep = keep
        self._parked: dict = {}           # residency -> its snapshot of our sequence
        self._homes: set = set()          # residencies whose cache has held our sequence

    def release(self) -> None:
        """The sequence is finished or abandoned: never park it again, drop its copies."""
        self.keep = False
        self._parked.clear()

    def park(self, where, snapshot) -> None:
        if self.keep:
            self._parked[where] = snapshot
            if not self.keep:              # released meanwhile (another thread)
                self._parked.clear()

    def unpark(self, where):
        return self._parked.pop(where, None)

    def is_parked(self, where) -> bool:
        return where in self._parked

    def moved_in(self, where) -> None:
        self._homes.add(where)

    def lived_in(self, where) -> bool:
        return where in self._homes


class CacheResidency:
    """Which owner's sequence a cache holds, and the lock. Parked copies live with their
    owners (so they go away with them); `parked` counts those still held."""

    def __init__(self):
        self.lock = threading.RLock()      # re-entrant: public methods call each other
        self._resident = None              # weakref to the CacheOwner in the cache, or None
        self._guests = weakref.WeakSet()   # owners that parked a copy here
        self.swaps = 0                     # how many times a sequence was parked
        self._here = threading.local()     # this thread's depth of `reserved`

    @property
    def parked(self) -> int:
        return sum(1 for o in list(self._guests) if o.is_parked(self))

    @contextmanager
    def reserved(self, cache: StaticKVCache, owner: CacheOwner | None = None):
        owner = CacheOwner(keep=False) if owner is None else owner
        with self.lock:
            depth = getattr(self._here, "depth", 0)
            self._here.depth = depth + 1
            try:
                self._switch(cache, owner)
                yield owner
            finally:
                self._here.depth = depth

    def held_here(self) -> bool:
        """Whether this thread is inside `reserved` now."""
        return getattr(self._here, "depth", 0) > 0

    def _switch(self, cache: StaticKVCache, owner: CacheOwner) -> None:
        cur = self._resident() if self._resident is not None else None
        if cur is owner:
            return
        self._resident = None              # in flux: nobody's sequence until this completes
        if cur is not None and cur.keep:
            cur.park(self, cache.snapshot())       # may raise: cur's sequence is then lost
            self._guests.add(cur)
            self.swaps += 1
        saved = owner.unpark(self)
        if saved is not None:
            cache.restore(saved)
        elif owner.lived_in(self):
            raise WSDError("internal error: this request's cached sequence was lost (copying "
                           "it aside failed while another request took the model, e.g. out of "
                           "memory); the request cannot go on: run it again")
        owner.moved_in(self)
        self._resident = weakref.ref(owner)
