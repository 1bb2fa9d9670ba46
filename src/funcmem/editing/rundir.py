"""A run directory: one run's trained methods, saved so that ``funcmem eval``, ``funcmem edit``,
``funcmem serve`` and later runs reload them. Every part is a ``save_pretrained`` directory:

    RUN/
      config.json            the run's settings (a ``BenchmarkConfig`` as a dict; read: size, conditions)
      editor/                Editor.save_pretrained          config.json, model.safetensors
      functional_memory/     EditingMemory.save_pretrained   config.json, model.safetensors (the
                                                             generator), projector.json, projector.safetensors
      shared_lora/           Shared.save_pretrained          (optional)
      shared_lora_matched/   Shared.save_pretrained          (optional)
      per_task_lora/         Bank.save_pretrained            (optional; + keys.safetensors)

``funcmem demo`` writes all of them, ``funcmem continual`` the editor and its generator. The
generator loads through ``FunctionalMemory.from_pretrained``, so an editor whose targets differ
from the saved ones is refused; a directory missing a file names it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..io import read_json, write_json
from .conditions import ConditionEncoder, TextEncoder, make_encoder
from .editor import Editor
from .methods import Bank, Base, EditingMemory, Shared
from .pretrain import NEUTRAL

CONFIG_NAME, EDITOR, MEMORY = "config.json", "editor", "functional_memory"
OPTIONAL = {"shared_lora": Shared, "shared_lora_matched": Shared, "per_task_lora": Bank}
REQUIRED_FILES = (CONFIG_NAME, f"{EDITOR}/config.json", f"{EDITOR}/model.safetensors", f"{MEMORY}/config.json",
                  f"{MEMORY}/model.safetensors", f"{MEMORY}/projector.json", f"{MEMORY}/projector.safetensors")


@dataclass
class Run:
    """A loaded run: its settings, frozen editor, methods (``"base"``, ``"functional_memory"`` and
    whichever optional ones were saved), and the condition encoders the generator was trained with."""

    path: Path
    config: dict
    editor: Editor
    methods: dict[str, nn.Module]
    encoder: ConditionEncoder
    text_encoder: TextEncoder

    @property
    def size(self) -> int:
        """The side of the editor's tiles (the training crops)."""
        return self.config["size"]

    @property
    def condition(self) -> str:
        """The generator's condition: ``"encoders"`` or ``"base-hidden"``."""
        return self.config["conditions"][0]

    @property
    def base_text(self) -> str | None:
        """What the frozen base reads instead of each instruction (a ``--base-instruction neutral`` run), or None."""
        return NEUTRAL if self.config.get("base_instruction") == "neutral" else None

    @property
    def memory(self) -> EditingMemory:
        return self.methods[MEMORY]


def save_run(out: str | Path, config: dict, editor: Editor, methods: dict[str, nn.Module]) -> None:
    """Write a run: ``methods`` maps ``"functional_memory"`` (required) and optional names to methods."""
    out = Path(out)
    unknown = sorted(set(methods) - {MEMORY, *OPTIONAL})
    if MEMORY not in methods or unknown:
        raise ValueError(f"a run saves {MEMORY!r} and optionally {list(OPTIONAL)}; got {sorted(methods)}")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / CONFIG_NAME, config)
    editor.save_pretrained(out / EDITOR)
    for name, method in methods.items():
        method.save_pretrained(out / name)


def weight_files(run: str | Path) -> list[Path]:
    """The files whose bytes identify a run's edits: the editor's, the generator's and the projector's."""
    run = Path(run)
    return [run / EDITOR / "model.safetensors", run / MEMORY / "model.safetensors", run / MEMORY / "projector.safetensors"]


def check_run(run: str | Path) -> Path:
    """``run`` as a Path, or FileNotFoundError naming the first file it lacks."""
    run = Path(run)
    if not (run / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{run} is not a run directory (no {CONFIG_NAME}); run `funcmem demo` first")
    missing = [f for f in REQUIRED_FILES if not (run / f).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"{run} has no {missing[0]}{more}: it was written by an older funcmem or is "
                                "incomplete; run `funcmem demo` again")
    return run


def load_run(run: str | Path, device: str = "cpu") -> Run:
    """Rebuild a run's editor, methods and condition encoders (see the module doc for the layout)."""
    run = check_run(run)
    config = read_json(run / CONFIG_NAME)
    editor = Editor.from_pretrained(run / EDITOR)
    text_encoder = TextEncoder()
    encoder = make_encoder(config["conditions"][0], editor, text_encoder)
    memory = EditingMemory.from_pretrained(run / MEMORY, editor)
    streams = memory.projector.raw_dims
    wrong = {k: d for k, d in streams.items() if encoder.raw_dims.get(k) != d}
    if wrong:
        raise ValueError(f"{run}: the generator was trained on condition streams {wrong} that the "
                         f"{config['conditions'][0]!r} encoder does not produce (it has {encoder.raw_dims})")
    methods: dict[str, nn.Module] = {"base": Base(editor)}
    for name, cls in OPTIONAL.items():
        if (run / name / "config.json").is_file():
            methods[name] = cls.from_pretrained(run / name, editor)
    methods[MEMORY] = memory  # last, as results.json lists them
    methods = {k: m.to(device).eval() for k, m in methods.items()}
    return Run(run, config, editor, methods, encoder, text_encoder)
