"""MLLP framing over real asyncio streams: frames, pipelining, garbage, restarts, oversized
frames, truncation and timeouts. Payloads are synthetic bytes, not patient messages."""

from __future__ import annotations

import asyncio
import itertools
import pickle
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.mllp.framing import (
    Frame,
    FrameReader,
    FrameTimeout,
    FrameTruncated,
    FramingError,
    encode_frame,
)

T = TypeVar("T")

MSG1 = b"MSH|^~\\&|RIS|RAD|SAFETYNET|TRUST|20240301120000||ORU^R01|M1|P|2.5.1\rPID|1||X1\r"
MSG2 = b"MSH|^~\\&|PAS|ADT|SAFETYNET|TRUST|20240301120100||ADT^A03|M2|P|2.4\r"


def run(factory: Callable[[], Awaitable[T]], timeout: float = 5.0) -> T:
    """Run one coroutine in a fresh loop, with a guard so that a hang fails instead of blocking."""

    async def guarded() -> T:
        return await asyncio.wait_for(factory(), timeout)

    return asyncio.run(guarded())


async def read_all(reader: FrameReader) -> list[Frame]:
    frames = []
    while (frame := await reader.next_frame()) is not None:
        frames.append(frame)
    return frames


def frames_of(data: bytes, **options: float | int | None) -> tuple[list[Frame], int]:
    """Every frame in ``data`` fed at once, and the trailing garbage count."""

    async def go() -> tuple[list[Frame], int]:
        stream = asyncio.StreamReader()
        stream.feed_data(data)
        stream.feed_eof()
        reader = FrameReader(stream, **options)  # type: ignore[arg-type]
        return await read_all(reader), reader.trailing_garbage

    return run(go)


async def feed_in_pieces(stream: asyncio.StreamReader, pieces: Sequence[bytes]) -> None:
    """Feed one piece at a time, letting the reader consume each before the next arrives."""
    for piece in pieces:
        stream.feed_data(piece)
        for _ in range(3):
            await asyncio.sleep(0)
    stream.feed_eof()


def frames_in_pieces(pieces: Sequence[bytes]) -> tuple[list[Frame], int]:
    async def go() -> tuple[list[Frame], int]:
        stream = asyncio.StreamReader()
        reader = FrameReader(stream, max_size=1000, head_keep=100)
        feeder = asyncio.create_task(feed_in_pieces(stream, pieces))
        frames = await read_all(reader)
        await feeder
        return frames, reader.trailing_garbage

    return run(go)


def test_encode_frame_wraps_the_payload() -> None:
    assert encode_frame(b"MSH|x") == b"\x0bMSH|x\x1c\x0d"
    assert encode_frame(b"") == b"\x0b\x1c\x0d"


@pytest.mark.parametrize("payload", [b"a\x0bb", b"a\x1c\x0db"])
def test_encode_frame_refuses_payload_that_would_misframe(payload: bytes) -> None:
    with pytest.raises(ValueError):
        encode_frame(payload)


def test_single_frame_then_clean_end() -> None:
    frames, trailing = frames_of(encode_frame(MSG1))
    assert frames == [Frame(MSG1, len(MSG1), False, 0)]
    assert trailing == 0


def test_empty_stream_is_a_clean_end() -> None:
    assert frames_of(b"") == ([], 0)


def test_empty_payload_is_a_frame() -> None:
    assert frames_of(b"\x0b\x1c\x0d")[0] == [Frame(b"", 0, False, 0)]


def test_pipelined_frames_in_one_chunk() -> None:
    data = encode_frame(MSG1) + encode_frame(MSG2) + encode_frame(MSG1)
    frames, _ = frames_of(data)
    assert [f.payload for f in frames] == [MSG1, MSG2, MSG1]
    assert all(not f.oversized and f.skipped == 0 for f in frames)


def test_many_pipelined_frames_across_chunks() -> None:
    payloads = [b"MSH|%d|" % i + b"x" * (i % 300) for i in range(2000)]
    frames, _ = frames_of(b"".join(encode_frame(p) for p in payloads))
    assert [f.payload for f in frames] == payloads


def test_garbage_before_between_and_after_frames_is_counted() -> None:
    data = b"\r\n  " + encode_frame(MSG1) + b"\n\x1c\x0d" + encode_frame(MSG2) + b"\r\nxyz"
    frames, trailing = frames_of(data)
    assert [(f.payload, f.skipped) for f in frames] == [(MSG1, 4), (MSG2, 3)]
    assert trailing == 5


def test_garbage_only_stream_is_a_clean_end_with_trailing_garbage() -> None:
    frames, trailing = frames_of(b"\r\n" * 100_000)
    assert frames == []
    assert trailing == 200_000


def test_file_separator_without_carriage_return_is_payload() -> None:
    payload = b"MSH|a\x1cb|\x1c\x1c|end\x1c"
    frames, _ = frames_of(encode_frame(payload) + encode_frame(MSG2))
    assert [f.payload for f in frames] == [payload, MSG2]
    assert frames[0].size == len(payload)


def test_a_new_start_byte_abandons_the_partial_frame() -> None:
    data = b"ab\x0bMSH|partial" + encode_frame(MSG1)
    frames, _ = frames_of(data)
    # 2 garbage bytes, then the abandoned start byte and its 11 payload bytes
    assert frames == [Frame(MSG1, len(MSG1), False, 2 + 1 + 11)]


def test_a_restart_inside_an_oversized_frame_arriving_later() -> None:
    data = b"\x0b" + b"p" * 3000 + encode_frame(MSG2)
    pieces = [data[i : i + 500] for i in range(0, len(data), 500)]
    frames, _ = frames_in_pieces(pieces)
    assert frames == [Frame(MSG2, len(MSG2), False, 3001)]


def test_oversized_frame_keeps_the_head_and_the_next_frame_is_read() -> None:
    # 5,120 bytes of every value but the start byte and the file separator
    big = (bytes(range(256)) * 20).replace(b"\x0b", b"v").replace(b"\x1c", b"f")
    frames, _ = frames_of(encode_frame(big) + encode_frame(MSG2), max_size=1000, head_keep=100)
    assert frames[0] == Frame(big[:100], len(big), True, 0)
    assert frames[1] == Frame(MSG2, len(MSG2), False, 0)


def test_oversized_frame_arriving_in_small_pieces() -> None:
    big = b"0123456789" * 500  # 5,000 bytes
    data = encode_frame(big) + encode_frame(MSG2)
    pieces = [data[i : i + 97] for i in range(0, len(data), 97)]
    frames, _ = frames_in_pieces(pieces)
    assert frames[0] == Frame(big[:100], 5000, True, 0)
    assert frames[1].payload == MSG2


def test_frame_of_exactly_max_size_is_not_oversized() -> None:
    payload = b"x" * 999 + b"\x1c"  # its last byte may look like the start of the end sequence
    data = encode_frame(payload)
    for split in range(len(data) + 1):
        frames, _ = frames_in_pieces([data[:split], data[split:]])
        assert frames == [Frame(payload, 1000, False, 0)], split
    frames, _ = frames_of(encode_frame(payload + b"y"), max_size=1000, head_keep=10)
    assert frames == [Frame(payload[:10], 1001, True, 0)]


def test_head_keep_is_capped_at_max_size() -> None:
    frames, _ = frames_of(encode_frame(b"z" * 5000), max_size=1000)
    assert frames == [Frame(b"z" * 1000, 5000, True, 0)]


def test_oversized_frame_memory_stays_bounded() -> None:
    total = 8 * 1024 * 1024
    piece = b"y" * 65536

    async def go() -> tuple[Frame | None, int]:
        stream = asyncio.StreamReader()
        reader = FrameReader(stream, max_size=100_000, head_keep=1000)

        async def feed() -> None:
            stream.feed_data(b"\x0b")
            for _ in range(total // len(piece)):
                stream.feed_data(piece)
                await asyncio.sleep(0)
            stream.feed_data(b"\x1c\x0d")
            stream.feed_eof()

        tracemalloc.start()
        try:
            feeder = asyncio.create_task(feed())
            frame = await reader.next_frame()
            await feeder
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        return frame, peak

    frame, peak = run(go)
    assert frame == Frame(b"y" * 1000, total, True, 0)
    assert peak < 1024 * 1024, peak  # an 8 MiB frame read in well under 1 MiB


def test_eof_inside_a_frame_is_truncation() -> None:
    with pytest.raises(FrameTruncated) as caught:
        frames_of(encode_frame(MSG1) + b"\x0bMSH|half")
    assert caught.value.received == 8
    assert isinstance(caught.value, FramingError)


def test_eof_after_a_lone_file_separator_is_truncation() -> None:
    with pytest.raises(FrameTruncated) as caught:
        frames_of(b"\x0babc\x1c")
    assert caught.value.received == 4


def test_eof_inside_an_oversized_frame_counts_every_byte() -> None:
    with pytest.raises(FrameTruncated) as caught:
        frames_of(b"\x0b" + b"q" * 3000, max_size=1000, head_keep=10)
    assert caught.value.received == 3000


def test_asking_again_after_the_end_stays_at_the_end() -> None:
    async def go() -> tuple[Frame | None, Frame | None, int]:
        stream = asyncio.StreamReader()
        stream.feed_data(b"\r\n")
        stream.feed_eof()
        reader = FrameReader(stream)
        first = await reader.next_frame()
        second = await reader.next_frame()
        return first, second, reader.trailing_garbage

    assert run(go) == (None, None, 2)


def test_idle_timeout_when_no_frame_starts() -> None:
    async def go() -> None:
        stream = asyncio.StreamReader()
        stream.feed_data(b"noise")  # garbage does not count as a frame starting
        await FrameReader(stream, idle_timeout=0.05).next_frame()

    with pytest.raises(FrameTimeout) as caught:
        run(go)
    assert caught.value.kind == "idle"


def test_after_an_idle_timeout_the_reader_can_go_on() -> None:
    async def go() -> Frame | None:
        stream = asyncio.StreamReader()
        stream.feed_data(b"\r\n")
        reader = FrameReader(stream, idle_timeout=0.05)
        with pytest.raises(FrameTimeout):
            await reader.next_frame()
        stream.feed_data(encode_frame(MSG1))
        return await reader.next_frame()

    assert run(go) == Frame(MSG1, len(MSG1), False, 2)


def test_read_timeout_cuts_off_a_sender_that_trickles() -> None:
    async def go() -> None:
        stream = asyncio.StreamReader()
        reader = FrameReader(stream, idle_timeout=1.0, read_timeout=0.2)

        async def trickle() -> None:
            for byte in encode_frame(MSG1):
                stream.feed_data(bytes([byte]))
                await asyncio.sleep(0.05)

        feeder = asyncio.create_task(trickle())
        try:
            await reader.next_frame()
        finally:
            feeder.cancel()

    started = time.monotonic()
    with pytest.raises(FrameTimeout) as caught:
        run(go)
    assert caught.value.kind == "read"
    # Cut off at the read timeout, although a byte arrived every 0.05 s.
    assert 0.15 < time.monotonic() - started < 0.6


def test_timeouts_none_wait_forever_but_frames_still_arrive() -> None:
    async def go() -> Frame | None:
        stream = asyncio.StreamReader()
        reader = FrameReader(stream, idle_timeout=None, read_timeout=None)
        asyncio.get_running_loop().call_later(0.02, stream.feed_data, encode_frame(MSG2))
        return await reader.next_frame()

    assert run(go) == Frame(MSG2, len(MSG2), False, 0)


@pytest.mark.parametrize(
    "options",
    [{"max_size": 0}, {"head_keep": -1}, {"idle_timeout": 0}, {"read_timeout": -1.0}],
)
def test_bad_options_are_refused(options: dict[str, float]) -> None:
    async def go() -> None:
        FrameReader(asyncio.StreamReader(), **options)  # type: ignore[arg-type]

    with pytest.raises(ValueError):
        run(go)


def test_errors_pickle_and_say_what_happened() -> None:
    for error in (FrameTimeout("read"), FrameTruncated(12)):
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and str(copy) == str(error)
    assert "12" in str(FrameTruncated(12))


def test_every_single_split_point() -> None:
    data = b"\r\n" + encode_frame(MSG1) + encode_frame(b"a\x1cb") + b"\n" + encode_frame(MSG2)
    expected = [(MSG1, 2), (b"a\x1cb", 0), (MSG2, 1)]
    for split in range(len(data) + 1):
        frames, trailing = frames_in_pieces([data[:split], data[split:]])
        assert [(f.payload, f.skipped) for f in frames] == expected, split
        assert trailing == 0


_payload_bytes = (
    st.binary(max_size=200)
    .map(lambda b: b.replace(b"\x0b", b""))
    .filter(lambda b: b"\x1c\x0d" not in b)
)
_garbage = st.binary(max_size=20).map(lambda b: b.replace(b"\x0b", b""))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    frames=st.lists(st.tuples(_garbage, _payload_bytes), min_size=1, max_size=5),
    tail=_garbage,
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=12),
)
def test_any_split_reads_the_same_frames(
    frames: list[tuple[bytes, bytes]], tail: bytes, cuts: list[int]
) -> None:
    data = b"".join(garbage + encode_frame(payload) for garbage, payload in frames) + tail
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    pieces = [data[a:b] for a, b in itertools.pairwise(points)]
    got, trailing = frames_in_pieces(pieces)
    assert [(f.payload, f.size, f.skipped, f.oversized) for f in got] == [
        (payload, len(payload), len(garbage), False) for garbage, payload in frames
    ]
    assert trailing == len(tail)


def test_over_a_real_socket_with_pipelining_and_answers() -> None:
    async def go() -> tuple[list[bytes], list[Frame]]:
        received: list[Frame] = []

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            frames = FrameReader(reader, idle_timeout=2.0, read_timeout=2.0)
            while (frame := await frames.next_frame()) is not None:
                received.append(frame)
                writer.write(encode_frame(b"ACK " + frame.payload[:11]))
                await writer.drain()
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"\n" + encode_frame(MSG1) + encode_frame(MSG2))  # pipelined
            big = encode_frame(b"B" * 200_000)
            writer.write(big[:70_000])
            await writer.drain()
            await asyncio.sleep(0.01)
            writer.write(big[70_000:])
            await writer.drain()
            answers = FrameReader(reader, idle_timeout=2.0, read_timeout=2.0)
            acks = []
            for _ in range(3):
                answer = await answers.next_frame()
                assert answer is not None
                acks.append(answer.payload)
            writer.close()
            await writer.wait_closed()
        return acks, received

    acks, received = run(go)
    assert acks == [b"ACK " + MSG1[:11], b"ACK " + MSG2[:11], b"ACK " + b"B" * 11]
    assert [(f.size, f.skipped, f.oversized) for f in received] == [
        (len(MSG1), 1, False),
        (len(MSG2), 0, False),
        (200_000, 0, False),
    ]
