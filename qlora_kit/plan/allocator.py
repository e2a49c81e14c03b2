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
``allocated`` is the rounded block sizes in use (``memory_allocated``). One stream only: training here runs
on the default stream.
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


class _Block:
    __slots__ = ("addr", "free", "next", "prev", "size", "small")

    def __init__(self, addr: int, size: int, small: bool) -> None:
        self.addr, self.size, self.small = addr, size, small
        self.free = True
        self.prev: _Block | None = None
        self.next: _Block | None = None


_KEY = _Block(-1, 0, False)


class Allocator:
    """The allocator's state: segments, cached free blocks per pool, and the reserved/allocated counters.

    ``limit`` is the bytes the allocator may reserve (the card less the CUDA context); ``None`` is unlimited.
    :meth:`malloc` returns a handle for :meth:`free`.
    """

    def __init__(self, expandable: bool = False, limit: int | None = None) -> None:
        self.expandable, self.limit = expandable, limit
        self.reserved = self.allocated = self.peak_reserved = self.peak_allocated = 0
        self._free: dict[bool, list[tuple[int, int, _Block]]] = {True: [], False: []}  # (size, addr, block)
        self._live: dict[int, _Block] = {}
        self._next_handle = 0
        self._next_addr = 0
        # expandable: per pool, the end of the mapped range and the last block (free or not) in it
        self._end: dict[bool, int] = {True: 0, False: 0}
        self._tail: dict[bool, _Block | None] = {True: None, False: None}
        self._base: dict[bool, int] = {}

    # -- the cached free blocks ------------------------------------------------------------------------

    def _insert(self, b: _Block) -> None:
        b.free = True
        bisect.insort(self._free[b.small], (b.size, b.addr, b))

    def _remove(self, b: _Block) -> None:
        pool = self._free[b.small]
        del pool[bisect.bisect_left(pool, (b.size, b.addr, b))]  # free addresses are unique: blocks never compared

    def _best_fit(self, size: int, small: bool) -> _Block | None:
        pool = self._free[small]
        i = bisect.bisect_left(pool, (size, -1, _KEY))  # before every block of that size
        return pool[i][2] if i < len(pool) else None

    # -- segments --------------------------------------------------------------------------------------

    def _reserve(self, nbytes: int) -> bool:
        if self.limit is not None and self.reserved + nbytes > self.limit:
            return False
        self.reserved += nbytes
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        return True

    def _new_segment(self, size: int, small: bool) -> _Block | None:
        seg = segment_size(size)
        if not self._reserve(seg):
            self.release_cache()
            if not self._reserve(seg):
                return None
        b = _Block(self._next_addr, seg, small)
        self._next_addr += seg + LARGE_BUFFER  # segments are never adjacent
        return b

    def _grow(self, size: int, small: bool) -> _Block | None:
        """Expandable: map pages at the end of the pool's segment so that its free tail holds ``size``."""
        page = SMALL_BUFFER if small else LARGE_BUFFER
        tail = self._tail[small]
        have = tail.size if tail is not None and tail.free else 0
        pages = -(-(size - have) // page)
        if not self._reserve(pages * page):
            self.release_cache()
            tail = self._tail[small]
            have = tail.size if tail is not None and tail.free else 0
            pages = -(-(size - have) // page)
            if not self._reserve(pages * page):
                return None
        if small not in self._base:
            self._base[small] = self._next_addr
            self._next_addr += 1 << 50  # the segment's reserved address space
        grown = _Block(self._base[small] + self._end[small], pages * page, small)
        self._end[small] += pages * page
        if tail is not None and tail.free:
            self._remove(tail)
            tail.size += grown.size
            return tail
        grown.prev = tail
        if tail is not None:
            tail.next = grown
        self._tail[small] = grown
        return grown

    def release_cache(self) -> None:
        """Return cached memory to the device: every entirely free segment (caching), or every free page at
        the end of an expandable segment (``torch.cuda.empty_cache``, and the out-of-memory retry)."""
        for small in (True, False):
            if self.expandable:
                tail = self._tail[small]
                if tail is None or not tail.free:
                    continue
                page = SMALL_BUFFER if small else LARGE_BUFFER
                keep = -(-(self._end[small] - tail.size) // page) * page - (self._end[small] - tail.size)
                drop = tail.size - keep
                self._remove(tail)
                self.reserved -= drop
                self._end[small] -= drop
                tail.size = keep
                if keep:
                    self._insert(tail)
                else:
                    self._tail[small] = tail.prev
                    if tail.prev is not None:
                        tail.prev.next = None
                continue
            whole = [t for t in self._free[small] if t[2].prev is None and t[2].next is None]
            for t in whole:
                self._remove(t[2])
                self.reserved -= t[2].size

    # -- the interface ---------------------------------------------------------------------------------

    def malloc(self, nbytes: int) -> int:
        """Allocate ``nbytes``; raise :class:`OutOfMemory` if it cannot be held within ``limit``."""
        size = round_size(nbytes)
        small = size <= SMALL_SIZE
        b = self._best_fit(size, small)
        if b is not None:
            self._remove(b)
        else:
            b = self._grow(size, small) if self.expandable else self._new_segment(size, small)
            if b is None:
                raise OutOfMemory(nbytes)
        rest = b.size - size
        if rest >= MIN_BLOCK if (small or self.expandable) else rest > SMALL_SIZE:
            r = _Block(b.addr + size, rest, small)
            r.prev, r.next = b, b.next
            if b.next is not None:
                b.next.prev = r
            elif self.expandable and self._tail[small] is b:
                self._tail[small] = r
            b.next, b.size = r, size
            self._insert(r)
        b.free = False
        self.allocated += b.size
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        self._next_handle += 1
        self._live[self._next_handle] = b
        return self._next_handle

    def free(self, handle: int) -> None:
        """Free an allocation: its block merges with free neighbours of the same segment and stays cached."""
        b = self._live.pop(handle)
        self.allocated -= b.size
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
                elif self._tail[b.small] is n:
                    self._tail[b.small] = b
            b.size += n.size
        self._insert(b)


@dataclass(frozen=True)
class Replay:
    """What a sequence of events did: peak reserved and allocated bytes (rounded block sizes)."""

    peak_reserved: int
    peak_allocated: int


Event = tuple[str, int]  # ("+", bytes) allocates the next tensor; ("-", index of the "+" event) frees it


def replay(events: Iterable[Event], expandable: bool = False, limit: int | None = None) -> Replay:
    """Run a sequence of events through an :class:`Allocator`. ``("+", n)`` allocates ``n`` bytes; ``("-", i)``
    frees what the ``i``-th event (counting every event from 0) allocated."""
    a = Allocator(expandable, limit)
    handles: dict[int, int] = {}
    for i, (op, n) in enumerate(events):
        if op == "+":
            handles[i] = a.malloc(n)
        else:
            a.free(handles.pop(n))
    return Replay(a.peak_reserved, a.peak_allocated)
