"""Synthetic batches for benchmarking the train step without data (`data.target: synthetic`).

    data: {"target": "synthetic", "params": {"batch_size": 32, "image_shape": [1024, 1024, 3],
           "keys": ["txt", "original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple"],
           "n_classes": 1000}}

Images are uniform noise in [-1, 1]; "cls" uniform class ids; "txt" short captions from a
fixed word list; size keys the image size, crop (0, 0). Batches are a function of the step
(exact resume, as the in-memory sets), so a benchmark measures the model, not the input.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from sgm_jax.data.base import DataSource, StepIterator

WORDS = ("a", "photo", "of", "red", "cat", "mountain", "city", "river", "painting", "dog", "at", "night")


class SyntheticDataset:
    def __init__(self, batch_size: int, image_shape: Sequence[int], keys: Sequence[str] = ("cls",),
                 n_classes: int = 1000, process_index: int | None = None, process_count: int | None = None,
                 **_: Any):
        import jax

        self.batch_size = int(batch_size)
        self.image_shape = tuple(int(s) for s in image_shape)
        self.keys, self.n_classes = tuple(keys), int(n_classes)
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        self.source = DataSource("synthetic", "generated", "x".join(map(str, self.image_shape)))

    def steps_per_epoch(self, batch_size: int) -> None:
        return None

    def batch_at(self, step: int, batch_size: int, seed: int = 0, shuffle: bool = True) -> dict[str, Any]:
        n = batch_size // self.process_count
        rng = np.random.default_rng([seed, step, self.process_index])
        batch: dict[str, Any] = {"jpg": rng.uniform(-1, 1, (n,) + self.image_shape).astype(np.float32)}
        size = np.broadcast_to(np.asarray(self.image_shape[:2], np.int32), (n, 2)).copy()
        for key in self.keys:
            if key == "cls":
                batch["cls"] = rng.integers(0, self.n_classes, (n,)).astype(np.int32)
            elif key == "txt":
                batch["txt"] = np.asarray([" ".join(rng.choice(WORDS, 6)) for _ in range(n)], dtype=object)
            elif key == "crop_coords_top_left":
                batch[key] = np.zeros((n, 2), np.int32)
            else:
                batch[key] = size
        return batch

    def example_batch(self, n: int) -> dict[str, Any]:
        return self.batch_at(0, n * self.process_count)

    def iterator(self, batch_size: int, seed: int = 0, start_step: int = 0) -> StepIterator:
        return StepIterator(self, batch_size, seed, start_step)
