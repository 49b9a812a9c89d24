"""Drop CDC events already seen, by (node, epoch, revision), in bounded memory.

Delivery from RabbitMQ is at least once: a publisher that lost its connection
publishes its unconfirmed batches again, and a consumer that lost its
connection gets its unacked messages again. Revisions of one (node, epoch)
stream are 1, 2, 3, ... so a stream's state is its highest revision seen plus
an exact bitmap of the last WINDOW revisions. A revision that far behind the
highest one counts as seen: republishing never reaches back that far (it
covers a publisher's unconfirmed messages, FLUX_CDC_MAX_IN_FLIGHT of them: a
few thousand events with the defaults).
"""

from __future__ import annotations

from collections import OrderedDict

WINDOW = 65536
MAX_STREAMS = 4096


class Deduplicator:
    """Tells whether an event is new. Streams beyond `max_streams` are
    forgotten least recently used first (then counted in `evicted`); at most
    `max_streams * window / 8` bytes of bitmaps (32 MiB with the defaults)."""

    def __init__(self, window: int = WINDOW, max_streams: int = MAX_STREAMS) -> None:
        if window < 8 or window % 8:
            raise ValueError(f"window must be a positive multiple of 8, got {window}")
        if max_streams < 1:
            raise ValueError(f"max_streams must be at least 1, got {max_streams}")
        self._window = window
        self._max_streams = max_streams
        self._streams: OrderedDict[tuple[str, str], _Stream] = OrderedDict()
        self.evicted = 0

    def __len__(self) -> int:
        """The number of streams remembered."""
        return len(self._streams)

    def is_new(self, node: str, epoch: str, rev: int) -> bool:
        """True the first time (node, epoch, rev) is seen, False after that, and
        False for a revision at or below the stream's highest minus the window."""
        key = (node, epoch)
        stream = self._streams.get(key)
        if stream is None:
            stream = self._streams[key] = _Stream(self._window)
            if len(self._streams) > self._max_streams:
                self._streams.popitem(last=False)
                self.evicted += 1
        else:
            self._streams.move_to_end(key)
        return stream.is_new(rev)


class _Stream:
    """One stream's highest revision and a ring of `window` bits: the bit of
    revision r is r % window, set for the revisions of (high - window, high]
    seen so far."""

    __slots__ = ("bits", "high", "window")

    def __init__(self, window: int) -> None:
        self.window = window
        self.high = 0
        self.bits = bytearray(window // 8)

    def is_new(self, rev: int) -> bool:
        if rev > self.high:
            # The revisions the window slides past share their bits with the
            # ones it slides over, high + 1 .. rev: those start out unseen.
            self._clear(self.high + 1, rev - self.high)
            self.high = rev
        elif rev <= self.high - self.window:
            return False
        i = rev % self.window
        byte, mask = i >> 3, 1 << (i & 7)
        if self.bits[byte] & mask:
            return False
        self.bits[byte] |= mask
        return True

    def _clear(self, first: int, count: int) -> None:
        """Clear the bits of `count` revisions from `first` on."""
        if count >= self.window:
            self.bits[:] = bytes(len(self.bits))
            return
        start = first % self.window
        end = start + count
        if end <= self.window:
            self._clear_bits(start, end)
        else:  # wraps around the ring
            self._clear_bits(start, self.window)
            self._clear_bits(0, end - self.window)

    def _clear_bits(self, start: int, end: int) -> None:
        """Clear bits start .. end - 1 of the ring (start < end)."""
        bits = self.bits
        lo, hi = start >> 3, end >> 3
        if lo == hi:
            bits[lo] &= ~(((1 << (end - start)) - 1) << (start & 7)) & 0xFF
            return
        if start & 7:
            bits[lo] &= (1 << (start & 7)) - 1
            lo += 1
        bits[lo:hi] = bytes(hi - lo)
        if end & 7:
            bits[hi] &= ~((1 << (end & 7)) - 1) & 0xFF
