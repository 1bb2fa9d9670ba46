"""A request's generated LoRA as a zip archive (``POST /v1/lora``), built in memory.

An image is edited tile by tile and every tile gets its own generated LoRA, so the archive holds
one adapter per tile, row-major over the tile grid (tile (row, col) covers the image at the training
scale from (row * stride, col * stride), ``tile_size`` px a side; tiles overlap when stride < tile_size,
see ``funcmem.editing.apply``):

    manifest.json                     {"format": "peft", "grid": [rows, cols], "tile_size", "stride",
                                       "instruction", "tiles": [{"dir", "row", "col"}], "scale", "rank",
                                       "targets"}
    tile_000/adapter_config.json      a PEFT LoRA adapter (``funcmem.peft_io.adapter_weights``)
    tile_000/adapter_model.safetensors
    ...

Bounded: the tiles are at most the service's ``max_tiles``; nothing is written to disk (a killed
server leaves no temporary files); and the build stops with ``TimeoutError`` between two tiles
once the request's deadline has passed.
"""

from __future__ import annotations

import io
import json
import math
import time
import zipfile

from safetensors.torch import save

from ..lora import LoRA
from ..peft_io import CONFIG_NAME, PREFIX, WEIGHTS_NAME, adapter_config, adapter_weights


def lora_archive(fm, lora: LoRA, grid: tuple[int, int], tile_size: int, instruction: str,
                 deadline: float = math.inf, stride: int | None = None) -> bytes:
    """The zip archive's bytes for ``lora`` (one row per tile of a ``grid`` = (rows, cols), one tile
    every ``stride`` px: default ``tile_size``, tiles side by side).

    Raises:
        TimeoutError: ``time.monotonic()`` passed ``deadline`` before the archive was complete.
    """
    rows, cols = grid
    tiles = [{"dir": f"tile_{i:03d}", "row": i // cols, "col": i % cols} for i in range(lora.batch_size)]
    manifest = {"format": "peft", "grid": [rows, cols], "tile_size": tile_size,
                "stride": tile_size if stride is None else stride, "instruction": instruction,
                "tiles": tiles, "scale": lora.scale, "rank": fm.rank, "targets": sorted(lora.factors)}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("manifest.json", json.dumps(manifest, indent=2))
        for i, tile in enumerate(tiles):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the archive was not complete by the deadline ({i} of {len(tiles)} tiles)")
            adapter = adapter_weights(fm, lora, i)
            state = {PREFIX + k: v.detach().contiguous().cpu() for k, v in adapter.state.items()}
            archive.writestr(f"{tile['dir']}/{WEIGHTS_NAME}", save(state, metadata={"format": "pt"}))
            archive.writestr(f"{tile['dir']}/{CONFIG_NAME}", json.dumps(adapter_config(adapter), indent=2))
    return buffer.getvalue()
