"""A bounded, thread-safe cache of decoded raster blocks shared by the tiles of a run.

Neighbouring tiles overlap by twice the halo, and a tile's read window rarely starts on a
block boundary, so reading every tile on its own decodes each block of a 512 px tiled file
about 2.8 times (1536 px tiles with a 120 px halo). Worker threads of one process share this
cache instead: each block is decoded once while the tiles around it run.

Written by hand because the libraries that come close do not fit: GDAL's block cache belongs
to one dataset handle, and rasterio handles cannot be shared between threads; ``cachetools``
and ``functools.lru_cache`` neither bound by bytes nor let a second thread wait for a block
the first is still decoding (both would decode it twice).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Iterator
from concurrent.futures import Future
from typing import TypeVar

import numpy as np

Blocks = tuple[np.ndarray, ...]
K = TypeVar("K", bound=Hashable)

RETIRED_KEYS = 16384
"""Dropped keys a cache remembers (see :meth:`BlockCache.drop`): the drops of the last few
thousand tiles (a 1280 px tile drops about six 512 px blocks)."""


class BlockCache:
    """Least-recently-used arrays up to ``max_bytes``, each loaded once however many ask.

    Args:
        max_bytes: bytes of arrays kept once loaded. Arrays in use by a caller are not
            counted against it after eviction (the caller holds its own reference).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._entries: OrderedDict[Hashable, Future[Blocks]] = OrderedDict()
        self._sizes: dict[Hashable, int] = {}
        self._bytes = 0
        # Keys dropped as no longer needed. A tile that runs late (tiles overlap, and the
        # workers finish them out of order) may still ask for one: it is loaded for the
        # callers asking at that time and not kept, else it would stay until evicted. On a
        # 1 GP run such blocks filled the cache towards its cap and the process grew by
        # ~0.1 GB over the tiles.
        # Only the latest RETIRED_KEYS are remembered (insertion-ordered dict as an ordered
        # set): a late tile lags its successors by a few tiles, and the set must not grow
        # with the raster.
        self._retired: dict[Hashable, None] = {}
        self.retired_loads = 0
        self.hits = 0
        self.misses = 0
        # Keys a get_many caller put off because another thread was loading them.
        self.deferred = 0

    def get(self, key: Hashable, load: Callable[[], Blocks]) -> Blocks:
        """The arrays stored under ``key``, calling ``load()`` once if none are.

        A caller that asks while another thread loads the same key waits for that load.
        An exception from ``load`` reaches every waiting caller and nothing is kept.
        """
        fut, owner = self._claim(key)
        return self._load(key, fut, load) if owner else fut.result()

    def get_many(
        self, items: Iterable[tuple[K, Callable[[], Blocks]]]
    ) -> Iterator[tuple[K, Blocks]]:
        """``(key, arrays)`` for each of ``items``' ``(key, load)``, as :meth:`get` would.

        Keys that another thread is loading come last: this caller loads the others
        meanwhile instead of waiting. Neighbouring tiles share the blocks along their
        borders, and on a GPU machine eight tile threads waited for each other's blocks
        22 % of their time (1 GP run, H200 host) while blocks of their own were still to
        decode.
        """
        later: list[tuple[K, Future[Blocks]]] = []
        for key, load in items:
            fut, owner = self._claim(key)
            if owner:
                yield key, self._load(key, fut, load)
            elif fut.done():
                yield key, fut.result()
            else:
                self.deferred += 1
                later.append((key, fut))
        for key, fut in later:
            yield key, fut.result()

    def _claim(self, key: Hashable) -> tuple[Future[Blocks], bool]:
        """The entry of ``key`` and whether this caller must load it (a new entry)."""
        with self._lock:
            fut = self._entries.get(key)
            if fut is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return fut, False
            # A retired key is loaded once for the callers asking meanwhile, then forgotten
            # (see _load).
            fut = self._entries[key] = Future()
            if key in self._retired:
                self.retired_loads += 1
            else:
                self.misses += 1
            return fut, True

    def _load(self, key: Hashable, fut: Future[Blocks], load: Callable[[], Blocks]) -> Blocks:
        """Run ``load`` for the entry this caller claimed and publish the result."""
        try:
            value = load()
        except BaseException as exc:
            with self._lock:
                self._entries.pop(key, None)
            fut.set_exception(exc)
            raise
        fut.set_result(value)
        size = sum(a.nbytes for a in value)
        with self._lock:
            if self._entries.get(key) is fut:
                if key in self._retired:  # retired, or dropped while it loaded
                    del self._entries[key]
                else:
                    self._sizes[key] = size
                    self._bytes += size
                    self._evict()
        return value

    def _evict(self) -> None:
        # Entries still loading have no size yet; they are skipped, not waited for.
        for key in list(self._entries):
            if self._bytes <= self.max_bytes:
                break
            size = self._sizes.pop(key, None)
            if size is not None:
                del self._entries[key]
                self._bytes -= size

    def drop(self, keys: Iterable[Hashable], retire: bool = True) -> None:
        """Forget entries no later caller will ask for; a late caller loads them uncached.

        Loads in progress finish for their callers and are then forgotten too. With
        ``retire=False`` the entries are only freed: a later caller caches them again.
        """
        with self._lock:
            for key in keys:
                if retire:
                    self._retired[key] = None
                size = self._sizes.pop(key, None)
                if size is not None:
                    del self._entries[key]
                    self._bytes -= size
            while len(self._retired) > RETIRED_KEYS:
                del self._retired[next(iter(self._retired))]

    def clear(self) -> None:
        """Drop every loaded entry (loads in progress finish for their callers only)."""
        with self._lock:
            self._entries.clear()
            self._sizes.clear()
            self._retired.clear()
            self._bytes = 0
            self.hits = self.misses = self.retired_loads = self.deferred = 0

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays held now."""
        return self._bytes
