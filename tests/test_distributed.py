"""Multi-process training on CPU: a 2-node torchrun on loopback with c10d rendezvous, launched the way the chart
launches pods, making exactly one MLflow run; sharding without a launcher (a world of one), and the process-wide
state a ZeRO-3 run leaves behind. Two-process ZeRO-3 and FSDP2: tests/test_sharding.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import deepspeed  # noqa: F401  (a test dependency: a missing DeepSpeed fails here rather than skipping)
import pytest

from support import experiment, free_port, mlflow_client, write_values

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}



def _one_finished_run(tmp: Path):
    client = mlflow_client(tmp)
    runs = client.search_runs([client.get_experiment_by_name("toy").experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    assert runs[0].info.status == "FINISHED"
    return runs[0]


@pytest.mark.slow
def test_two_node_torchrun_on_loopback_logs_one_run(tmp_path, tiny_gpt2, toy_data):
    values = write_values(tmp_path, experiment(tiny_gpt2, toy_data, tmp_path, runs={"lora": {
        "method": {"name": "lora", "r": 2}, "training": {"max_steps": 4}}}))
    port = free_port()
    nodes = []
    for rank in (0, 1):  # what the Indexed Job's pods run, with JOB_COMPLETION_INDEX as node rank
        cmd = [*TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(rank),
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "toy-lora",
               "-m", "lora_exp", "train", "-f", str(values)]
        nodes.append(subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    logs = [n.communicate(timeout=600)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(x[-3000:] for x in logs)
    assert "processes: 2 (MULTI_CPU, backend gloo)" in logs[0]
    run = _one_finished_run(tmp_path)
    assert run.data.metrics["trainable_params"] > 0
    assert (tmp_path / "outputs/toy/lora/final/adapter_model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.parametrize("sharding,says", [("zero", "DeepSpeed ZeRO stage 2"), ("fsdp", "FSDP2 shard grad op")])
def test_sharding_without_a_launcher_runs_as_a_world_of_one(tmp_path, tiny_gpt2, toy_data, sharding, says):
    """A single-GPU profile launches `lora-exp train` without torchrun; a sharded spec must still run (DeepSpeed
    would otherwise look for MPI and fail with `No module named 'mpi4py'`; FSDP needs a process group)."""
    values = write_values(tmp_path, experiment(tiny_gpt2, toy_data, tmp_path, runs={"full": {
        "method": {"name": "full"}, "training": {"zero_stage": 2, "sharding": sharding, "max_steps": 3}}}))
    env = {k: v for k, v in _env().items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR")}
    proc = subprocess.run([sys.executable, "-m", "lora_exp", "train", "-f", str(values)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    assert "single-process world" in log and says in log
    assert _one_finished_run(tmp_path).data.metrics["trainable_params"] > 0


@pytest.mark.slow
def test_a_zero3_run_leaves_nothing_behind_for_the_next_run_in_the_process(tmp_path, tiny_gpt2, toy_data):
    """`lora-exp train` trains a file's runs one after another in one process. accelerate and transformers keep
    DeepSpeed state process-wide: without the release between runs, the LoRA run after a ZeRO-3 run loaded
    its model partitioned (zero-sized weights) and trained under DeepSpeed, and crashed (seed 001's glue.yaml).
    The LoRA run must count the base model's parameters and train without DeepSpeed, as in a process alone."""
    values = write_values(tmp_path, experiment(tiny_gpt2, toy_data, tmp_path, runs={
        "full": {"method": {"name": "full"}, "training": {"zero_stage": 3, "max_steps": 2}},
        "lora": {"method": {"name": "lora", "r": 4}, "training": {"max_steps": 2}},
        "full-again": {"method": {"name": "full"}, "training": {"zero_stage": 3, "max_steps": 2}}}))
    env = {k: v for k, v in _env().items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR")}
    proc = subprocess.run([sys.executable, "-m", "lora_exp", "train", "-f", str(values)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    client = mlflow_client(tmp_path)
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("toy").experiment_id])}
    full, lora = runs["full"].data.metrics, runs["lora"].data.metrics
    assert lora["total_params"] >= full["total_params"]  # the whole base model, not its empty shards
    assert "processes: 1 (NO, backend None)" in log.split("run lora")[-1].split("run full-again")[0], log[-3000:]
    # ... and a second ZeRO-3 run after them finds a world of one again (DeepSpeed's groups made anew).
    assert runs["full-again"].info.status == "FINISHED"
