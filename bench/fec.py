"""FEC engine cost per datagram: sender and receiver paths next to zfec's own cost.

    .venv/bin/python bench/fec.py [--repeat 9] [--count 4096]

Sender path: `ShardEncoder.encode` (block split, padding, zfec parity, shard headers; no
encryption). Receiver path: `ShardDecoder.receive` for every shard that arrives (header
parse, validation, reassembly, rebuild, dedup of the shards beyond k, delivery), in two
cases: all n shards arrive data first (rebuilt without zfec), and shard 0 is lost (zfec
decode from shards 1, 2, 3; shard 4 dropped as a duplicate).

"Raw zfec" is zfec alone on the same blocks, already split: `Encoder.encode` of the
parity shards, `Decoder.decode` from shards 1, 2, 3. The ratio is the Python overhead
around zfec in units of zfec's own cost: (path - raw) / raw.

Frames are replayed in batches of 256 datagrams so that they are in cache, as a freshly
decrypted frame is. Each repetition runs every measurement once, interleaved, so that a
noisy neighbour hits them alike; figures are medians over repetitions, in µs/datagram.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable, Sequence

from warp.redundancy import ShardDecoder, ShardEncoder
from warp.redundancy.codec import zfec_decoder, zfec_encoder
from warp.redundancy.shard import SHARD_HEADER_SIZE, parse_shard_header

K, N, MTU = 3, 5, 1400
SIZES = (64, 1400, 8192)
BATCH = 256  # datagrams per working set (and per fresh decoder)
LOST_ONE = (1, 2, 3, 4)  # shard 0 lost
DECODE_FROM = (1, 2, 3)


def timed(run: Callable[..., object], *args: object) -> float:
    start = time.perf_counter()
    run(*args)
    return time.perf_counter() - start


def encode_all(encode: Callable[[bytes], object], datagrams: list[bytes]) -> None:
    for datagram in datagrams:
        encode(datagram)


def zfec_all(code: Callable[..., object], blocks: list[tuple[bytes, ...]], nums: object) -> None:
    for pieces in blocks:
        code(pieces, nums)


def receive_all(receive: Callable[[bytes, float], list[bytes]], frames: list[bytes]) -> int:
    delivered = 0
    for frame in frames:
        delivered += len(receive(frame, 0.0))
    return delivered


class SizeBench:
    """Everything measured for one datagram size; `run_once` returns µs/datagram."""

    def __init__(self, size: int, count: int) -> None:
        rng = random.Random(size)
        self.count = count - count % BATCH
        self.datagrams = [rng.randbytes(size) for _ in range(self.count)]
        encoder = ShardEncoder(1, K, N, MTU, epoch=1)
        self.encoded = [encoder.encode(d) for d in self.datagrams]
        # The same blocks as zfec sees them: payloads without headers.
        self.pieces = []
        for blocks in self.encoded:
            for frames in blocks:
                header = parse_shard_header(frames[0])
                assert header is not None
                end = SHARD_HEADER_SIZE + header.payload_size
                self.pieces.append(tuple(f[SHARD_HEADER_SIZE:end] for f in frames))
        self.blocks_per_datagram = len(self.pieces) / self.count

    def sender(self) -> float:
        encode = ShardEncoder(1, K, N, MTU, epoch=1).encode
        total = 0.0
        for start in range(0, self.count, BATCH):
            total += timed(encode_all, encode, self.datagrams[start : start + BATCH])
        return total / self.count * 1e6

    def raw_encode(self) -> float:
        encode = zfec_encoder(K, N).encode
        parity = tuple(range(K, N))
        total = 0.0
        per_batch = int(BATCH * self.blocks_per_datagram)
        for start in range(0, len(self.pieces), per_batch):
            batch = [p[:K] for p in self.pieces[start : start + per_batch]]
            total += timed(zfec_all, encode, batch, parity)
        return total / self.count * 1e6

    def raw_decode(self) -> float:
        decode = zfec_decoder(K, N).decode
        total = 0.0
        per_batch = int(BATCH * self.blocks_per_datagram)
        for start in range(0, len(self.pieces), per_batch):
            chunk = self.pieces[start : start + per_batch]
            batch = [tuple(p[i] for i in DECODE_FROM) for p in chunk]
            total += timed(zfec_all, decode, batch, DECODE_FROM)
        return total / self.count * 1e6

    def receiver(self, order: Sequence[int]) -> float:
        total = 0.0
        for start in range(0, self.count, BATCH):
            chunk = self.encoded[start : start + BATCH]
            frames = [f[i] for blocks in chunk for f in blocks for i in order]
            decoder = ShardDecoder(1, K, N)
            total += timed(receive_all, decoder.receive, frames)
            assert decoder.stats.datagrams_delivered == len(chunk)
        return total / self.count * 1e6

    def run_once(self) -> dict[str, float]:
        return {
            "raw_encode": self.raw_encode(),
            "sender": self.sender(),
            "raw_decode": self.raw_decode(),
            "receiver_all": self.receiver(range(N)),
            "receiver_lost": self.receiver(LOST_ONE),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--count", type=int, default=4096, help="datagrams per measurement")
    args = parser.parse_args()
    benches = {
        size: SizeBench(size, args.count if size <= 1400 else args.count // 4) for size in SIZES
    }
    samples: dict[int, list[dict[str, float]]] = {size: [] for size in SIZES}
    for _ in range(args.repeat):
        for size, bench in benches.items():
            samples[size].append(bench.run_once())
    print(f"k={K} n={N} mtu={MTU}; µs per datagram, median of {args.repeat} interleaved runs")
    header = (
        f"{'size':>6} | {'zfec enc':>8} {'sender':>7} {'ratio':>5} | "
        f"{'zfec dec':>8} {'rx all n':>8} {'rx lost 0':>9} {'ratio':>5}"
    )
    print(header)
    print("-" * len(header))
    for size in SIZES:
        m = {key: statistics.median(s[key] for s in samples[size]) for key in samples[size][0]}
        sender_ratio = (m["sender"] - m["raw_encode"]) / m["raw_encode"]
        receiver_ratio = (m["receiver_lost"] - m["raw_decode"]) / m["raw_decode"]
        print(
            f"{size:>6} | {m['raw_encode']:>8.2f} {m['sender']:>7.2f} {sender_ratio:>5.2f} | "
            f"{m['raw_decode']:>8.2f} {m['receiver_all']:>8.2f} {m['receiver_lost']:>9.2f} "
            f"{receiver_ratio:>5.2f}"
        )
    print(
        "ratio = (path - zfec) / zfec, the Python overhead in units of zfec's own cost;"
        " target <= 2 at 1400 B.\nrx all n: no zfec call at all (all data shards arrive)."
    )


if __name__ == "__main__":
    main()
