"""FEC engine cost per datagram: sender and receiver paths next to zfec's own cost.

    .venv/bin/python bench/fec.py [--repeat 7] [--count 20000]

Sender path: `ShardEncoder.encode` (block split, padding, zfec parity, shard headers; no
encryption). Receiver path: `ShardDecoder.receive` for every shard that arrives (header
parse, validation, reassembly, rebuild, dedup of the shards beyond k, delivery).
"Raw zfec" is zfec alone on the same blocks, already split. Figures are medians over
`--repeat` runs of `--count` datagrams each, in µs per datagram. The ratio is the Python
overhead around zfec divided by zfec's cost: (path - raw) / raw.
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


def median_us(run: Callable[[], int], repeat: int) -> float:
    """Median over `repeat` runs of µs per item; `run` returns how many items it did."""
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        items = run()
        samples.append((time.perf_counter() - start) / items * 1e6)
    return statistics.median(samples)


def bench_size(size: int, count: int, repeat: int) -> dict[str, float]:
    rng = random.Random(size)
    datagrams = [rng.randbytes(size) for _ in range(count)]
    encoder = ShardEncoder(1, K, N, MTU, epoch=1)
    # Frames of each datagram, per block, to replay into fresh decoders.
    encoded = [encoder.encode(d) for d in datagrams]

    def sender() -> int:
        encode = ShardEncoder(1, K, N, MTU, epoch=1).encode
        for datagram in datagrams:
            encode(datagram)
        return count

    # Raw zfec on the same blocks: split data pieces as the encoder pads and splits them.
    raw_blocks = []
    for blocks in encoded[: min(count, 2000)]:
        for frames in blocks:
            header = parse_shard_header(frames[0])
            assert header is not None
            pieces = tuple(
                f[SHARD_HEADER_SIZE : SHARD_HEADER_SIZE + header.payload_size] for f in frames
            )
            raw_blocks.append(pieces)
    raw_datagrams = min(count, 2000)
    zenc = zfec_encoder(K, N)
    zdec = zfec_decoder(K, N)
    parity_numbers = tuple(range(K, N))

    def raw_encode() -> int:
        for pieces in raw_blocks:
            zenc.encode(pieces[:K], parity_numbers)
        return raw_datagrams

    missing_one = (1, 2, 3)

    def raw_decode() -> int:
        for pieces in raw_blocks:
            zdec.decode(tuple(pieces[i] for i in missing_one), missing_one)
        return raw_datagrams

    def receiver(order: Sequence[int]) -> Callable[[], int]:
        streams = [[frames[i] for frames in blocks for i in order] for blocks in encoded]

        def run() -> int:
            decoder = ShardDecoder(1, K, N)
            receive = decoder.receive
            delivered = 0
            for frames in streams:
                for frame in frames:
                    delivered += len(receive(frame, 0.0))
            assert delivered == count, (delivered, count)
            return count

        return run

    return {
        "raw_encode": median_us(raw_encode, repeat),
        "sender": median_us(sender, repeat),
        "raw_decode": median_us(raw_decode, repeat),
        # All n shards, data first: rebuilt without a decode call, 2 duplicates dropped.
        "receiver_all": median_us(receiver(range(N)), repeat),
        # Shard 0 lost: decode from 1, 2, 3; shard 4 dropped as a duplicate.
        "receiver_lost": median_us(receiver((1, 2, 3, 4)), repeat),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--count", type=int, default=20000)
    args = parser.parse_args()
    print(f"k={K} n={N} mtu={MTU}; µs per datagram, median of {args.repeat} runs")
    header = (
        f"{'size':>6} | {'zfec enc':>8} {'sender':>7} {'ratio':>5} | "
        f"{'zfec dec':>8} {'rx all n':>8} {'rx lost1':>8} {'ratio':>5}"
    )
    print(header)
    print("-" * len(header))
    for size in SIZES:
        count = args.count if size <= 1400 else max(args.count // 4, 1)
        r = bench_size(size, count, args.repeat)
        sender_ratio = (r["sender"] - r["raw_encode"]) / r["raw_encode"]
        receiver_ratio = (r["receiver_lost"] - r["raw_decode"]) / r["raw_decode"]
        print(
            f"{size:>6} | {r['raw_encode']:>8.2f} {r['sender']:>7.2f} {sender_ratio:>5.2f} | "
            f"{r['raw_decode']:>8.2f} {r['receiver_all']:>8.2f} {r['receiver_lost']:>8.2f} "
            f"{receiver_ratio:>5.2f}"
        )
    print(
        "ratio = (path - zfec) / zfec: the Python overhead around zfec, in units of zfec's "
        "own cost (target <= 2 at 1400 B)"
    )


if __name__ == "__main__":
    main()
