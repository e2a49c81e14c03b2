"""PyTorch's CUDA caching allocator as a pure-Python model: reserved bytes from a sequence of allocations and frees.

Every rule and constant below is read from ``c10/cuda/CUDACachingAllocator.cpp`` (pytorch/pytorch, main in
2025; facts only, no code taken):

- sizes round up to a multiple of ``kMinBlockSize`` = 512 B (``round_size``; ``roundup_power2_divisions`` unset);
- requests up to ``kSmallSize`` = 1 MiB come from the small pool, larger ones from the large pool;
- a new segment (``cudaMalloc``) is ``kSmallBuffer`` = 2 MiB for a small request, ``kLargeBuffer`` = 20 MiB for a
  request under ``kMinLargeAlloc`` = 10 MiB, else the request rounded up to ``kRoundLarge`` = 2 MiB
  (``get_allocation_size``);
- a request takes the smallest cached free block of its pool that holds it, the lowest address on a tie
  (``get_free_block``, blocks ordered by size then address); ``max_split_size`` is unlimited by default;
- the block is split when the rest is at least 512 B (small pool, or expandable segments) or more than 1 MiB
  (large pool) (``should_split``);
- a freed block merges with its free neighbours in the same segment only (``free_block``/``try_merge_blocks``):
  segments never coalesce;
- when ``cudaMalloc`` fails the allocator frees every cached segment that is entirely free and retries
  (``release_cached_blocks``), and raises out-of-memory only if that fails too;
- ``expandable_segments:True`` keeps one growing segment per pool (per stream) whose physical memory is mapped
  in pages of 2 MiB (small pool) or 20 MiB (large pool) at the lowest free address, merging the new pages with
  the free block before them (``find_expandable_block``/``map_block``; Note [Expandable Segments]); on
  out-of-memory the free pages are unmapped.

``reserved`` is the bytes of segments (mapped pages) held, what ``torch.cuda.memory_reserved`` reports;
``allocated`` is the rounded block sizes in use (``memory_allocated``).

Streams: a block belongs to the stream it was allocated on, and a request only takes cached blocks of its own
stream (the free-block order compares the stream first, ``BlockComparatorSize``); each stream grows its own
expandable segment. A block freed while another stream still uses it (``record_stream``) leaves ``allocated``
at once but returns to the cache only when that stream's recorded event completes (``insert_events`` /
``process_events``): :meth:`Allocator.free` with ``deferred=True``, then :meth:`Allocator.ready`.
:meth:`Allocator.reset_peaks` is ``torch.cuda.reset_peak_memory_stats``: the peaks restart at the current values.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass

MIB = 1 << 20
MIN_BLOCK = 512  # kMinBlockSize
SMALL_SIZE = 1 * MIB  # kSmallSize: the largest small-pool request
SMALL_BUFFER = 2 * MIB  # kSmallBuffer: a small-pool segment, and an expandable small-pool page
MIN_LARGE_ALLOC = 10 * MIB  # kMinLargeAlloc: requests below it share 20 MiB segments
LARGE_BUFFER = 20 * MIB  # kLargeBuffer: their segment, and an expandable large-pool page
ROUND_LARGE = 2 * MIB  # kRoundLarge: larger requests round up to it
ALLOCATORS = ("expandable", "caching")


class OutOfMemory(Exception):
    """The allocator could not find or map ``nbytes`` within the device limit, even after releasing its cache."""


def round_size(nbytes: int) -> int:
    """A request's block size: at least 512 B, a multiple of 512 B."""
    return max(MIN_BLOCK, -(-nbytes // MIN_BLOCK) * MIN_BLOCK)


def segment_size(size: int) -> int:
    """The ``cudaMalloc`` a rounded request makes when no cached block holds it (caching mode)."""
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return -(-size // ROUND_LARGE) * ROUND_LARGE


Pool = tuple[int, bool]  # (stream, small pool?)


class _Block:
    __slots__ = ("addr", "free", "next", "pool", "prev", "size")

    def __init__(self, addr: int, size: int, pool: Pool) -> None:
        self.addr, self.size, self.pool = addr, size, pool
        self.free = True
        self.prev: _Block | None = None
        self.next: _Block | None = None


_KEY = _Block(-1, 0, (0, False))


class Allocator:
    """The allocator's state: segments, cached free blocks per pool, and the reserved/allocated counters.

    ``limit`` is the bytes the allocator may reserve (the card less the CUDA context); ``None`` is unlimited.
    :meth:`malloc` returns a handle for :meth:`free`.
    """

    def __init__(self, expandable: bool = False, limit: int | None = None) -> None:
        self.expandable, self.limit = expandable, limit
        self.reserved = self.allocated = self.peak_reserved = self.peak_allocated = 0
        self._free: dict[Pool, list[tuple[int, int, _Block]]] = {}  # per pool: (size, addr, block), sorted
        self._live: dict[int, _Block] = {}
        self._pending: dict[int, _Block] = {}  # freed with deferred=True, not yet back in the cache
        self._next_handle = 0
        self._next_addr = 0
        # expandable: per pool, the end of the mapped range and the last block (free or not) in it
        self._end: dict[Pool, int] = {}
        self._tail: dict[Pool, _Block | None] = {}
        self._base: dict[Pool, int] = {}

    # -- the cached free blocks ------------------------------------------------------------------------

    def _insert(self, b: _Block) -> None:
        b.free = True
        bisect.insort(self._free.setdefault(b.pool, []), (b.size, b.addr, b))

    def _remove(self, b: _Block) -> None:
        pool = self._free[b.pool]
        del pool[bisect.bisect_left(pool, (b.size, b.addr, b))]  # free addresses are unique: blocks never compared

    def _best_fit(self, size: int, key: Pool) -> _Block | None:
        pool = self._free.get(key, [])
        i = bisect.bisect_left(pool, (size, -1, _KEY))  # before every block of that size
        return pool[i][2] if i < len(pool) else None

    # -- segments --------------------------------------------------------------------------------------

    def _reserve(self, nbytes: int) -> bool:
        if self.limit is not None and self.reserved + nbytes > self.limit:
            return False
        self.reserved += nbytes
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        return True

    def _new_segment(self, size: int, key: Pool) -> _Block | None:
        seg = segment_size(size)
        if not self._reserve(seg):
            self.release_cache()
            if not self._reserve(seg):
                return None
        b = _Block(self._next_addr, seg, key)
        self._next_addr += seg + LARGE_BUFFER  # segments are never adjacent
        return b

    def _grow(self, size: int, key: Pool) -> _Block | None:
        """Expandable: map pages at the end of the pool's segment so that its free tail holds ``size``."""
        page = SMALL_BUFFER if key[1] else LARGE_BUFFER
        tail = self._tail.get(key)
        have = tail.size if tail is not None and tail.free else 0
        pages = -(-(size - have) // page)
        if not self._reserve(pages * page):
            self.release_cache()
            tail = self._tail.get(key)
            have = tail.size if tail is not None and tail.free else 0
            pages = -(-(size - have) // page)
            if not self._reserve(pages * page):
                return None
        if key not in self._base:
            self._base[key] = self._next_addr
            self._next_addr += 1 << 50  # the segment's reserved address space
        end = self._end.get(key, 0)
        grown = _Block(self._base[key] + end, pages * page, key)
        self._end[key] = end + pages * page
        if tail is not None and tail.free:
            self._remove(tail)
            tail.size += grown.size
            return tail
        grown.prev = tail
        if tail is not None:
            tail.next = grown
        self._tail[key] = grown
        return grown

    def release_cache(self) -> None:
        """Return cached memory to the device: every entirely free segment (caching), or every free page at
        the end of an expandable segment (``torch.cuda.empty_cache``, and the out-of-memory retry)."""
        for key in list(self._free):
            if self.expandable:
                tail = self._tail.get(key)
                if tail is None or not tail.free:
                    continue
                page = SMALL_BUFFER if key[1] else LARGE_BUFFER
                used = self._end[key] - tail.size
                keep = -(-used // page) * page - used
                drop = tail.size - keep
                self._remove(tail)
                self.reserved -= drop
                self._end[key] -= drop
                tail.size = keep
                if keep:
                    self._insert(tail)
                else:
                    self._tail[key] = tail.prev
                    if tail.prev is not None:
                        tail.prev.next = None
                continue
            whole = [t for t in self._free[key] if t[2].prev is None and t[2].next is None]
            for t in whole:
                self._remove(t[2])
                self.reserved -= t[2].size

    # -- the interface ---------------------------------------------------------------------------------

    def malloc(self, nbytes: int, stream: int = 0) -> int:
        """Allocate ``nbytes`` on ``stream``; raise :class:`OutOfMemory` if it cannot be held within ``limit``."""
        size = round_size(nbytes)
        small = size <= SMALL_SIZE
        key = (stream, small)
        b = self._best_fit(size, key)
        if b is not None:
            self._remove(b)
        else:
            b = self._grow(size, key) if self.expandable else self._new_segment(size, key)
            if b is None:
                raise OutOfMemory(nbytes)
        rest = b.size - size
        if rest >= MIN_BLOCK if (small or self.expandable) else rest > SMALL_SIZE:
            r = _Block(b.addr + size, rest, key)
            r.prev, r.next = b, b.next
            if b.next is not None:
                b.next.prev = r
            elif self.expandable and self._tail.get(key) is b:
                self._tail[key] = r
            b.next, b.size = r, size
            self._insert(r)
        b.free = False
        self.allocated += b.size
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        self._next_handle += 1
        self._live[self._next_handle] = b
        return self._next_handle

    def free(self, handle: int, deferred: bool = False) -> None:
        """Free an allocation: its block merges with free neighbours of the same segment and stays cached.
        ``deferred``: another stream still uses it, so it leaves ``allocated`` now and the cache at :meth:`ready`."""
        b = self._live.pop(handle)
        self.allocated -= b.size
        if deferred:
            self._pending[handle] = b
            return
        self._cache(b)

    def ready(self, handle: int) -> None:
        """The stream event a deferred free waited for has completed: the block returns to the cache."""
        self._cache(self._pending.pop(handle))

    def reset_peaks(self) -> None:
        self.peak_reserved, self.peak_allocated = self.reserved, self.allocated

    def _cache(self, b: _Block) -> None:
        for n in (b.prev, b.next):
            if n is None or not n.free:
                continue
            self._remove(n)
            if n is b.prev:
                b.addr, b.prev = n.addr, n.prev
                if n.prev is not None:
                    n.prev.next = b
            else:
                b.next = n.next
                if n.next is not None:
                    n.next.prev = b
                elif self._tail.get(b.pool) is n:
                    self._tail[b.pool] = b
            b.size += n.size
        self._insert(b)


@dataclass(frozen=True)
class Replay:
    """What a sequence of events did: peak reserved and allocated bytes (rounded block sizes)."""

    peak_reserved: int
    peak_allocated: int


# ("+", bytes[, stream]) allocates; ("-", i) frees what the i-th event (counting every event from 0) allocated;
# ("~", i) frees it deferred (another stream still uses it) and a later ("-", i) returns it to the cache;
# ("r", 0) resets the peaks (torch.cuda.reset_peak_memory_stats).
Event = tuple[str, int] | tuple[str, int, int]


def replay(events: Iterable[Event], expandable: bool = False, limit: int | None = None) -> Replay:
    """Run a sequence of events (above) through an :class:`Allocator`."""
    a = Allocator(expandable, limit)
    handles: dict[int, int] = {}
    for i, ev in enumerate(events):
        op, n = ev[0], ev[1]
        if op == "+":
            handles[i] = a.malloc(n, ev[2] if len(ev) > 2 else 0)
        elif op == "~":
            a.free(handles[n], deferred=True)
        elif op == "-":
            h = handles.pop(n)
            if h in a._pending:
                a.ready(h)
            else:
                a.free(h)
        else:
            a.reset_peaks()
    return Replay(a.peak_reserved, a.peak_allocated)
