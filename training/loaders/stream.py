"""The seeded order in which a run visits the samples of its shards, as a pure function of (seed, position).

Epoch e visits the shards in an order drawn from (seed, e), and with a shuffle buffer draws each next
sample at random from a buffer of that many (webdataset's shuffle, seeded the same way; flushed at the
end of each epoch, so an epoch still holds every sample once). The buffer's choices depend only on how
many samples it has seen, never on their bytes, so the whole epoch's order is computed from the shard
sizes in the manifest before a byte is read: a resumed run starts at any position by skipping whole
shards unread, and only the shard it resumes in (plus what the buffer spans) is read again.
"""
from __future__ import annotations

from typing import Any, Iterator

import fsspec
import numpy as np
from webdataset.tariterators import group_by_keys, tar_file_expander


def iter_shard(url: str) -> Iterator[dict[str, Any]]:
    """The samples of one webdataset tar (any fsspec URL), as {"__key__", "__url__", ext: bytes}."""
    with fsspec.open(url, "rb") as fh:
        yield from group_by_keys(tar_file_expander([{"url": url, "stream": fh}]))


def sample_seed(seed: int, stream: int, position: int) -> int:
    """A 63-bit seed per sample, independent of which worker holds it."""
    return int(np.random.SeedSequence([seed, stream, position]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def buffered_order(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """The order (read indices) in which a shuffle buffer of `size` emits n samples read in sequence:
    once full, each new sample takes the place of a random one, which leaves; the rest leave shuffled."""
    if size <= 1 or n <= 1:
        return np.arange(n)
    size = min(size, n)
    buffer, out = np.arange(size), np.empty(n, dtype=np.int64)
    for k, j in enumerate(rng.integers(size, size=n - size)):  # sequential by nature: each swap sees the last
        out[k] = buffer[j]
        buffer[j] = size + k
    rng.shuffle(buffer)
    out[n - size:] = buffer
    return out


def epoch_plan(sizes: list[int], seed: int, epoch: int, shuffle_buffer: int) -> tuple[np.ndarray, np.ndarray]:
    """(shard order, emit order): the epoch reads shards[order] in turn; its k-th sample is the
    emit[k]-th one read."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(sizes))
    return order, buffered_order(int(sum(sizes[i] for i in order)), shuffle_buffer, rng)


def epoch_samples(urls: list[str], sizes: list[int], seed: int, epoch: int, shuffle_buffer: int,
                  skip: int = 0) -> Iterator[dict[str, Any]]:
    """The epoch's samples from its `skip`-th on. Shards whose samples all come before it are not opened;
    a sample read ahead of its turn waits in memory (at most the buffer's size of them)."""
    order, emit = epoch_plan(sizes, seed, epoch, shuffle_buffer)
    if skip >= len(emit):
        return
    rank = np.empty_like(emit)
    rank[emit] = np.arange(len(emit))  # read index -> emit position
    first_needed = int(emit[skip:].min())
    held: dict[int, dict[str, Any]] = {}
    nxt, read = skip, 0
    for i in order:
        url, n = urls[i], sizes[i]
        if read + n <= first_needed:
            read += n
            continue
        count = 0
        for sample in iter_shard(url):
            if count >= n:
                raise ValueError(f"{url} holds more samples than the manifest's {n}")
            if rank[read + count] >= skip:
                held[read + count] = sample
            count += 1
            while nxt < len(emit) and int(emit[nxt]) in held:
                yield held.pop(int(emit[nxt]))
                nxt += 1
        if count != n:
            raise ValueError(f"{url} holds {count} samples, the manifest says {n}")
        read += n


def count_samples(urls: list[str]) -> list[int]:
    """Samples per shard, by reading them (for a manifest that does not record them)."""
    return [sum(1 for _ in iter_shard(u)) for u in urls]


def sample_stream(urls: list[str], seed: int, shuffle_buffer: int = 0, sizes: list[int] | None = None,
                  start: int = 0) -> Iterator[tuple[int, dict[str, Any]]]:
    """(position, sample) forever from position `start`, epoch after epoch (see the module docstring).
    Without a shuffle buffer consecutive samples of a shard always share a batch: a contrastive loss then
    sees the same negatives every epoch."""
    sizes = count_samples(urls) if sizes is None else list(sizes)
    total = sum(sizes)
    if total == 0:
        raise ValueError(f"the shards hold no samples: {urls[:3]}")
    epoch, offset = divmod(start, total)
    position = start
    while True:
        for sample in epoch_samples(urls, sizes, seed, epoch, shuffle_buffer, skip=offset):
            yield position, sample
            position += 1
        epoch, offset = epoch + 1, 0
