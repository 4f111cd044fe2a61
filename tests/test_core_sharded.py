"""FD on sharded factors (``fnl_transformers.core.sharded``) equals the unsharded core, and moves only k x k pieces.

Reference: ``frobenius_penalty`` and ``fd_grads`` of the whole model (the public core functions). Sharded runs: 2
gloo processes, the model sharded by torch's FSDP2 ``fully_shard`` (DTensor parameters; FD reads ``to_local()``
and :meth:`ShardLayout.of_dtensor`), with FSDP2's default placement (every parameter along dim 0: q/k/v split
along heads, output projections and factorized layers along their contracted dimension) and with q/k/v along
dim 1 (every factor along its contracted dimension). The model has every kind of form: plain attention,
grouped-query attention, a fused transposed (GPT-2 Conv1D) projection with row slices, factorized linear layers
(one deep, ``U M V^T``, its ``M`` sharded too), a factorized embedding; uneven chunks (7 rows over 2 processes).
Tolerance: 1e-5 relative to the largest reference value (float32; the same sums in another order, measured
<= 1.2e-7; without the all-reduce the gradients are off by 0.66 of that scale). While FD runs, every
torch.distributed collective other than ``all_reduce`` raises, and the one all-reduce carries exactly the Gram
pieces counted by hand below (no factor is ever gathered).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

from fnl_transformers.core import (
    FactorizedEmbedding,
    FactorizedLinear,
    attention_form_specs,
    fd_grads,
    frobenius_penalty,
    register_attention_forms,
)
from fnl_transformers.core.sharded import (
    Comm,
    DryRunComm,
    Sharded,
    ShardLayout,
    attention_stack,
    bert_param_count,
    comm_table,
    fd_comm_log,
    fsdp_default,
    model_specs,
    qkv_along_inputs,
    shard_model,
    sharded_fd,
)

from distributed_helpers import forbid_collectives, free_port

COEFFS = {"linear": 0.3, "embedding": 0.2, "qk": 0.5, "ov": 0.7}
TOL = 1e-5
QKV = ("q.weight", "k.weight", "v.weight")


class Attn(nn.Module):
    def __init__(self, d, heads, head_dim, kv_heads=None):
        super().__init__()
        kv = (kv_heads or heads) * head_dim
        self.q, self.k, self.v = nn.Linear(d, heads * head_dim), nn.Linear(d, kv), nn.Linear(d, kv)
        self.o = nn.Linear(heads * head_dim, d)
        register_attention_forms(
            self, attention_form_specs("q.weight", "k.weight", "v.weight", "o.weight", heads, num_kv_heads=kv_heads)
        )


class Fused(nn.Module):
    """GPT-2 layout: Conv1D weights (in x out), q/k/v as column slices of one ``c_attn``."""

    def __init__(self, d, heads):
        super().__init__()
        self.c_attn = nn.Parameter(torch.randn(d, 3 * d) / d**0.5)
        self.c_proj = nn.Parameter(torch.randn(d, d) / d**0.5)
        register_attention_forms(
            self,
            attention_form_specs(
                "c_attn",
                "c_attn",
                "c_attn",
                "c_proj",
                heads,
                transposed=True,
                q_slice=(0, d),
                k_slice=(d, 2 * d),
                v_slice=(2 * d, 3 * d),
            ),
        )


def make_model():
    torch.manual_seed(0)
    m = nn.Module()
    m.attn = Attn(12, 4, 3)  # 12 rows of q/k/v: 2 heads per process
    m.gqa = Attn(12, 4, 3, kv_heads=2)  # k/v: 6 rows, one group per process
    m.fused = Fused(12, 4)
    m.fc = FactorizedLinear(10, 7, rank=3)  # U 7 x 3: uneven chunks (4, 3)
    m.deep = FactorizedLinear(8, 6, rank=4, deep=True)
    m.emb = FactorizedEmbedding(11, 6, rank=3)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.5)
    return m


def reference(model):
    penalty = float(frobenius_penalty(model, **COEFFS).detach())
    return penalty, {n: g.detach() for n, g in fd_grads(model, **COEFFS).items()}


def expected_numel(placement_is_default: bool) -> int:
    """The all-reduce payload counted by hand: k (k + 1) / 2 numbers per head of each Gram that must travel."""
    t3, t4 = 3 * 4 // 2, 4 * 5 // 2  # upper triangles of 3 x 3 and 4 x 4 Grams
    linear = 2 * t3 + (2 * t4 + 16) + 2 * t3  # fc (U, V), deep (U, V, and M 4 x 4 whole), emb (U, V)
    fused = 4 * 4 * t3  # q, k, v slices of c_attn and c_proj: 4 heads each
    if placement_is_default:
        attn = 4 * t3 + 4 * t3  # QK local to its heads (q, k same owners); OV: o (contracted) + v (owned)
        gqa = (4 + 2) * t3 + (4 + 2) * t3  # q / k and o / v: different owners, every Gram travels
        return attn + gqa + fused + linear + 1  # + the partial penalty of the local QK form
    attn = 4 * 4 * t3
    gqa = (4 + 2 + 4 + 2) * t3
    return attn + gqa + fused + linear


def _worker(rank, world, port, out_dir, qkv_dim1):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = make_model()
        ref_penalty, ref_grads = reference(model)
        names = {id(p): n for n, p in model.named_parameters()}
        along_inputs = qkv_along_inputs(*QKV) if qkv_dim1 else fsdp_default
        fully_shard(
            model,
            mesh=init_device_mesh("cpu", (world,)),
            shard_placement_fn=lambda p: Shard(along_inputs(names[id(p)], p)),
        )
        shards = {}
        for n, p in model.named_parameters():
            if p.dim() == 2:
                shards[n] = Sharded(p.to_local().detach(), ShardLayout.of_dtensor(p))
        comm = Comm()
        with forbid_collectives("sharded FD"):
            penalty, grads = sharded_fd(model_specs(model), shards.__getitem__, COEFFS, comm)
        scale = max(float(g.abs().max()) for g in ref_grads.values())
        grad_err = max(float((grads[n] - shards[n].layout.take(ref_grads[n])).abs().max()) for n in ref_grads)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(
                dict(
                    penalty=float(penalty),
                    ref_penalty=ref_penalty,
                    grad_err=grad_err / scale,
                    grad_keys=sorted(grads),
                    ref_keys=sorted(ref_grads),
                    calls=comm.log.calls,
                ),
                f,
            )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("qkv_dim1", [False, True], ids=["fsdp2-default", "qkv-dim1"])
def test_fsdp2_shards_equal_unsharded_core(tmp_path, qkv_dim1):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, free_port(), str(tmp_path), qkv_dim1), nprocs=2, join=True)
    results = [json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1)]
    dry = fd_comm_log(make_model(), COEFFS, 2, qkv_along_inputs(*QKV) if qkv_dim1 else fsdp_default)
    for res in results:
        assert res["grad_keys"] == res["ref_keys"]  # a gradient for every factor, and only for factors
        assert abs(res["penalty"] - res["ref_penalty"]) <= TOL * abs(res["ref_penalty"])
        assert res["grad_err"] <= TOL
        numel = expected_numel(not qkv_dim1)
        assert res["calls"] == [["all_reduce", numel, 4 * numel]]  # one all-reduce of k x k pieces
        assert [list(c) for c in dry.calls] == res["calls"]  # the dry run counts what the real run sends


# ---------------------------------------------------------------- single process: layouts, errors, counts


def test_shard_layout_follows_torch_chunk():
    for n, world in [(7, 2), (5, 4), (12, 5), (3, 4)]:
        chunks = torch.arange(n).chunk(world)
        for r in range(world):
            start, stop = ShardLayout((n, 2), 0, r, world).span()
            expected = chunks[r].tolist() if r < len(chunks) else []
            assert list(range(start, stop)) == expected


def test_head_split_by_a_shard_is_refused():
    model = make_model()
    shards = shard_model(model, 3, 0)  # q/k/v of 12 rows over 3 processes: 4 rows, heads of 3 rows
    with pytest.raises(
        ValueError,
        match=r"^attn\.q\.weight: the shard of process 0 \(rows 0\.\.4 of dim 0\) "
        r"splits head 1 \(3 rows per head\); shard this parameter along dim 1",
    ):
        sharded_fd(model_specs(model), shards.__getitem__, {"qk": 1.0}, DryRunComm())


def test_replicated_parameters_need_no_communication():
    model = make_model()
    shards = shard_model(model, 1, 0, placement=lambda name, p: None)
    comm = DryRunComm()
    penalty, grads = sharded_fd(model_specs(model), shards.__getitem__, COEFFS, comm)
    ref_penalty, ref_grads = reference(model)
    assert comm.log.calls == []
    assert abs(float(penalty) - ref_penalty) <= TOL * ref_penalty
    for n, g in ref_grads.items():
        assert float((grads[n] - g).abs().max()) <= TOL * float(g.abs().max())


def test_dtensor_adapter_on_whole_tensors_equals_accumulate_fd_grads():
    """The adapter the optimizers and FNLTrainer use (``accumulate_sharded_fd_grads``), on plain (replicated)
    parameters: the same gradients as the core's ``accumulate_fd_grads`` (1e-5 of the largest), added onto buffers
    already present and created for the others, one buffer per parameter (q/k/v of the fused projection share
    ``c_attn``), the penalty equal to ``frobenius_penalty``, and nothing sent."""
    from fnl_transformers.core import accumulate_fd_grads
    from fnl_transformers.core.sharded import accumulate_sharded_fd_grads

    model = make_model()
    params = dict(model.named_parameters(remove_duplicate=False))
    specs = model_specs(model)
    ref = accumulate_fd_grads(specs, params.__getitem__, COEFFS)
    first = params["fc.U"]
    out = {id(first): torch.ones_like(first)}
    comm = DryRunComm()
    penalty, got = accumulate_sharded_fd_grads(specs, params.__getitem__, COEFFS, out, comm)
    assert comm.log.calls == [] and got is out and set(got) == set(ref)
    scale = max(float(g.abs().max()) for g in ref.values())
    for pid, g in ref.items():
        expected = g + 1 if pid == id(first) else g
        assert float((got[pid] - expected).abs().max()) <= TOL * scale
    assert abs(float(penalty) - reference(model)[0]) <= TOL * reference(model)[0]


def test_bert_base_communication_counted_by_hand():
    """One BERT-base attention under FSDP2's default sharding: QK stays local (q and k heads on the same
    process), OV sends the o Gram (partial sums) and the v Gram (owned heads): 2 x 12 heads x 64 * 65 / 2
    float32 numbers, plus the QK penalty's partial sum; with q/k/v along dim 1, 4 Grams."""
    per_gram = 12 * 64 * 65 // 2
    one = attention_stack(1, 768, 12, 64)
    assert fd_comm_log(one, {"qk": 1, "ov": 1}, 4).calls == [("all_reduce", 2 * per_gram + 1, 4 * (2 * per_gram + 1))]
    assert (
        fd_comm_log(
            one, {"qk": 1, "ov": 1}, 8, qkv_along_inputs("q_proj.weight", "k_proj.weight", "v_proj.weight")
        ).numel
        == 4 * per_gram
    )
    rows = {(r["model"], r["sharding"]): r for r in comm_table()}
    assert rows[("BERT-base, QK + OV", "dim 0 (FSDP2 default), 4 processes")]["bytes"] == 4 * (12 * 2 * per_gram + 1)
    iwslt = rows[("IWSLT'14 Transformer, QK + OV", "dim 0 (FSDP2 default), 4 processes")]
    assert iwslt["numel"] == 18 * 2 * 4 * 128 * 129 // 2 + 1


def test_bert_param_count_matches_transformers():
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        model = transformers.BertModel(transformers.BertConfig())
    assert bert_param_count() == sum(p.numel() for p in model.parameters())


def test_readme_table_is_the_commands_output(capsys):
    """The README's communication table is what ``python -m fnl_transformers.core.sharded`` prints."""
    import pathlib

    from fnl_transformers.core.sharded import main

    main()
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 8
    for line in lines:
        assert line in readme, line
