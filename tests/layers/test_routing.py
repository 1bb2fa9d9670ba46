"""The path choice: the dispatcher segments repeated LoRAs, wrappers record the path they take,
groups are computed once, and a forced path holds in its own thread only."""

import threading

import pytest
import torch

from funcmem import mount
from funcmem.layers import routing
from helpers import build, random_lora

# How 8 input samples meet the LoRA: (factor rows, index or None)
LAYOUTS = {
    "distinct": (8, None),  # n == b
    "cfg_copies": (4, None),  # n divides b: sample i uses row i % 4
    "broadcast": (1, None),
    "index_grouped": (3, torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])),  # one request, several samples
    "index_scattered": (3, torch.tensor([2, 0, 2, 1, 0, 0, 2, 1])),  # cache hits anywhere in the batch
    "index_cfg": (3, torch.tensor([1, 0, 1, 2])),  # an index of 4, tiled over 8 samples
}


pytestmark = pytest.mark.usefixtures("one_thread")


def test_dispatcher_segments_repeated_loras():
    """The auto choice on a d=1024, rank-16 layer and a batch of 32 (cost model, no timing)."""
    row, cpu = 16 * 2048, torch.device("cpu")  # factor elements of one LoRA: r (in + out)
    grouped = torch.arange(6).repeat_interleave(torch.tensor([6, 6, 5, 5, 5, 5]))
    scattered = grouped[torch.randperm(32, generator=torch.Generator().manual_seed(0))]

    def choice(index, tokens):
        return routing.choose_path(routing.Routing(int(index.max()) + 1, index), 32, row, tokens * 2048, cpu)

    assert choice(torch.zeros(32, dtype=torch.long), 1024) == "segmented"  # one LoRA: plain on the batch
    assert choice(grouped, 1) == choice(grouped, 1024) == "segmented"  # contiguous groups: slices
    assert choice(scattered, 1) == "segmented"  # decode-like: factor reads dominate
    assert choice(scattered, 64) == "per_sample"  # many tokens: gathering activations would dominate
    assert choice(torch.randperm(32), 1) == "per_sample"  # nothing repeats
    small = routing.choose_path(routing.Routing(16, torch.arange(16).repeat_interleave(2)), 32, 3 * 64, 64, cpu)
    assert small == "per_sample"  # many tiny groups: the per-group cost wins


def test_wrappers_record_the_path_they_take():
    base, fm, inputs = build("linear")
    qkv, x = base.blocks[0].attn.qkv, inputs(8)[0]
    with torch.no_grad():
        for layout, path in [("distinct", "per_sample"), ("cfg_copies", "tiled"), ("broadcast", "plain")]:
            with fm.mounted(random_lora(fm, *LAYOUTS[layout])):
                base(x)
            assert qkv.last_path == path, layout
        two_requests = random_lora(fm, 2).repeat_interleave(4)  # 2 LoRAs, 4 samples each
        with fm.mounted(two_requests):
            base(x)
        assert qkv.last_path == "segmented"
        with mount.lora_path("per_sample"), fm.mounted(two_requests):
            base(x)
        assert qkv.last_path == "per_sample"
    assert mount.current_path() == "auto"
    with pytest.raises(ValueError, match="unknown LoRA path"):
        mount.set_lora_path("triton")


def test_routing_groups_scattered_samples_once():
    r = routing.Routing(3, torch.tensor([2, 0, 2, 1, 0, 0, 2, 1]))
    groups = r.groups(8, torch.device("cpu"))
    assert groups.rows == [0, 1, 2] and groups.bounds == [0, 3, 5, 8]
    assert groups.order.tolist() == [1, 4, 5, 3, 7, 0, 2, 6]
    assert r.groups(8, torch.device("cpu")) is groups  # computed once per batch size, shared by targets
    contiguous = routing.Routing(2, torch.tensor([1, 1, 0])).groups(3, torch.device("cpu"))
    assert contiguous.order is None and contiguous.rows == [1, 0]  # slices of the batch, no copy
    with pytest.raises(IndexError, match="rows 0..5"):
        routing.Routing(3, torch.tensor([0, 5])).groups(2, torch.device("cpu"))


def test_a_forced_path_holds_in_its_own_thread_only():
    """serve forces ``per_sample`` from its worker thread: other threads keep choosing by themselves."""
    base, fm, inputs = build("linear")
    qkv, x = base.blocks[0].attn.qkv, inputs(8)[0]
    two_requests = random_lora(fm, 2).repeat_interleave(4)
    seen, entered, release = {}, threading.Event(), threading.Event()

    def worker():
        with mount.lora_path("per_sample"):
            entered.set()
            release.wait(10)
            seen["worker"] = mount.current_path()

    thread = threading.Thread(target=worker)
    thread.start()
    entered.wait(10)
    try:
        assert mount.current_path() == "auto"  # the worker's forced path is not ours
        with torch.no_grad(), fm.mounted(two_requests):
            base(x)
        assert qkv.last_path == "segmented"
    finally:
        release.set()
        thread.join(10)
    assert seen["worker"] == "per_sample" and mount.current_path() == "auto"
