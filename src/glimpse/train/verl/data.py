"""Glimpse samples as verl RL parquet rows (``glimpse train verl-data``).

A row is what verl's ``RLHFDataset`` reads and ``GlimpseAgentLoop`` needs:

* ``prompt``: one user message, the question as text. verl logs it and filters prompts by its length; the
  agent loop builds the real prompt itself (system prompt, the images at the loop's pixel limits, the
  question). The images are deliberately not a verl image column: verl would decode them into every
  trajectory's record (a 9-megapixel probe is 27 MB of pixels there, times the group size) and count them at
  full size when it filters long prompts. verl refuses a first prompt longer than ``rollout.prompt_length``.
* ``extra_info.glimpse_images``: the original files' bytes, one entry per image of the sample, in order (no
  resize, no re-encoding), so every node of a Ray cluster has the images without a shared file system; the
  zoom tool crops from these pixels. With ``image_paths=True`` (``--image-paths``) rows carry the images'
  absolute paths instead, for clusters that share a file system: much smaller batches.
* ``extra_info.glimpse_sample``: the sample as JSON (options, target boxes, meta), which the loop and the
  reward function read; ``reward_model.ground_truth`` the gold answer; ``data_source`` ``glimpse/<dataset>``.

The rows carry no ``agent_name``: the run picks the loop with ``rollout.agent.default_agent_loop`` (so the
same file serves the masked and the unmasked arm).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from glimpse.errors import ConfigError
from glimpse.trajectory import Sample

# Rows per parquet row group: images are inline, so a group stays within tens of megabytes.
ROWS_PER_GROUP = 64


def schema(pa: Any) -> Any:
    """The parquet schema of the rows."""
    return pa.schema(
        [
            ("data_source", pa.string()),
            ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
            ("ability", pa.string()),
            ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
            (
                "extra_info",
                pa.struct(
                    [
                        ("index", pa.int64()),
                        ("glimpse_sample", pa.string()),
                        ("glimpse_images", pa.list_(pa.binary())),
                    ]
                ),
            ),
        ]
    )


def row(sample: Sample, index: int, source: str, image_paths: bool = False) -> dict[str, Any]:
    """One parquet row for a sample (one image or several).

    Raises:
        ConfigError: the sample has no image, one of its images cannot be read, or it has no gold answer to
            reward.
    """
    if not sample.images:
        raise ConfigError(f"sample {sample.id!r} has no image")
    if sample.answer is None:
        raise ConfigError(f"sample {sample.id!r} has no gold answer, so it cannot be rewarded")
    paths = [Path(image) for image in sample.images]
    data: list[bytes] | None = None if image_paths else []
    for path in paths:
        if image_paths and not path.is_file():
            raise ConfigError(f"sample {sample.id!r}: cannot read {path} (no such file)")
        try:
            if data is not None:
                data.append(path.read_bytes())
        except OSError as exc:
            raise ConfigError(f"sample {sample.id!r}: cannot read {path} ({exc.strerror or exc})") from None
    stored = sample.model_copy(update={"images": [str(p.resolve()) for p in paths]}) if image_paths else sample
    return {
        "data_source": f"glimpse/{source}",
        "prompt": [{"role": "user", "content": sample.question}],
        "ability": "visual_search",
        "reward_model": {"style": "rule", "ground_truth": sample.answer},
        "extra_info": {
            "index": index,
            "glimpse_sample": stored.model_dump_json(exclude_none=True),
            "glimpse_images": data,
        },
    }


def write(samples: Iterable[Sample], out: str | os.PathLike[str], source: str, image_paths: bool = False) -> int:
    """Write the rows to a parquet file (atomically); returns how many.

    Raises:
        ConfigError: pyarrow is missing, a sample cannot be converted, or there are no samples.
    """
    from glimpse.train.export import require_pyarrow

    pa, pq = require_pyarrow()
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    table_schema = schema(pa)
    count = 0
    batch: list[dict[str, Any]] = []
    try:
        with pq.ParquetWriter(tmp, table_schema) as writer:
            for sample in samples:
                batch.append(row(sample, count, source, image_paths))
                count += 1
                if len(batch) >= ROWS_PER_GROUP:
                    writer.write_table(pa.Table.from_pylist(batch, schema=table_schema))
                    batch = []
            if batch:
                writer.write_table(pa.Table.from_pylist(batch, schema=table_schema))
        if not count:
            raise ConfigError("no samples to write")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return count
