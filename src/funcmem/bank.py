"""Static LoRAs on a frozen base: ``LoRABank`` (K LoRAs, one per task, routed by index) and
``SharedLoRA`` (a bank of one, the usual baseline). Both mount through ``memory.Mountable`` like
``FunctionalMemory`` does, save as ``config.json`` + ``model.safetensors``, export to PEFT and
diffusers.

    index (B,) --bank.lora(index)--> LoRA (batch B) --mounted--> base(x) with B_k (A_k x) per sample
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

from .config_checks import check_fits
from .diffusers_io import export_diffusers
from .io import read_safetensors
from .lora import LoRA
from .memory import CONFIG_NAME, WEIGHTS_NAME, Mountable, check_targets, factor_shapes, read_config
from .peft_io import export_peft, read_peft
from .targets import Patterns


class LoRABank(Mountable):
    """K static LoRAs on the same targets, one per task: sample i uses LoRA ``index[i]``.

    The bank a generator is compared with (each task told its own adapter), and the shape of
    ``SharedLoRA`` (K = 1). Factors are stored as PEFT names them, with the bank's K first:
    ``lora_A`` (K, *A shape), Kaiming-uniform per matrix, and ``lora_B`` (K, *B shape), zeros, in
    ``nn.ParameterDict``s keyed by target name (dots as ``__``).

    Args:
        base, targets, rank, alpha, exclude: as ``FunctionalMemory``.
        num: K, the number of LoRAs.

    Shape:
        ``lora(index)``: index (B,) integer task ids -> a ``LoRA`` of K factor rows with that index.
    """

    def __init__(self, base: nn.Module, targets: Patterns, rank: int = 8, alpha: float | None = None,
                 num: int = 1, exclude: Patterns | None = None):
        super().__init__(base, targets, rank, alpha, exclude)
        if num < 1:
            raise ValueError(f"num (LoRAs in the bank) must be >= 1, got {num}")
        self.num = num
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        for t in self.targets:
            a = torch.empty(num, *t.a_shape(rank))
            for matrix in a.view(-1, *a.shape[-2:]):
                nn.init.kaiming_uniform_(matrix, a=math.sqrt(5))
            self.lora_A[_key(t.name)] = nn.Parameter(a)
            self.lora_B[_key(t.name)] = nn.Parameter(torch.zeros(num, *t.b_shape(rank)))

    def lora(self, index: Tensor | None = None) -> LoRA:
        """All K LoRAs as factor rows; with ``index`` (B,), sample i uses row ``index[i]`` (rows are
        shared, not copied, so the mounting code can apply each once per group of samples)."""
        return LoRA({t.name: (self.lora_A[_key(t.name)], self.lora_B[_key(t.name)]) for t in self.targets},
                    self.scale, index)

    def forward(self, index: Tensor, *args, **kwargs):
        """``base(*args, **kwargs)`` with sample i's LoRA ``index[i]`` mounted."""
        with self.mounted(self.lora(index)):
            return self.base(*args, **kwargs)

    def config(self) -> dict:
        return {"funcmem_type": "LoRABank", **self._target_config(), "num": self.num}

    def save_pretrained(self, path) -> None:
        """Write ``config.json`` and ``model.safetensors`` (``{target}.lora_A`` (K, ...), ``.lora_B``)."""
        self._save(path, self.config(), self.lora().state_dict())

    def _load_factors(self, path) -> None:
        lora = LoRA.from_state_dict(read_safetensors(Path(path) / WEIGHTS_NAME), self.scale)
        wrong = [f"{name}: {tuple(a.shape)} / {tuple(b.shape)} in the file, "
                 f"{tuple(self.lora_A[_key(name)].shape)} / {tuple(self.lora_B[_key(name)].shape)} expected"
                 for name, (a, b) in lora.factors.items()
                 if name in {t.name for t in self.targets}
                 and (a.shape != self.lora_A[_key(name)].shape or b.shape != self.lora_B[_key(name)].shape)]
        missing = sorted({t.name for t in self.targets} - set(lora.factors))
        if wrong or missing:
            raise ValueError(f"{Path(path) / WEIGHTS_NAME} does not fit its {CONFIG_NAME}: "
                             + "; ".join(wrong[:3] + ([f"no factors for {missing[:5]}"] if missing else [])))
        with torch.no_grad():
            for name, (a, b) in lora.factors.items():
                self.lora_A[_key(name)].copy_(a)
                self.lora_B[_key(name)].copy_(b)

    @classmethod
    def from_pretrained(cls, path, base: nn.Module) -> "LoRABank":
        """Rebuild on ``base``; a base whose targets differ from the saved ones is refused."""
        config = read_config(path, "LoRABank")
        check_targets(base, config, path)
        check_fits(factor_shapes(config), Path(path) / WEIGHTS_NAME, CONFIG_NAME)  # before allocating
        bank = cls(base, config["targets"], config["rank"], config["alpha"], config["num"], config.get("exclude"))
        bank._load_factors(path)
        return bank

    def export_peft(self, index: int, path, base_model_name_or_path: str | None = None) -> None:
        """Write LoRA ``index`` of the bank as a PEFT adapter directory."""
        export_peft(self, self.lora(), index, path, base_model_name_or_path)

    def export_diffusers(self, index: int, path, prefix: str = "transformer") -> None:
        """Write LoRA ``index`` of the bank as a diffusers LoRA file (``funcmem.diffusers_io``)."""
        export_diffusers(self, self.lora(), index, path, prefix)


def _key(name: str) -> str:
    """A target name as a ``ParameterDict`` key (dots are not allowed there)."""
    return name.replace(".", "__")


class SharedLoRA(LoRABank):
    """One static LoRA on the same targets: the baseline every sample shares (a bank of one).

    ``lora_A`` / ``lora_B`` hold (1, *A shape) / (1, *B shape); ``lora()`` is a batch-1 LoRA that
    broadcasts over any input batch.
    """

    def __init__(self, base: nn.Module, targets: Patterns, rank: int = 8, alpha: float | None = None,
                 exclude: Patterns | None = None):
        super().__init__(base, targets, rank, alpha, 1, exclude)

    def lora(self) -> LoRA:
        """The shared factors as a batch-1 LoRA (broadcast over any input batch)."""
        return super().lora()

    def forward(self, *args, **kwargs):
        with self.mounted(self.lora()):
            return self.base(*args, **kwargs)

    def config(self) -> dict:
        return {"funcmem_type": "SharedLoRA", **self._target_config()}

    @classmethod
    def from_pretrained(cls, path, base: nn.Module) -> "SharedLoRA":
        config = read_config(path, "SharedLoRA")
        check_targets(base, config, path)
        check_fits(factor_shapes(config), Path(path) / WEIGHTS_NAME, CONFIG_NAME)  # before allocating
        shared = cls(base, config["targets"], config["rank"], config["alpha"], config.get("exclude"))
        shared._load_factors(path)
        return shared

    def export_peft(self, path, base_model_name_or_path: str | None = None) -> None:
        """Write the shared LoRA as a PEFT adapter directory that ``peft.PeftModel.from_pretrained`` loads."""
        export_peft(self, self.lora(), 0, path, base_model_name_or_path)

    def export_diffusers(self, path, prefix: str = "transformer") -> None:
        """Write the shared LoRA as a diffusers LoRA file (``funcmem.diffusers_io``)."""
        export_diffusers(self, self.lora(), 0, path, prefix)

    @classmethod
    def from_peft(cls, base: nn.Module, path) -> "SharedLoRA":
        """A SharedLoRA on ``base`` holding a PEFT LoRA adapter directory's factors (see ``funcmem.peft_io``)."""
        adapter = read_peft(path, base)
        shared = cls(base, adapter.targets, adapter.rank, adapter.alpha)
        with torch.no_grad():
            for name, (a, b) in adapter.factors.items():
                shared.lora_A[_key(name)][0].copy_(a)
                shared.lora_B[_key(name)][0].copy_(b)
        return shared
