"""The placement planner: memory math against hand-computed numbers, plans for the paper's setup, and
placement groups on a simulated GPU cluster.

The memory math is checked twice: against numbers worked out by hand for Llama-3.3-70B, and against
transformers' own parameter count of the same configs (models built on the meta device: shapes only).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine.placement import plan_pools
from cli.main import main
from engine.config import load_config
from actors.errors import ConfigError
from engine.model_memory import SHIPPED_FACTS, ModelFacts, load_facts
from engine.planner import RUNTIME_RESERVE_GB, NodeSpec, parse_cluster, plan_cluster

REPO = Path(__file__).resolve().parent.parent
LLAMA_70B = "/models/Llama-3.3-70B-Instruct"  # not on this machine: the shipped facts
PAPER_TP4 = [f"roles.{r}.num_gpus=4" for r in ("generator", "feedback", "editor", "reward")]


def paper_plan(cluster: str, overrides: list[str] = ()):
    cfg = load_config("paper_70b", list(overrides))
    return plan_cluster(cfg, plan_pools(cfg).values(), parse_cluster(cluster), stage_actors=10)


# -- memory math ------------------------------------------------------------------------------


def test_llama_70b_memory_by_hand():
    facts = load_facts(LLAMA_70B)
    h, i, vocab, layers, kv = 8192, 28672, 128256, 80, 8 * 128
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h  # q, o; k, v; gate, up, down; two norms
    assert facts.num_params == 2 * vocab * h + layers * per_layer + h == 70_553_706_496
    assert facts.weight_bytes_per_gpu("bfloat16") / 1e9 == pytest.approx(141.1, abs=0.05)
    assert facts.weight_bytes_per_gpu("bfloat16", tp=8) / 1e9 == pytest.approx(17.64, abs=0.01)
    assert facts.kv_bytes_per_token("bfloat16") == 2 * 80 * 8 * 128 * 2 == 327_680  # 320 KiB
    assert facts.kv_bytes_per_token("bfloat16", tp=8) == 327_680 // 8  # one KV head per GPU
    assert facts.kv_bytes_per_token("bfloat16", tp=16) == 327_680 // 8  # 16 GPUs: KV heads are copied, not split
    assert facts.kv_bytes_per_token("fp8", tp=8) == 327_680 // 16


def test_parameter_count_matches_transformers(embedded_dir):
    """The formula against transformers' own models (meta device) for the shipped 70B facts, the
    embedded SmolLM2 (tied embeddings), and a Llama classifier with attention and MLP biases."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig

    small = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        vocab_size=500, attention_bias=True, mlp_bias=True, num_labels=1, architectures=["LlamaForSequenceClassification"])  # fmt: skip
    cases = [
        (AutoModelForCausalLM, AutoConfig.from_pretrained(embedded_dir), load_facts("embedded")),
        (AutoModelForSequenceClassification, small, ModelFacts.from_config(small.to_dict(), "small")),
    ]
    shipped = json.loads((SHIPPED_FACTS / "Llama-3.3-70B-Instruct.json").read_text())
    shipped.pop("_fescale_source")
    cases.append((AutoModelForCausalLM, AutoConfig.for_model(**shipped), load_facts(LLAMA_70B)))
    for model_class, config, facts in cases:
        with torch.device("meta"):
            model = model_class.from_config(config)
        assert facts.num_params == sum(p.numel() for p in model.parameters()), config.architectures
    assert load_facts("embedded").num_params == 134_515_008


def test_tensor_parallel_must_split_the_heads():
    facts = load_facts(LLAMA_70B)
    assert facts.tp_problem(8) is None
    assert "use num_gpus in [1, 2, 4, 8, 16, 32, 64]" in facts.tp_problem(3)
    with pytest.raises(ConfigError, match=r"no facts for 'Llama-3.3-Nemotron-70B-Feedbakc' \(did you mean Llama-3.3-Nemotron-70B-Feedback\?\)"):
        load_facts("/models/Llama-3.3-Nemotron-70B-Feedbakc/", "roles.feedback.model")


# -- cluster descriptions and plans -------------------------------------------------------------


def test_parse_cluster():
    assert parse_cluster("2x8xH100-80GB").nodes == (NodeSpec(64, 8, "H100", 80.0),) * 2
    assert parse_cluster("1xL4-24GB").nodes == (NodeSpec(8, 1, "L4", 24.0),)
    assert parse_cluster("4x8xH100-80GB,cpu:96").nodes == (NodeSpec(96, 8, "H100", 80.0),) * 4
    assert parse_cluster("cpu:2").nodes == (NodeSpec(2),)
    with pytest.raises(ConfigError, match=r"not a cluster description; write NODESxGPUSxNAME-MEMGB"):
        parse_cluster("8xH100")


def test_paper_setup_fits_four_nodes():
    plan = paper_plan("4x8xH100-80GB")
    assert plan.fits, plan.problems
    assert [p.roles for p in plan.pools] == [["generator"], ["feedback"], ["editor"], ["reward"]]
    assert all(p.bundles == [{"CPU": 8, "GPU": 1.0}] + [{"GPU": 1.0}] * 7 for p in plan.pools)
    assert [sum(i.gpus for i in node) for node in plan.nodes] == [8, 8, 8, 8]
    memory = plan.pools[0].memory
    assert memory.weights_gb == pytest.approx(17.64, abs=0.01)
    assert memory.kv_room_gb == pytest.approx(0.90 * 80 - 17.638 - RUNTIME_RESERVE_GB, abs=0.01)
    assert memory.full_length_sequences == int(memory.kv_room_gb * 1e9 // (40_960 * 8192))  # 153


def test_impossible_plans_say_what_to_change():
    two = paper_plan("2x8xH100-80GB")
    assert not two.fits
    assert "use 4 such nodes (--cluster 4x8xH100-80GB), or lower roles.editor.num_gpus / roles.reward.num_gpus" in two.problems[0]
    assert paper_plan("2x8xH100-80GB", PAPER_TP4).fits  # TP 4: 35 GB of weights per GPU, two roles per node

    tp2 = paper_plan("4x8xH100-80GB", ["roles.generator.num_gpus=2"])
    assert tp2.problems == [
        "roles.generator: weights of 70.6 GB per GPU (TP 2, bfloat16) + 3 GB reserve exceed 0.9 x 80 GB; "
        "raise roles.generator.num_gpus (tensor parallelism) or use GPUs with more memory, "
        "or raise roles.generator.engine_kwargs.gpu_memory_utilization"  # 0.95 x 80 GB would hold them
    ]
    long = paper_plan("4x4xL40S-48GB", [*PAPER_TP4, "roles.generator.engine_kwargs.max_model_len=131072"])
    tokens = int((0.9 * 48e9 - 70_553_706_496 * 2 / 4 - 3e9) / (2 * 80 * 2 * 128 * 2))  # TP 4: 2 KV heads per GPU
    assert tokens == 60097 and len(long.problems) == 1
    assert f"{tokens} tokens: less than one sequence of max_model_len=131072; lower max_model_len to {tokens}" in long.problems[0]
    too_big = paper_plan("8x4xH100-80GB")
    assert "roles.generator: one replica needs 8 GPUs and 8 CPUs on one node, and no node has them" in too_big.problems[0]
    assert "roles.generator: tensor parallelism over 6 GPUs" in paper_plan("4x8xH100-80GB", ["roles.generator.num_gpus=6"]).problems[0]


def test_cli_plan(capsys):
    assert main(["plan", "--config", "paper_70b", "--cluster", "4x8xH100-80GB"]) == 0
    out = capsys.readouterr().out
    assert "| vllm:Llama-3.1-Nemotron-70B-Instruct-HF " in out and "17.64 GB" in out
    assert out.strip().endswith("fits 4x8xH100-80GB: 32 of 32 GPUs on 4 of 4 nodes")
    assert main(["plan", "--config", "greedy", "--cluster", "cpu:2"]) == 2  # a 2-CPU replica and the stage actors
    assert "lower pipeline.stage_actors" in capsys.readouterr().err
    assert main(["plan", "--config", "greedy", "--cluster", "cpu:4"]) == 0


# -- a simulated GPU cluster --------------------------------------------------------------------


def test_placement_on_simulated_gpu_cluster(tmp_path):
    """Placement groups of a plan on a real multi-node Ray cluster (`ray.cluster_utils.Cluster`) whose
    nodes declare GPUs to Ray's scheduler. No GPU runs here: nothing is loaded, the groups are only
    reserved (a double for what cannot run on this CPU-only machine). Runs in its own process, so the
    test session's local Ray cluster stays up."""
    run = subprocess.run(
        [sys.executable, __file__, str(tmp_path)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    # the plan fits; Ray puts each replica's STRICT_PACK group on its own node, as planned
    assert result["fits"] and result["planned_gpus_per_node"] == [4, 4, 0]
    assert result["groups_ready"] == 2 and result["nodes_of_groups"] == [1, 1] and result["distinct_nodes"] == 2
    # a third replica cannot fit: the engine refuses before any actor or placement group exists
    assert "no room left for 1 x vllm:Llama-3.3-70B-Instruct" in result["three_replicas"] and "add nodes" in result["three_replicas"]
    assert result["started_after_refusal"] == {"events_actor": False, "placement_groups": 0}
    assert "one replica needs 8 GPUs and 1 CPUs on one node, and no node has them" in result["too_big"]


def _on_simulated_cluster(workdir: Path) -> dict:
    """The child process of the test above: two 4-GPU nodes (declared) and a CPU-only head."""
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.placement_group import placement_group_table, remove_placement_group

    from engine.pools import Pools
    from engine.placement import reserve
    from engine.planner import cluster_from_ray

    model = workdir / "Llama-3.3-70B-Instruct"  # a local folder with just its config.json: enough to plan
    model.mkdir()
    shutil.copy(SHIPPED_FACTS / f"{model.name}.json", model / "config.json")
    role = [f"roles.generator.model={model}", "roles.generator.backend=vllm", "roles.generator.num_gpus=4", "roles.generator.num_cpus=1"]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(2):
        cluster.add_node(num_cpus=2, num_gpus=4)
    ray.init(address=cluster.address, logging_level="ERROR")
    result: dict = {}
    try:
        cfg = load_config("greedy", [*role, "roles.generator.replicas=2"])
        pools = plan_pools(cfg)
        plan = plan_cluster(cfg, pools.values(), cluster_from_ray())
        result["fits"] = plan.fits
        result["planned_gpus_per_node"] = sorted((sum(i.gpus for i in node) for node in plan.nodes), reverse=True)
        pool = next(iter(pools.values()))
        groups = [reserve(pool.placement, f"plan-test-{k}", 60, "roles.generator") for k in range(2)]
        result["groups_ready"] = len(groups)
        table = placement_group_table()
        nodes = [set(table[g.id.hex()]["bundles_to_node_id"].values()) for g in groups]
        result["nodes_of_groups"] = [len(n) for n in nodes]  # STRICT_PACK: one node per group
        result["distinct_nodes"] = len(set.union(*nodes))
        for g in groups:
            remove_placement_group(g)

        refused = Pools(load_config("greedy", [*role, "roles.generator.replicas=3"]))
        try:
            refused.start()
        except ConfigError as e:
            result["three_replicas"] = str(e)
        live = [g for g in placement_group_table().values() if g["state"] != "REMOVED"]
        result["started_after_refusal"] = {"events_actor": refused.events is not None, "placement_groups": len(live)}
        try:
            Pools(load_config("greedy", [*role, "roles.generator.num_gpus=8"])).start()
        except ConfigError as e:
            result["too_big"] = str(e)
    finally:
        ray.shutdown()
        cluster.shutdown()
    return result


if __name__ == "__main__":
    print(json.dumps(_on_simulated_cluster(Path(sys.argv[1]))))


def test_on_a_live_cluster_a_replica_that_crowds_out_the_stream_names_its_cpus():
    """`ray start --head` on 2 cores: greedy's 2-CPU replica fits, its stage actors do not. The engine
    refuses before reserving anything and names every setting that frees the room."""
    from engine.planner import LIVE_CLUSTER, ClusterSpec

    cfg = load_config("greedy")
    plan = plan_cluster(cfg, plan_pools(cfg).values(), ClusterSpec((NodeSpec(2.0),), LIVE_CLUSTER), stage_actors=3)
    assert plan.problems == [
        "no room left for 3 x stage actor (1 node of 2 CPUs); add nodes, or lower "
        "pipeline.stage_actors / pipeline.stage_num_cpus / roles.generator.num_cpus"
    ]
