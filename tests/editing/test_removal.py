"""Removing edits (``funcmem continual --forget``): the metrics against hand-computed numbers on
tiny tensors, the near-miss choice, the instruction's positions and the multi-edit flag."""

import math

import pytest
import torch

from funcmem import distill
from funcmem.cli import build_parser
from funcmem.editing.conditions import ConditionProjector
from funcmem.editing.continual import EDIT_NAMES, learners, removal
from funcmem.editing.continual.protocol import check_forget
from funcmem.editing.continual.config import ContinualConfig
from funcmem.editing.editor import Editor, EditorConfig
from funcmem.editing.methods import EditingMemory
from funcmem.editing.ops import EDITS
from funcmem.generator import GeneratorConfig
from funcmem.train import TrainConfig


def test_psnr_per_edit_against_hand_computed_values():
    ref = torch.zeros(3, 3, 2, 2)
    pred = torch.zeros(3, 3, 2, 2)
    pred[0] += 0.1  # mse 0.01 -> 20 dB
    pred[1] += 0.01  # mse 1e-4 -> 40 dB
    pred[2, 0, 0, 0] = 1.0  # mse 1/12 -> 10 log10(12) dB
    ids = torch.tensor([EDIT_NAMES.index("age"), EDIT_NAMES.index("age"), EDIT_NAMES.index("saturate")])
    got = removal.psnr_per_edit(pred, ref, ids)
    assert set(got) == {"age", "saturate"}
    assert got["age"] == pytest.approx(30.0, abs=1e-4)  # the mean of the examples' dB, not of their MSE
    assert got["saturate"] == pytest.approx(10 * math.log10(12), abs=1e-4)


def test_summarise_takes_means_over_edits_on_each_side():
    before = {"to_target": {"saturate": 28.0, "desaturate": 24.0, "age": 20.0, "cooler": 22.0},
              "to_base_test": {"saturate": 15.0, "desaturate": 18.0, "age": 30.0, "cooler": 25.0},
              "to_base_seen": {"saturate": 14.0, "age": 33.0}}
    after = {"to_target": {"saturate": 16.0, "desaturate": 23.5, "age": 20.5, "cooler": 22.0},
             "to_base_test": {"saturate": 31.0, "desaturate": 18.0, "age": 30.0, "cooler": 25.0},
             "to_base_seen": {"saturate": 40.0, "age": 34.0}}
    s = removal.summarise(before, after, ["saturate"], ["desaturate", "cooler", "darken"])  # darken: not taught
    assert s["removed_psnr_to_base"] == 31.0 and s["removed_psnr_to_base_before"] == 15.0
    assert s["removed_psnr_to_base_seen"] == 40.0 and s["removed_psnr_to_base_seen_before"] == 14.0
    assert s["removed_psnr_to_target_before"] == 28.0 and s["removed_psnr_to_target_after"] == 16.0
    assert s["kept_psnr_before"] == pytest.approx(22.0) and s["kept_psnr_after"] == pytest.approx(22.0)
    assert s["near_miss_edits"] == ["desaturate", "cooler"]
    assert s["near_miss_psnr_before"] == 23.0 and s["near_miss_psnr_after"] == 22.75
    assert s["near_miss_per_edit_after"] == {"desaturate": 23.5, "cooler": 22.0}
    assert set(s["kept_per_edit_after"]) == {"desaturate", "age", "cooler"}
    two = removal.summarise(before, after, ["saturate", "age"], [])
    assert two["removed_psnr_to_base"] == pytest.approx(30.5) and two["removed_psnr_to_base_seen"] == pytest.approx(37.0)
    assert two["kept_psnr_after"] == pytest.approx(22.75)
    assert math.isnan(two["near_miss_psnr_after"])


class FixedEmbeddings:
    """A text encoder whose sentence embedding is set per edit (through its phrasings)."""

    def __init__(self, centres: dict[str, list[float]]):
        self.by_text = {t: torch.tensor(v) for e, v in centres.items() for t in EDITS[e].train_phrasings}

    def embed(self, texts):
        return torch.stack([self.by_text[t] for t in texts])


def test_near_misses_are_the_inverse_and_the_nearest_instructions():
    far = [0.0, 0.0, 1.0]
    centres = {e: far for e in EDIT_NAMES}
    centres.update(saturate=[1.0, 0.0, 0.0], denoise=[0.9, 0.1, 0.0], warmer=[0.8, 0.3, 0.0], age=[0.0, 1.0, 0.0],
                   desaturate=[-1.0, 0.0, 0.0])
    text = FixedEmbeddings(centres)
    in_order = lambda edits: sorted(edits, key=EDIT_NAMES.index)  # noqa: E731  (the family's order)
    assert removal.near_misses(["saturate"], text, nearest=2) == in_order(["desaturate", "denoise", "warmer"])
    assert removal.near_misses(["saturate"], text, nearest=1) == in_order(["desaturate", "denoise"])
    # per removed edit: its inverse and its nearest; age's nearest is warmer (cosine 0.35 against denoise's 0.11)
    assert removal.near_misses(["saturate", "age"], text, nearest=1) == in_order(["desaturate", "denoise", "restore", "warmer"])


def test_instruction_positions_follow_the_projector_streams():
    projector = ConditionProjector({"text": 4, "text_pooled": 4, "image": 6}, 8)
    raw = {"text": torch.zeros(2, 3, 4), "text_mask": torch.ones(2, 3, dtype=torch.bool),
           "text_pooled": torch.zeros(2, 4), "image": torch.zeros(2, 5, 6)}
    assert projector(raw).shape[1] == 9
    assert removal.instruction_positions(projector, raw).tolist() == [True] * 4 + [False] * 5


def test_forget_takes_several_edits_and_names_a_bad_one():
    parse = lambda *argv: build_parser(["continual", *argv]).parse_args(["continual", *argv])
    assert parse("--forget", "saturate,age").forget == ["saturate", "age"]
    assert parse("--forget", " saturate , age ").forget == ["saturate", "age"]
    assert parse().forget is None
    for text, message in [("saturate,nope", "unknown edit 'nope'; edits: " + ", ".join(EDIT_NAMES)),
                          ("saturate,saturate", "named twice"),
                          ("saturate,", "expected edit names separated by commas")]:
        with pytest.raises(ValueError, match=message):
            removal.parse_edits(text)


def test_a_removal_the_run_cannot_make_is_refused_before_training():
    cfg = ContinualConfig.quick(groups={"A": ["saturate", "desaturate"]})
    check_forget(cfg, ["saturate"], ["fm_replay"])
    with pytest.raises(ValueError, match="keep fm_replay"):
        check_forget(cfg, ["saturate"], ["fm_naive"])
    with pytest.raises(ValueError, match="'age' is in no stage of this run"):
        check_forget(cfg, ["saturate", "age"], ["fm_replay"])
    with pytest.raises(ValueError, match="nothing would be kept"):
        check_forget(cfg, ["saturate", "desaturate"], ["fm_replay"])


def test_replay_and_removal_act_on_the_updates_the_memory_makes_with_padding_masked():
    """The store's conditions have padded instruction slots (zeros): the updates distillation keeps and a
    removal drives to zero are ``EditingMemory.generate``'s (padding masked, as at use), not the raw generator's."""
    editor = Editor(EditorConfig(width=32, depth=1, heads=2))
    torch.manual_seed(0)
    memory = EditingMemory.create(editor, {"image": 6, "text": 8}, ["img_attn.qkv"], rank=2, alpha=2, condition_dim=16,
                                  generator=GeneratorConfig(d_model=32, depth=1, head_dim=8, token_dim=16, dim_accumulation=2))
    memory.projector.requires_grad_(False)
    with torch.no_grad():
        memory.fm.generator.model.proj_out_B.weight.normal_(std=0.1)
        raw = {"image": torch.randn(8, 2, 6), "text": torch.randn(8, 5, 8),
               "text_mask": torch.arange(5)[None] < torch.tensor([2, 3, 4, 5, 2, 3, 4, 5])[:, None]}
        conditions = memory.condition({"raw": raw})
    store = distill.ConditionStore()
    store.add(conditions, torch.tensor([0] * 4 + [1] * 4))
    c = store.conditions.float()
    kept = learners.ReplayLoss(memory, store, weight=1.0, batch=4, seed=0).distill
    with torch.no_grad():
        masked, unmasked = memory.generate(c), memory.fm.generate(c)
    assert distill.product_sq_distance(kept.old, masked).max() < 1e-8
    padded = ~raw["text_mask"].all(1)  # without padding the two agree; with it they differ
    gap = distill.product_sq_distance(kept.old, unmasked)
    assert gap[~padded].max() < 1e-8 and gap[padded].min() > 1e-3 * distill.product_sq_distance(masked).mean()
    before = distill.product_sq_distance(masked[:4]).mean()
    distill.forget(memory, store, 0, TrainConfig(steps=60, lr=1e-2, progress=False), batch=4, seed=0)
    with torch.no_grad():
        after, others = memory.generate(c[:4]), memory.generate(c[4:])
    assert distill.product_sq_distance(after).mean() < 0.05 * before
    assert distill.product_sq_distance(others, masked[4:]).mean() < 0.2 * distill.product_sq_distance(masked[4:]).mean()


def test_gate_settings_fill_a_partial_setting_from_the_defaults_and_stay_empty_when_off():
    from funcmem.editing.continual.config import FORGET_GATE
    from funcmem.editing.continual.removal import gate_settings

    assert gate_settings(ContinualConfig()) == FORGET_GATE
    assert gate_settings(ContinualConfig(forget_gate={"temperature": 0.1})) == {**FORGET_GATE, "temperature": 0.1}
    assert gate_settings(ContinualConfig(forget_gate={})) == {}
