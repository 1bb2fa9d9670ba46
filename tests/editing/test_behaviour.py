"""The removal's behaviour gate: probe images, signatures on a tiny editor, the gate's softmax by hand."""

import copy
import math

import pytest
import torch

from funcmem.editing.continual.behaviour import BehaviourGate, Signature, probe_images
from funcmem.editing.editor import Editor, EditorConfig
from funcmem.editing.methods import EditingMemory, edit_with
from funcmem.generator import GeneratorConfig
from funcmem.lora import LoRA


def test_probe_images_are_seeded_smooth_colour_fields():
    a = probe_images(4, 16, seed=0)
    assert a.shape == (4, 3, 16, 16) and a.min() > 0 and a.max() < 1
    assert torch.equal(a, probe_images(4, 16, seed=0)) and not torch.equal(a, probe_images(4, 16, seed=1))
    step = (a[..., 1:] - a[..., :-1]).abs().mean()
    assert step < 0.1  # smooth (a 4 x 4 grid upsampled to 16): uniform noise would differ by 1/3 on average


def vector_lora(v: torch.Tensor) -> LoRA:
    """A LoRA whose (only) B factor is ``v`` (n, D): with the identity signature below, its signature is v."""
    return LoRA({"t": (torch.ones(len(v), 1, 1), v[:, :, None])}, 1.0)


def identity_signature(lora: LoRA) -> torch.Tensor:
    _, b = lora.factors["t"]
    return b[:, :, 0]


def test_gate_is_the_softmax_weight_of_the_removed_labels_by_hand():
    # stored behaviours: label 3 along x, label 5 along y, label 7 along -x (an inverse)
    stored = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 3.0], [-1.0, 0.0], [-2.0, 0.0]])
    labels = torch.tensor([3, 3, 5, 5, 7, 7])
    gate = BehaviourGate(identity_signature, vector_lora(stored), labels, removed=[3], temperature=0.5)
    assert gate.labels.tolist() == [3, 5, 7] and gate.removed.tolist() == [True, False, False]
    query = torch.tensor([[1.0, 1.0], [4.0, 0.0], [-1.0, 0.0]])
    c = 1 / math.sqrt(2)
    cosines = [[c, c, -c], [1.0, 0.0, -1.0], [-1.0, 0.0, 1.0]]  # to the normalised label means x, y, -x
    expected = [math.exp(r[0] / 0.5) / sum(math.exp(v / 0.5) for v in r) for r in cosines]
    assert gate(vector_lora(query)).tolist() == pytest.approx(expected, abs=1e-6)
    two = BehaviourGate(identity_signature, vector_lora(stored), labels, removed=[3, 7], temperature=0.5)
    assert two(vector_lora(query)).tolist() == pytest.approx(
        [(math.exp(r[0] / 0.5) + math.exp(r[2] / 0.5)) / sum(math.exp(v / 0.5) for v in r) for r in cosines], abs=1e-6)
    with pytest.raises(ValueError, match="no stored update has a removed label"):
        BehaviourGate(identity_signature, vector_lora(stored), labels, removed=[4])
    with pytest.raises(ValueError, match="temperature must be > 0"):
        BehaviourGate(identity_signature, vector_lora(stored), labels, removed=[3], temperature=0)


def test_signature_is_the_change_an_update_makes_on_the_probes():
    torch.manual_seed(0)
    editor = Editor(EditorConfig(width=32, depth=1, heads=2, image_size=16))
    with torch.no_grad():
        for p in editor.parameters():  # zero-initialised heads made random: a non-identity editor
            if not p.any():
                p.normal_(0, 0.05)
    editor.requires_grad_(False).eval()
    memory = EditingMemory.create(editor, {"image": 6, "text": 8}, ["img_attn.qkv"], rank=2, alpha=2, condition_dim=16,
                                  generator=GeneratorConfig(d_model=32, depth=1, head_dim=8, token_dim=16, dim_accumulation=2))
    with torch.no_grad():
        memory.fm.generator.model.proj_out_B.weight.normal_(std=0.3)
        lora = memory.generate(torch.randn(3, 4, 16))
    probes = probe_images(2, 16)
    states, mask = torch.randn(1, 5, 384), torch.ones(1, 5, dtype=torch.bool)
    sig = Signature(memory, probes, states, mask, chunk=2)(lora)
    assert sig.shape == (3, 2 * 3 * 16 * 16)
    batch = {"inputs": probes, "text_states": states.expand(2, -1, -1), "text_mask": mask.expand(2, -1)}
    with torch.no_grad():
        by_hand = edit_with(editor, batch, lora[1].repeat_interleave(2), memory.fm.mounted) - edit_with(editor, batch)
    torch.testing.assert_close(sig[1], by_hand.flatten(), atol=1e-5, rtol=1e-4)
    assert sig.norm(dim=1).min() > 0
    zero = LoRA({k: (a, torch.zeros_like(b)) for k, (a, b) in lora.factors.items()}, lora.scale)
    assert Signature(memory, probes, states, mask)(zero).abs().max() < 1e-6
    # a copy of the memory mounts on its own copy of the editor: its signatures are its own, not zero
    twin = copy.deepcopy(memory)
    torch.testing.assert_close(Signature(twin, probes, states, mask, chunk=2)(lora), sig)
