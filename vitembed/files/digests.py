"""`DigestSet`: a set of millions of strings (output paths, a table's keys) in little memory."""

from __future__ import annotations

import hashlib

import numpy as np

__all__ = ["DigestSet", "digest"]


class DigestSet:
    """A set of strings held as 8-byte digests in an open-addressing table (8 to 16 bytes a string,
    against about 130 for a set of the strings): memory that a run of millions of inputs can
    afford. Two different strings share a digest with odds of about n / 2^64; each user says what
    such a false "seen before" would cost it (an output path: a longer name for the second,
    `pet.png.npy`, never an overwrite).
    """

    def __init__(self, capacity: int = 1024):
        self.table = np.zeros(capacity, np.uint64)  # 0: empty
        self.count = 0

    def add(self, key: str) -> bool:
        """Add `key`; False if it was there already."""
        if 2 * (self.count + 1) > len(self.table):
            self._grow()
        return self._insert(digest(key))

    def __contains__(self, key: str) -> bool:
        return bool(self.table[self._slot(digest(key))])

    def _slot(self, value: np.uint64) -> int:
        """The slot that holds the digest `value`, or the empty one where it would go."""
        mask = len(self.table) - 1
        slot = int(value) & mask
        while self.table[slot] and self.table[slot] != value:
            slot = (slot + 1) & mask
        return slot

    def _insert(self, value: np.uint64) -> bool:
        slot = self._slot(value)
        if self.table[slot]:
            return False
        self.table[slot] = value
        self.count += 1
        return True

    def _grow(self) -> None:
        old = self.table[self.table != 0]
        self.table = np.zeros(2 * len(self.table), np.uint64)
        self.count = 0
        for value in old:
            self._insert(value)


def digest(key: str) -> np.uint64:
    """A string's 8-byte blake2b digest (never 0: 0 marks an empty slot)."""
    value = int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "little")
    return np.uint64(value or 1)
