"""Glimpse samples as verl RL parquet rows (``glimpse train verl-data``).

A row is what verl's ``RLHFDataset`` reads and ``GlimpseAgentLoop`` needs:

* ``prompt``: one user message, ``<image>`` and the question. verl uses it to filter over-long prompts and to
  log; the agent loop builds the real prompt itself, with the protocol's system prompt and the image shown at
  the loop's pixel limits.
* ``images``: the original file's bytes (no resize, no re-encoding), so every node of a Ray cluster has the
  image without a shared file system; the zoom tool crops from these pixels. Beside them ``min_pixels`` and
  ``max_pixels``, which verl's prompt-length filter resizes by: set them to the agent loop's limits (the
  defaults are both's, Mini-o3's 40,000 and 2,000,000), or the filter counts a 4K image at its full size and
  drops every row.
* ``reward_model.ground_truth``: the gold answer; ``data_source``: ``glimpse/<dataset>``.
* ``extra_info``: ``index`` and ``glimpse_sample`` (the sample as JSON: options, target boxes, meta), which
  the agent loop and the reward function read.

The rows carry no ``agent_name``: the run picks the loop with ``rollout.agent.default_agent_loop`` (so the
same file serves the masked and the unmasked arm).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from glimpse.errors import ConfigError
from glimpse.images import MAX_PIXELS, MIN_PIXELS
from glimpse.trajectory import Sample

# Rows per parquet row group: images are inline, so a group stays within tens of megabytes.
ROWS_PER_GROUP = 64


def schema(pa: Any) -> Any:
    """The parquet schema of the rows."""
    return pa.schema(
        [
            ("data_source", pa.string()),
            ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
            (
                "images",
                pa.list_(pa.struct([("bytes", pa.binary()), ("min_pixels", pa.int64()), ("max_pixels", pa.int64())])),
            ),
            ("ability", pa.string()),
            ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
            ("extra_info", pa.struct([("index", pa.int64()), ("glimpse_sample", pa.string())])),
        ]
    )


def row(
    sample: Sample, index: int, source: str, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS
) -> dict[str, Any]:
    """One parquet row for a sample.

    Raises:
        ConfigError: the sample has no single readable image, or no gold answer to reward.
    """
    if len(sample.images) != 1:
        raise ConfigError(f"sample {sample.id!r} has {len(sample.images)} images; exactly one is supported")
    if sample.answer is None:
        raise ConfigError(f"sample {sample.id!r} has no gold answer, so it cannot be rewarded")
    try:
        data = Path(sample.images[0]).read_bytes()
    except OSError as exc:
        raise ConfigError(f"sample {sample.id!r}: cannot read {sample.images[0]} ({exc.strerror or exc})") from None
    question = sample.question.replace("<image>", "< image>")  # verl splits prompts on "<image>"
    return {
        "data_source": f"glimpse/{source}",
        "prompt": [{"role": "user", "content": f"<image>\n{question}"}],
        "images": [{"bytes": data, "min_pixels": min_pixels, "max_pixels": max_pixels}],
        "ability": "visual_search",
        "reward_model": {"style": "rule", "ground_truth": sample.answer},
        "extra_info": {"index": index, "glimpse_sample": sample.model_dump_json(exclude_none=True)},
    }


def write(
    samples: Iterable[Sample],
    out: str | os.PathLike[str],
    source: str,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
) -> int:
    """Write the rows to a parquet file (atomically); returns how many.

    Raises:
        ConfigError: pyarrow is missing, a sample cannot be converted, or there are no samples.
    """
    from glimpse.train.export import require_pyarrow

    if not 0 < min_pixels <= max_pixels:
        raise ConfigError(f"pixel limits must satisfy 0 < min_pixels <= max_pixels, got {min_pixels}, {max_pixels}")
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
                batch.append(row(sample, count, source, min_pixels, max_pixels))
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
