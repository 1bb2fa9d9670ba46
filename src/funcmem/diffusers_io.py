"""LoRA out of funcmem in the file diffusers' loaders read.

One instance of a generated LoRA (or a ``SharedLoRA`` / one LoRA of a ``LoRABank``) leaves
funcmem as ``pytorch_lora_weights.safetensors``, the file a diffusers pipeline's
``load_lora_weights(dir)`` and a model's ``load_lora_adapter`` read::

    fm.export_diffusers(lora, i, "lora/")             # sample i of fm.generate(condition)
    pipe.load_lora_weights("lora/")                   # pipe.transformer == base under fm.mounted(lora[i])
    transformer.load_lora_adapter("lora/", prefix="transformer", use_safetensors=True)

(``load_lora_adapter`` looks for ``pytorch_lora_weights.bin`` unless told ``use_safetensors=True``
or ``weight_name``, for diffusers' own files too; checked with diffusers 0.42.1.)

Keys are PEFT's with the pipeline component's name in front, ``transformer.{module}.lora_A.weight``
/ ``.lora_B.weight`` (factor layouts as ``funcmem.peft_io``). The scale alpha / r is folded into
``lora_B`` and the file says ``lora_alpha == r``: that is the scale diffusers assumes when a file
carries no alpha (as do other readers of this format), and it is also written where diffusers 0.34+
reads a LoRA config, the safetensors metadata entry ``lora_adapter_metadata`` (JSON with
``transformer.r``, ``transformer.lora_alpha``, ``transformer.target_modules``, ...). So the update
``B A`` a reader computes is funcmem's ``scale * B A``. diffusers is not needed to write the file.
"""

from __future__ import annotations

import json
from pathlib import Path

from .io import write_safetensors
from .lora import LoRA
from .peft_io import adapter_weights

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY


def export_diffusers(mountable, lora: LoRA, index: int, path: str | Path, prefix: str = "transformer") -> None:
    """Write sample ``index`` of ``lora`` as a diffusers LoRA file in directory ``path``.

    Args:
        mountable: the ``FunctionalMemory``, ``SharedLoRA`` or ``LoRABank`` whose base is the
            pipeline component (an ``SD3Transformer2DModel``, a ``FluxTransformer2DModel``...).
        lora: per-sample factors (``fm.generate(condition)``; an index is honoured).
        index: which sample.
        path: the directory to write (``pytorch_lora_weights.safetensors``).
        prefix: the component's name in its pipeline: ``"transformer"`` (SD3, Flux) or ``"unet"``.

    Raises:
        IndexError / KeyError: as ``funcmem.peft_io.export_peft``.
        NotImplementedError: stacked expert weights (diffusers' loader reads no
            ``target_parameters``), Conv2d with dilation; named.
    """
    adapter = adapter_weights(mountable, lora, index)
    if adapter.parameters:
        raise NotImplementedError(f"stacked expert weights {adapter.parameters[:3]} cannot go to diffusers: its LoRA "
                                  "loader targets modules only; use export_peft")
    scale = adapter.alpha / adapter.rank
    state = {k: v * scale if k.endswith(".lora_B.weight") else v for k, v in adapter.state.items()}
    config = {"r": adapter.rank, "lora_alpha": adapter.rank, "target_modules": adapter.modules, "lora_dropout": 0.0,
              "bias": "none", "use_rslora": False, "use_dora": False, "init_lora_weights": True}
    metadata = {"format": "pt", METADATA_KEY: json.dumps({f"{prefix}.{k}": v for k, v in config.items()})}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_safetensors(path / WEIGHTS_NAME, {f"{prefix}.{k}": v for k, v in state.items()}, metadata)
