"""Sharing one model's KV cache between requests: threads, and suspended streams.

A `Model` has one static KV cache, so only one sequence can live in it at a time. Every
use of the cache happens while holding the model (`Model.reserved(owner)`), which

* waits for the model's lock: requests from several threads run one at a time;
* if the cache holds another owner's sequence that is still wanted (a stream suspended
  between two pieces), parks a copy of it first, and puts `owner`'s own parked sequence
  back if it has one.

So a request gets exactly the output it would get alone, whatever ran between its steps:
a copy of the valid cache positions is bit-exact, and it is only made when another
request really takes the model in between. Owners that are finished (or were one-shot
calls) are never copied; a parked copy goes away with its owner (weak references).
"""
from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager

from .cache import StaticKVCache


class CacheOwner:
    """The identity of one sequence in a model's cache (one request). `keep=False`: its
    state is not worth saving when another owner takes the model (one-shot calls)."""

    __slots__ = ("keep", "__weakref__")

    def __init__(self, keep: bool = True):
        self.keep = keep

    def release(self) -> None:
        """The sequence is finished or abandoned: never park it again (a copy parked
        already goes away with the owner object)."""
        self.keep = False


class CacheResidency:
    """Which owner's sequence a cache holds, the lock, and the parked sequences."""

    def __init__(self):
        self.lock = threading.RLock()      # re-entrant: public methods call each other
        self._resident = None              # weakref to the CacheOwner in the cache
        self._parked = weakref.WeakKeyDictionary()   # owner -> cache snapshot
        self.swaps = 0                     # how many times a sequence was parked

    @property
    def parked(self) -> int:
        return len(self._parked)

    @contextmanager
    def reserved(self, cache: StaticKVCache, owner: CacheOwner | None = None):
        owner = CacheOwner(keep=False) if owner is None else owner
        with self.lock:
            self._switch(cache, owner)
            yield owner

    def _switch(self, cache: StaticKVCache, owner: CacheOwner) -> None:
        cur = self._resident() if self._resident is not None else None
        if cur is owner:
            return
        if cur is not None and cur.keep:
            self._parked[cur] = cache.snapshot()
            self.swaps += 1
        saved = self._parked.pop(owner, None)
        if saved is not None:
            cache.restore(saved)
        self._resident = weakref.ref(owner)
