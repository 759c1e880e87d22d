"""MLLP framing: cut a byte stream into frames (0x0B <payload> 0x1C 0x0D), and make frames.

A pure bytes codec over an ``asyncio.StreamReader``: it does not decode, parse or answer the
payload (the HL7 layer above does), and it never writes to the stream.

Exceptions:

    FramingError              root; the connection should be closed after any of them
     +-- FrameTimeout         ``kind`` "idle": no frame started within idle_timeout;
     |                        "read": a started frame did not end within read_timeout
     +-- FrameTruncated       the stream ended inside a frame (``received`` payload bytes)

What the reader tolerates, because real senders do it:

- bytes before a start byte (stray CR/LF between frames, keep-alive noise) are discarded and
  counted in the next frame's ``skipped``; garbage followed by end of stream is a clean end,
  counted in ``FrameReader.trailing_garbage``;
- a 0x1C not followed by 0x0D inside a frame is payload;
- a new start byte inside a frame abandons the partial frame (a sender that timed out and
  restarted); its bytes are counted in the new frame's ``skipped``;
- a frame longer than ``max_size`` is read to its end, so that the sender gets an answer instead
  of resending forever, but only its head is kept (enough to read MSH and reject it).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "Frame",
    "FrameReader",
    "FrameTimeout",
    "FrameTruncated",
    "FramingError",
    "encode_frame",
]

START_BLOCK = b"\x0b"  # VT: opens a frame
END_BLOCK = b"\x1c\x0d"  # FS CR: closes it
_FS = b"\x1c"
# One read's worth. Bounds the memory of an oversized frame together with head_keep.
_CHUNK = 64 * 1024


@dataclass(frozen=True, slots=True)
class Frame:
    """One frame's payload, without the framing bytes.

    ``payload`` is the whole payload, or only its first bytes when ``oversized``; ``size`` is the
    number of payload bytes received (all of them, kept or not); ``skipped`` counts the bytes
    discarded before this frame's start byte (garbage and abandoned partial frames).
    """

    payload: bytes
    size: int
    oversized: bool
    skipped: int


class FramingError(Exception):
    """Root of the MLLP framing errors: the stream cannot be framed any further.

    Do not try to answer the sender after one of these (there is no message to answer); close
    the connection.
    """


class FrameTimeout(FramingError):
    """The sender was too slow: ``kind`` is "idle" (no frame started in time) or "read" (a
    started frame did not end in time)."""

    def __init__(self, kind: Literal["idle", "read"]) -> None:
        what = "no frame started" if kind == "idle" else "a started frame did not end"
        super().__init__(f"{what} within the {kind} timeout")
        self.kind: Literal["idle", "read"] = kind

    def __reduce__(self) -> tuple[type[FrameTimeout], tuple[str]]:
        return (type(self), (self.kind,))


class FrameTruncated(FramingError):
    """The stream ended inside a frame, after ``received`` payload bytes."""

    def __init__(self, received: int) -> None:
        super().__init__(f"the stream ended inside a frame after {received} payload bytes")
        self.received = received

    def __reduce__(self) -> tuple[type[FrameTruncated], tuple[int]]:
        return (type(self), (self.received,))


def encode_frame(payload: bytes) -> bytes:
    """Wrap one payload (an encoded HL7 message) in MLLP framing.

    Raises ValueError when the payload holds a start byte (0x0B) or the end sequence
    (0x1C 0x0D): the receiver would cut it in the wrong place. Not for batches of several
    messages: frame each message on its own.
    """
    if START_BLOCK in payload or END_BLOCK in payload:
        raise ValueError("an MLLP payload must not contain 0x0B or 0x1C 0x0D")
    return START_BLOCK + payload + END_BLOCK


class FrameReader:
    """Reads MLLP frames from one connection, one ``next_frame()`` at a time.

    Memory stays bounded by about ``max_size`` plus one read chunk (64 KiB) for a normal frame,
    and by ``head_keep`` plus one chunk for an oversized one. ``head_keep`` is capped at
    ``max_size``. Timeouts are ``None`` for "wait forever" (only for trusted local streams,
    such as tests and replays).

    Not safe for concurrent ``next_frame()`` calls on one reader; not for reading anything but
    MLLP from the stream in between. After a FrameTimeout("read") or FrameTruncated the reader
    has lost its place: close the connection. After FrameTimeout("idle") nothing has been lost,
    and the reader may be asked again.
    """

    __slots__ = (
        "_buf",
        "_eof",
        "_head_keep",
        "_idle_timeout",
        "_max_size",
        "_read_timeout",
        "_reader",
        "_skipped",
        "trailing_garbage",
    )

    def __init__(
        self,
        reader: asyncio.StreamReader,
        *,
        max_size: int = 16 * 1024 * 1024,
        head_keep: int = 64 * 1024,
        idle_timeout: float | None = 600.0,
        read_timeout: float | None = 60.0,
    ) -> None:
        if max_size < 1:
            raise ValueError("max_size must be at least 1")
        if head_keep < 0:
            raise ValueError("head_keep must not be negative")
        for name, value in (("idle_timeout", idle_timeout), ("read_timeout", read_timeout)):
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, or None")
        self._reader = reader
        self._max_size = max_size
        self._head_keep = min(head_keep, max_size)
        self._idle_timeout = idle_timeout
        self._read_timeout = read_timeout
        # Bytes read from the stream and not yet returned: the frame in progress, then any
        # pipelined frames that arrived in the same chunk.
        self._buf = bytearray()
        # Garbage discarded since the last frame returned; kept on the instance so that an
        # idle timeout loses no count.
        self._skipped = 0
        self._eof = False
        #: Garbage bytes between the last frame and a clean end of stream (set when
        #: ``next_frame`` returns None).
        self.trailing_garbage = 0

    @property
    def pending_garbage(self) -> int:
        """Garbage bytes discarded since the last frame returned and not yet counted in one:
        what to report when giving up on the stream after a FramingError."""
        return self._skipped

    async def _fill(self, deadline: float | None) -> bool:
        """Append one chunk from the stream to the buffer; False at end of stream.

        Raises TimeoutError when the deadline (event loop time) passes first.
        """
        if self._eof:
            return False
        if deadline is None:
            chunk = await self._reader.read(_CHUNK)
        else:
            async with asyncio.timeout_at(deadline):
                chunk = await self._reader.read(_CHUNK)
        if not chunk:
            self._eof = True
            return False
        self._buf += chunk
        return True

    def _deadline(self, timeout: float | None) -> float | None:
        return None if timeout is None else asyncio.get_running_loop().time() + timeout

    async def next_frame(self) -> Frame | None:
        """The next frame, or None when the stream ends cleanly between frames.

        Raises FrameTimeout("idle") when no start byte arrives within idle_timeout of the call,
        FrameTimeout("read") when a frame is not complete within read_timeout of its start byte
        (total time, so a sender trickling bytes is cut off), FrameTruncated when the stream ends
        inside a frame.
        """
        buf = self._buf
        if self._eof and not buf:
            return None  # asked again after the end: keep trailing_garbage as it was
        if not await self._find_start():
            self.trailing_garbage = self._skipped
            self._skipped = 0
            return None
        read_deadline = self._deadline(self._read_timeout)
        head: bytes | None = None  # set once the frame is known to be oversized
        dropped = 0  # payload bytes cut from the front of the buffer (oversized frames only)
        scan = 0  # where to resume searching: earlier bytes hold neither start nor end
        while True:
            end = buf.find(END_BLOCK, scan)
            restart = buf.find(START_BLOCK, scan, len(buf) if end < 0 else end)
            if restart >= 0:
                # A sender that gave up on a frame and began again: the partial frame (and its
                # start byte) becomes garbage, and the new frame gets its own read time.
                self._skipped += 1 + dropped + restart
                del buf[: restart + 1]
                head, dropped, scan = None, 0, 0
                read_deadline = self._deadline(self._read_timeout)
                continue
            if end >= 0:
                size = dropped + end
                if head is None and size <= self._max_size:
                    frame = Frame(bytes(buf[:end]), size, False, self._skipped)
                else:
                    kept = head if head is not None else bytes(buf[: self._head_keep])
                    frame = Frame(kept, size, True, self._skipped)
                del buf[: end + 2]
                self._skipped = 0
                return frame
            # A trailing 0x1C may be the first half of the end sequence: keep it for the next
            # search. Everything before it is payload.
            pending = 1 if buf.endswith(_FS) else 0
            if head is not None or len(buf) - pending > self._max_size:
                if head is None:
                    head = bytes(buf[: self._head_keep])
                cut = len(buf) - pending
                dropped += cut
                del buf[:cut]
            scan = max(len(buf) - 1, 0)
            try:
                more = await self._fill(read_deadline)
            except TimeoutError:
                raise FrameTimeout("read") from None
            if not more:
                raise FrameTruncated(dropped + len(buf))

    async def _find_start(self) -> bool:
        """Discard bytes up to and including the next start byte; False at end of stream."""
        buf = self._buf
        idle_deadline = self._deadline(self._idle_timeout)
        while True:
            start = buf.find(START_BLOCK)
            if start >= 0:
                self._skipped += start
                del buf[: start + 1]
                return True
            self._skipped += len(buf)
            buf.clear()
            try:
                more = await self._fill(idle_deadline)
            except TimeoutError:
                raise FrameTimeout("idle") from None
            if not more:
                return False
