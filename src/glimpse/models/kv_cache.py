"""Past keys and values kept between a conversation's turns, for the ``hf`` backend.

Each turn of an agent loop resends the whole conversation: the previous prompt, the model's reply and what the
harness added. The backend keeps, per conversation, the key/value tensors of the tokens it already ran, so a turn
computes only the tokens the harness added and the tokens it samples.

* **Matching** is by token ids and by the images those ids hold (two images of one size have the same ids): a
  request reuses the longest prefix it shares with a kept entry, cut back to the start of the first image that
  differs and never inside an image (an image's features are computed whole). A client that edits history gets
  the longest common prefix, or nothing.
* **Memory** is bounded by bytes and by entries: a least-recently-used order over entries. When a turn extends an
  entry, the entry it extended is dropped, so a conversation holds one entry, its latest turn; a finished
  conversation's entry is never asked for again and ages out. The entry bound keeps those from piling up to the
  byte budget: a 500-probe evaluation would otherwise keep the key/values of every conversation it finished.
* The cache knows nothing of weights: the backend clears it when the model changes (RL updates it in place).
"""

from __future__ import annotations

import hashlib
import threading
import weakref
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class Entry:
    """Key/value tensors of a token prefix.

    Attributes:
        ids: the prefix's token ids.
        images: digests of the images among those ids, in order.
        layers: per decoder layer, keys and values of shape ``(1, heads, len(ids), head_dim)``.
        nbytes: memory the tensors hold.
        state: the model's own state of the row after these ids, if it keeps one on its cache (the built-in
            model's pointer); it offers ``after(ids, images)`` for a shorter prefix and ``nbytes``.
    """

    ids: np.ndarray
    images: tuple[bytes, ...]
    layers: list[tuple[Any, Any]]
    nbytes: int
    state: Any = None


def image_starts(ids: np.ndarray, image_token_id: int) -> np.ndarray:
    """Index of the first token of each run of image tokens (one run per image)."""
    is_image = ids == image_token_id
    return np.flatnonzero(is_image & ~np.concatenate(([False], is_image[:-1])))


class KVCache:
    """Entries of past key/values, least recently used first, within ``max_bytes``.

    Args:
        max_bytes: most bytes of tensors kept.
        image_token_id: the id that stands for one image token (runs of it are images).
        max_entries: most entries kept (``None``: bytes alone bound them).
    """

    def __init__(self, max_bytes: int, image_token_id: int, max_entries: int | None = None):
        self.max_bytes, self.image_token_id, self.max_entries = max_bytes, image_token_id, max_entries
        self.entries: OrderedDict[int, Entry] = OrderedDict()
        self.nbytes = 0
        self.stats: Counter[str] = Counter()  # requests, hits, reused_tokens, computed_tokens, evicted
        self._next = 0

    def clear(self) -> None:
        self.entries.clear()
        self.nbytes = 0

    def match(self, ids: list[int], images: list[bytes], limit: int) -> tuple[Entry | None, int]:
        """The entry sharing the longest usable prefix with ``ids`` (at most ``limit`` tokens), and its length.

        The prefix ends before the first token that differs and before the first image whose digest differs,
        and never inside an image.
        """
        request = np.asarray(ids, dtype=np.int64)
        starts = image_starts(request, self.image_token_id)
        if len(starts) != len(images):  # images not separated by text: no way to tell them apart by ids
            return None, 0
        best, best_len = None, 0
        for key, entry in self.entries.items():
            m = min(len(entry.ids), limit)
            if m <= best_len:
                continue
            diff = np.flatnonzero(entry.ids[:m] != request[:m])
            n = int(diff[0]) if len(diff) else m
            for j, start in enumerate(starts):
                if start >= n:
                    break
                if j >= len(entry.images) or entry.images[j] != images[j]:
                    n = int(start)
                    break
            if 0 < n < len(request) and request[n] == self.image_token_id and request[n - 1] == self.image_token_id:
                n = int(starts[np.searchsorted(starts, n, side="right") - 1])  # back to the image's first token
            if n > best_len:
                best, best_len = key, n
        if best is None:
            return None, 0
        self.entries.move_to_end(best)
        return self.entries[best], best_len

    def put(self, ids: list[int], images: list[bytes], layers: list[tuple[Any, Any]], state: Any = None) -> None:
        """Keep a prefix's key/values (and the model's state of it); drop the entries it extends, then the least
        recently used beyond the budget."""
        nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)
        nbytes += state.nbytes if state is not None else 0
        if nbytes > self.max_bytes:
            return
        new = np.asarray(ids, dtype=np.int64)
        shown = tuple(images)
        for key, entry in list(self.entries.items()):
            n = len(entry.ids)
            if n <= len(new) and entry.images == shown[: len(entry.images)] and np.array_equal(entry.ids, new[:n]):
                self._drop(key)
        self.entries[self._next] = Entry(new, shown, layers, nbytes, state)
        self._next += 1
        self.nbytes += nbytes
        while self.nbytes > self.max_bytes or (self.max_entries is not None and len(self.entries) > self.max_entries):
            self._drop(next(iter(self.entries)))
            self.stats["evicted"] += 1

    def _drop(self, key: int) -> None:
        self.nbytes -= self.entries.pop(key).nbytes


class ImageDigests:
    """Content digests of PIL images, computed once per image object (the loop resends the same objects)."""

    def __init__(self) -> None:
        self._known: dict[int, tuple[weakref.ref[Any], bytes]] = {}
        self._lock = threading.Lock()

    def __call__(self, image: Any) -> bytes:
        key = id(image)
        with self._lock:
            known = self._known.get(key)
            if known is not None and known[0]() is image:
                return known[1]
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{image.mode}:{image.size}".encode())
        h.update(image.tobytes())
        digest = h.digest()
        with self._lock:
            self._known[key] = (weakref.ref(image, lambda _, k=key: self._forget(k)), digest)
        return digest

    def _forget(self, key: int) -> None:
        with self._lock:
            self._known.pop(key, None)
