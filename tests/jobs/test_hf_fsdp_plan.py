"""The pieces of ``training.fsdp`` for the Trainer kinds that need no second process.

``block_plan`` adds an FSDP rule for the outermost block list a model class's own plan
misses (GPT-2's ``transformer.h``) and none where the class covers it (Llama's
``model.layers``); ``fsdp_config`` is None with one process, and with two carries that plan,
or none (the class's own, with a warning) for a model that cannot be built on ``meta``.
``saves_shards`` (in a 1-process gloo group, where ``fully_shard`` makes ``DTensor``
parameters): a sharded model
is saved as shards, a LoRA-style model whose trainable tensors are plain is saved whole.
``own_storage`` gives a shard that views a larger tensor a compact copy, keeping values,
tied weights and ``requires_grad``; the background save's host copy of such shards is
compact and equal too.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from torch import nn

from colabjob.jobs.hf.fsdp import block_plan, fsdp_config, own_storage
from colabjob.jobs.state.sharded import is_sharded, saves_shards


def _skeleton(kind: str) -> nn.Module:
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    config = (
        GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=40)
        if kind == "gpt2"
        else LlamaConfig(num_hidden_layers=2, hidden_size=16, intermediate_size=32,
                         num_attention_heads=2, num_key_value_heads=2, vocab_size=40)
    )
    with torch.device("meta"):
        model: nn.Module = AutoModelForCausalLM.from_config(config)
    return model


def test_block_plan_fills_in_only_what_the_class_plan_misses() -> None:
    assert block_plan(_skeleton("gpt2")) == {"transformer.h.*": "free_full_weight"}
    assert block_plan(_skeleton("llama")) == {}  # its own plan names model.layers.*


def test_one_process_gets_no_distributed_config() -> None:
    from transformers import GPT2Config

    assert fsdp_config(GPT2Config(n_layer=1)) is None


def test_two_processes_get_the_block_plan_or_the_class_plan_alone(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import transformers
    from transformers import GPT2Config

    from colabjob.jobs.distributed import World

    two = World(rank=0, world_size=2)
    monkeypatch.setattr(World, "current", classmethod(lambda cls: two))
    dc = fsdp_config(GPT2Config(n_layer=2, n_embd=16, n_head=2))
    assert dc.fsdp_size == 2 and dc.fsdp_plan == {"transformer.h.*": "free_full_weight"}

    def cannot_build(*args: object, **kwargs: object) -> None:
        raise RuntimeError("custom init needs real memory")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", cannot_build)
    dc = fsdp_config(GPT2Config(n_layer=2, n_embd=16, n_head=2))
    assert dc.fsdp_size == 2 and dc.fsdp_plan is None
    assert "no block plan for gpt2 (custom init needs real memory)" in caplog.text


@pytest.fixture
def one_rank_group() -> Iterator[None]:
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(6, 4)
        self.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
        self.head = nn.Linear(4, 6, bias=False)
        self.head.weight = self.emb.weight  # tied


def _shard(model: nn.Module) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
    return model


@pytest.mark.usefixtures("one_rank_group")
def test_saves_shards_for_sharded_trainables_only() -> None:
    model = _shard(_Net())
    assert is_sharded(model) and saves_shards(model)
    for p in model.parameters():
        p.requires_grad_(False)
    adapter = nn.Parameter(torch.zeros(4))  # a plain trainable tensor beside a frozen base
    model.register_parameter("adapter", adapter)
    assert is_sharded(model) and not saves_shards(model)  # only the adapter is saved
    assert saves_shards(model, trainable_only=False)  # everything: the base is sharded
    assert not saves_shards(_Net()) and not saves_shards(None)


@pytest.mark.usefixtures("one_rank_group")
def test_own_storage_compacts_views_and_keeps_ties_and_values() -> None:
    from torch.distributed.tensor import DTensor

    model = _shard(_Net())
    layer = model.layers[0]
    big = torch.zeros(20)  # the whole-tensor buffer a loader might leave a shard viewing
    with torch.no_grad():
        view = big[4:20].view(4, 4).copy_(layer.weight.to_local())
        p = layer.weight
        layer.weight = nn.Parameter(
            DTensor.from_local(view, p.device_mesh, p.placements, run_check=False),
            requires_grad=False,
        )
    before = {k: v.full_tensor().clone() for k, v in model.state_dict().items()}
    own_storage(model)
    local = model.layers[0].weight.to_local()
    assert local.untyped_storage().nbytes() == local.numel() * local.element_size()
    assert model.layers[0].weight.requires_grad is False
    assert model.head.weight is model.emb.weight  # still tied
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k].full_tensor()) for k in before)


@pytest.mark.usefixtures("one_rank_group")
def test_the_host_copy_of_shards_that_view_a_larger_tensor_is_compact_and_equal() -> None:
    """The background save's host copy (``HostCopy``) of shards left as views into whole
    tensors (by transformers' loading, before ``own_storage``): no deep copy of the whole
    storage (torch's own helper fails on those), one compact buffer per shard, same values,
    and the same buffers refilled by the next save."""
    from torch.distributed.tensor import DTensor

    from colabjob.jobs.state.dcp_writer import HostCopy, local_nbytes
    from colabjob.jobs.state.sharded import sharded_state

    model = _shard(_Net())
    layer = model.layers[0]
    with torch.no_grad():
        view = torch.zeros(20)[4:20].view(4, 4).copy_(layer.weight.to_local())
        p = layer.weight
        layer.weight = nn.Parameter(
            DTensor.from_local(view, p.device_mesh, p.placements, run_check=False)
        )
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    for param in model.parameters():
        param.grad = torch.ones_like(param)  # an optimizer step: AdamW state to copy too
    opt.step()
    host = HostCopy()
    copied = host.stage(sharded_state(model, opt))
    live = sharded_state(model, opt)
    weight = copied["model"]["layers.0.weight"]
    assert isinstance(weight, DTensor)
    assert weight.to_local().untyped_storage().nbytes() == 16 * 4  # compact, not the 20
    assert torch.equal(weight.to_local(), live["model"]["layers.0.weight"].to_local())
    assert host.nbytes == local_nbytes(live)
    first = weight.to_local().data_ptr()
    opt.step()
    again = host.stage(sharded_state(model, opt))
    assert again["model"]["layers.0.weight"].to_local().data_ptr() == first  # refilled
    assert torch.equal(
        again["model"]["layers.0.weight"].to_local(), model.layers[0].weight.to_local()
    )
