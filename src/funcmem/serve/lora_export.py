"""A request's generated LoRA as a zip archive (``POST /v1/lora``).

An image is edited tile by tile and every tile gets its own generated LoRA, so the archive holds
one adapter per tile, row-major over the tile grid:

    manifest.json                     {"format", "grid": [rows, cols], "tile_size", "instruction",
                                       "tiles": [{"dir", "row", "col"}], "scale", "rank", "targets"}
    tile_000/adapter_config.json      a PEFT LoRA adapter (``FunctionalMemory.export_peft``)
    tile_000/adapter_model.safetensors
    ...

When ``funcmem.peft_io`` is not available, each tile directory holds ``lora.safetensors``
(``{target}.lora_A`` (r, in) / ``{target}.lora_B`` (out, r)) and ``lora_config.json`` instead,
and the manifest's ``format`` says ``"funcmem-safetensors"``.
"""

from __future__ import annotations

import importlib.util
import io
import json
import tempfile
import zipfile
from pathlib import Path

from ..io import write_safetensors
from ..lora import LoRA


def peft_available() -> bool:
    return importlib.util.find_spec("funcmem.peft_io") is not None


def _write_plain(lora: LoRA, index: int, path: Path, rank: int) -> None:
    row = lora[index]
    path.mkdir(parents=True, exist_ok=True)
    write_safetensors(path / "lora.safetensors", {k: v[0].contiguous() for k, v in row.state_dict().items()})
    (path / "lora_config.json").write_text(json.dumps({"r": rank, "scale": row.scale,
                                                       "target_modules": sorted(row.factors)}, indent=2))


def lora_archive(fm, lora: LoRA, grid: tuple[int, int], tile_size: int, instruction: str) -> bytes:
    """The zip archive's bytes for ``lora`` (one row per tile of a ``grid`` = (rows, cols))."""
    use_peft = peft_available()
    rows, cols = grid
    tiles = [{"dir": f"tile_{i:03d}", "row": i // cols, "col": i % cols} for i in range(lora.batch_size)]
    manifest = {"format": "peft" if use_peft else "funcmem-safetensors", "grid": [rows, cols],
                "tile_size": tile_size, "instruction": instruction, "tiles": tiles, "scale": lora.scale,
                "rank": fm.rank, "targets": sorted(lora.factors)}
    buffer = io.BytesIO()
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("manifest.json", json.dumps(manifest, indent=2))
        for i, tile in enumerate(tiles):
            out = Path(tmp) / tile["dir"]
            if use_peft:
                fm.export_peft(lora, i, out)
            else:
                _write_plain(lora, i, out, fm.rank)
            for file in sorted(out.iterdir()):
                archive.write(file, f"{tile['dir']}/{file.name}")
    return buffer.getvalue()
