"""The fast path's block-parallel zlib stream (`wire.deflate`): any zlib reader gets the very bytes
back, blocks see the history before them, they compress side by side, and no thread outlives it."""

from __future__ import annotations

import random
import threading
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hasync.wire import deflate
from hasync.wire.deflate import ParallelDeflate


def compress(pieces: list[bytes], level: int = 1, block: int = 4096, workers: int = 2) -> bytes:
    stream = ParallelDeflate(level, workers=workers, block=block)
    for piece in pieces:
        stream.write(piece)
    return b"".join(stream.finish())


def deflate_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("hasync-deflate")]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.binary(max_size=3000) | st.sampled_from([b"<rule><descr>x</descr></rule>" * 40, b"a" * 5000]),
                max_size=12),
       st.sampled_from([1, 6, 9]), st.sampled_from([1, 2, 3]))
def test_any_zlib_reader_gets_the_same_bytes_back(pieces: list[bytes], level: int, workers: int) -> None:
    data = b"".join(pieces)
    stream = compress(pieces, level=level, block=1024, workers=workers)
    assert zlib.decompress(stream) == data
    inflater = zlib.decompressobj()  # read in small pieces, as the agent's `inflate` may
    out = b"".join(inflater.decompress(stream[i:i + 100]) for i in range(0, len(stream), 100))
    assert out + inflater.flush() == data and inflater.eof and not inflater.unused_data


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 3 * 4096])
def test_block_edges(size: int) -> None:
    data = random.Random(size).randbytes(size)
    assert zlib.decompress(compress([data])) == data
    assert zlib.decompress(compress([data[i:i + 1000] for i in range(0, size, 1000)])) == data


def test_a_block_refers_back_into_the_one_before() -> None:
    pattern = random.Random(7).randbytes(3000)  # incompressible alone, repeated across blocks
    data = pattern * 20
    with_history = compress([data], block=4096)
    blocks = [data[i:i + 4096] for i in range(0, len(data), 4096)]
    without = b"".join(deflate._compress_block(b, b"", 1, i == len(blocks) - 1) for i, b in enumerate(blocks))
    # control: each block alone must carry its first copy of the pattern again
    assert len(with_history) < len(without) / 2


def test_blocks_compress_side_by_side(monkeypatch: pytest.MonkeyPatch) -> None:
    meet = [threading.Barrier(2, timeout=10)]
    calls: list[int] = []
    real = deflate._compress_block

    def meeting(data: bytes, history: bytes, level: int, last: bool) -> bytes:
        calls.append(len(data))
        if len(calls) <= 2:
            meet[0].wait()  # the first two blocks: each returns only once the other is compressing
        return real(data, history, level, last)

    monkeypatch.setattr(deflate, "_compress_block", meeting)
    data = bytes(range(256)) * 40  # one write: two whole blocks of 4096 and a last one
    assert zlib.decompress(compress([data], block=4096, workers=2)) == data
    assert calls == [4096, 4096, len(data) - 8192]  # a large write is cut into blocks
    meet[0], calls[:] = threading.Barrier(2, timeout=0.5), []
    with pytest.raises(threading.BrokenBarrierError):  # control: one worker never meets another
        compress([data], block=4096, workers=1)
    assert not deflate_threads()


def test_a_fast_producer_never_queues_the_whole_document(monkeypatch: pytest.MonkeyPatch) -> None:
    gate = threading.Event()
    real = deflate._compress_block

    def slow(data: bytes, history: bytes, level: int, last: bool) -> bytes:
        gate.wait(10)
        return real(data, history, level, last)

    monkeypatch.setattr(deflate, "_compress_block", slow)
    stream = ParallelDeflate(1, workers=2, block=1024)
    waiting = []
    threading.Timer(0.5, gate.set).start()  # the producer blocks until then
    for _ in range(20):
        stream.write(b"x" * 1024)
        waiting.append(len(stream._pending))
    assert max(waiting) <= 4  # 2 x workers
    assert zlib.decompress(b"".join(stream.finish())) == b"x" * 20 * 1024
    assert not deflate_threads()


def test_no_thread_outlives_an_abandoned_stream() -> None:
    stream = ParallelDeflate(1, block=1024)
    stream.write(b"y" * 5000)
    stream.close()
    assert not deflate_threads()
