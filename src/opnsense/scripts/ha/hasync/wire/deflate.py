"""One zlib stream compressed in blocks on several threads, as pigz does.

Why: compressing the fast path's document was most of the primary's work before it can send
(building the 16 MB document of a 20 MB config took 0.38-0.43 s, two thirds of it zlib at level
1), while the second core sat idle: the agent waits for the document then. zlib lets other
threads run while it compresses, so blocks compressed side by side take about half the time on
two cores (the build: 0.21-0.25 s). The result is still one standard zlib stream, which any
`zlib.decompressobj` (the agent's `wire.sections.inflate`, an older agent) reads back to the very
same bytes: the blocks are raw deflate, each primed with the 32 KiB before it (`zdict`, so
matches reach across a boundary) and ended with a sync flush (byte-aligned, not final) but the
last, behind one zlib header and before the Adler-32 of everything.
"""

from __future__ import annotations

import zlib
from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from concurrent.futures import Future, ThreadPoolExecutor

BLOCK = 1024 * 1024  # raw bytes per block: a few per core even for a 2 MB config
WINDOW = 32 * 1024  # deflate's history: what the next block may refer back to
RAW_DEFLATE = -15  # window bits for a raw deflate stream (no zlib header or trailer)


def _compress_block(data: bytes, history: bytes, level: int, last: bool) -> bytes:
    """One block as raw deflate, primed with `history` (the bytes before it), ended by a sync
    flush (byte-aligned, so the next block's bits can follow) unless it is the `last`."""
    if history:
        compressor = zlib.compressobj(level, zlib.DEFLATED, RAW_DEFLATE, zdict=history)
    else:  # (the first block: no history to prime with)
        compressor = zlib.compressobj(level, zlib.DEFLATED, RAW_DEFLATE)
    return compressor.compress(data) + compressor.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)


class ParallelDeflate:
    """Feed bytes with `write`, then `finish` for the stream's pieces, in order.

    At most `2 * workers` blocks wait to be compressed at any time (then `write` waits for the
    oldest), so a producer faster than the compression never queues the whole document.
    """

    def __init__(self, level: int, workers: int = 2, block: int = BLOCK) -> None:
        from concurrent.futures import ThreadPoolExecutor  # (only a sync that sends builds one)

        self.level = level
        self.block = block
        self.pieces: list[bytes] = [zlib.compress(b"", level)[:2]]  # the zlib header for `level`
        self._pool: ThreadPoolExecutor = ThreadPoolExecutor(max_workers=workers,
                                                            thread_name_prefix="hasync-deflate")
        self._limit = 2 * workers
        self._pending: deque[Future[bytes]] = deque()
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._history = b""
        self._adler = zlib.adler32(b"")

    def write(self, data: bytes) -> None:
        self._adler = zlib.adler32(data, self._adler)
        self._buffer.append(data)
        self._buffered += len(data)
        if self._buffered >= self.block:  # (one write may be a whole section: cut into blocks)
            whole = b"".join(self._buffer)
            cut = len(whole) - len(whole) % self.block
            for start in range(0, cut, self.block):
                self._submit(whole[start:start + self.block], last=False)
            self._buffer = [whole[cut:]] if cut < len(whole) else []
            self._buffered = len(whole) - cut

    def _submit(self, data: bytes, last: bool) -> None:
        self._pending.append(self._pool.submit(_compress_block, data, self._history, self.level, last))
        self._history = data[-WINDOW:] if len(data) >= WINDOW else (self._history + data)[-WINDOW:]
        while len(self._pending) > self._limit:
            self.pieces.append(self._pending.popleft().result())

    def finish(self) -> list[bytes]:
        """The whole stream, as pieces to join; the threads are gone when it returns."""
        try:
            self._submit(b"".join(self._buffer), last=True)  # (possibly empty: a stream ends with a final block)
            self._buffer, self._buffered = [], 0
            while self._pending:
                self.pieces.append(self._pending.popleft().result())
        finally:
            self.close()
        self.pieces.append(self._adler.to_bytes(4, "big"))
        return self.pieces

    def close(self) -> None:
        """Stop the threads (after an error too: nothing of the stream is used then)."""
        for future in self._pending:
            future.cancel()
        self._pool.shutdown(wait=True)
