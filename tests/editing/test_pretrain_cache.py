"""The base editor's cache: two processes filling one entry agree, and a damaged entry is retrained,
never loaded."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from funcmem import io

CACHE_JOB = textwrap.dedent("""
    import sys, torch
    from funcmem.editing.editor import EditorConfig
    from funcmem.editing.pretrain import load_or_train_editor

    class FakeText:
        def encode(self, texts, max_tokens):
            g = torch.Generator().manual_seed(len(texts))
            return torch.randn(len(texts), max_tokens, 384, generator=g), torch.ones(len(texts), max_tokens, dtype=torch.bool)

    torch.set_num_threads(1)
    cfg = EditorConfig(image_size=8, patch=4, width=16, depth=1, heads=2, max_text_tokens=4)
    editor = load_or_train_editor(cfg, sys.argv[1], steps=3, batch=2, n_crops=8, text_encoder=FakeText(), progress=False)
    print(sum(float(p.double().sum()) for p in editor.parameters()))
""")


@pytest.mark.slow
def test_two_processes_filling_one_cache_entry_agree(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", CACHE_JOB, str(tmp_path)], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and not any(f.endswith(".tmp") for f in files), files
    meta = next(tmp_path.glob("*.json"))
    assert json.loads(meta.read_text())["sha256"] == io.file_sha256(next(tmp_path.glob("*.safetensors")))
    weights = next(tmp_path.glob("*.safetensors"))
    io.write_safetensors(weights, {"x": torch.zeros(1)})  # a whole file, but not the one the index records
    again = subprocess.run([sys.executable, "-c", CACHE_JOB, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "does not match the checksum" in again.stderr  # retrained, not loaded
    assert float(again.stdout) in [float(o) for o in outs]
    assert json.loads(meta.read_text())["sha256"] == io.file_sha256(weights)
