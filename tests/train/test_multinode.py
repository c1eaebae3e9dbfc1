"""Two "nodes" on this machine train the same run as one node with two ranks: two torchrun agents
with `--nnodes 2 --node-rank 0/1`, or two deepspeed launchers with a two-host hostfile and
`--no_ssh --node_rank 0/1`, one rank each, meeting at 127.0.0.1. Every rank then has LOCAL_RANK 0
and its own RANK, so this catches anything that takes the local rank for the global one (both
nodes would write logs/rank0.log and the same optimizer shard) and any write that assumes a
folder of its own per node. The run folder is on one filesystem, as on a cluster's shared storage
(docs/multinode.md)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ports import ephemeral_range, free_port
from tests.train.test_distributed import train_command

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def launcher(name: str) -> str:
    path = shutil.which(name, path=os.path.dirname(sys.executable))
    if path is None:
        pytest.skip(f"{name} not installed beside this Python")
    return path


def test_the_port_the_nodes_meet_at_is_free_and_never_given_to_a_connection():
    """Outside the ephemeral range: no connect() on this machine (node 1's to node 0's included)
    takes it between the test picking it and node 0 binding it."""
    low, high = ephemeral_range()
    ports = {free_port() for _ in range(20)}
    assert all(20000 <= p <= 32767 and not low <= p <= high for p in ports), ports
    assert len(ports) > 1  # a random start: two runs on one machine seldom try the same port
    for port in ports:
        with socket.socket() as s:
            s.bind(("", port))


def run_nodes(commands: list[list[str]]) -> None:
    """Start every node's launcher at once (they wait for each other) and wait for all."""
    nodes = [
        subprocess.Popen(c, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for c in commands
    ]
    outputs = [p.communicate(timeout=600)[0] for p in nodes]
    for node, (p, out) in enumerate(zip(nodes, outputs, strict=True)):
        assert p.returncode == 0, f"node {node}:\n{out[-3000:]}"


@pytest.fixture(scope="module")
def one_node(pattern_tokens, tmp_path_factory) -> Path:
    """The reference: one node, two ranks."""
    run_dir = tmp_path_factory.mktemp("one") / "run"
    command = [launcher("torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "lmpipe.cli"]
    run_nodes([[*command, *train_command(pattern_tokens, run_dir)]])
    return run_dir


def assert_same_run(nodes: Path, one: Path) -> None:
    """Same losses and weights as one node, and each rank's files under its global rank."""
    import torch

    from lmpipe.train.checkpoint import list_checkpoints, verify_checkpoint

    rows = {
        run: [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        for run in (nodes, one)
    }
    assert len(rows[nodes]) == 8
    for a, b in zip(rows[one], rows[nodes], strict=True):
        assert (a["step"], a["tokens"], a["seq_len"]) == (b["step"], b["tokens"], b["seq_len"])
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert a.get("val_loss", {}).keys() == b.get("val_loss", {}).keys()
        for source, loss in a.get("val_loss", {}).items():
            assert loss == pytest.approx(b["val_loss"][source], abs=1e-6)
    assert [r["step"] for r in rows[nodes] if "val_loss" in r] == [4, 8]
    assert rows[nodes][-1]["loss"] < rows[nodes][0]["loss"] - 0.5  # it trained

    weights = {
        run: torch.load(run / "model" / "model.pt", map_location="cpu", weights_only=True)
        for run in (nodes, one)
    }
    assert weights[one].keys() == weights[nodes].keys()
    for name, w in weights[one].items():
        torch.testing.assert_close(weights[nodes][name], w, rtol=0, atol=1e-6, msg=name)

    for rank in (0, 1):
        assert (nodes / "logs" / f"rank{rank}.log").read_text().count(" loss ") == 8
    assert json.loads((nodes / "plan.json").read_text())["world_size"] == 2
    checkpoints = list_checkpoints(nodes)
    assert [c.name for c in checkpoints] == ["step00000004", "step00000008"]
    for checkpoint in checkpoints:
        shards = sorted(p.name for p in checkpoint.glob("zero_pp_rank_*_optim_states.pt"))
        assert shards == [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)]
        assert verify_checkpoint(checkpoint)["step"] == int(checkpoint.name.removeprefix("step"))
    assert (nodes / "manifest.json").is_file()


@pytest.mark.slow
def test_torchrun_two_nodes_match_one_node(one_node, pattern_tokens, tmp_path):
    port = free_port()
    run_dir = tmp_path / "nodes"
    run_nodes(
        [
            [
                launcher("torchrun"),
                "--nnodes", "2",
                "--node-rank", str(node),
                "--nproc-per-node", "1",
                "--master-addr", "127.0.0.1",
                "--master-port", str(port),
                "-m", "lmpipe.cli",
                *train_command(pattern_tokens, run_dir),
            ]
            for node in (0, 1)
        ]
    )  # fmt: skip
    assert_same_run(run_dir, one_node)


@pytest.mark.slow
def test_deepspeed_launcher_two_nodes_match_one_node(one_node, pattern_tokens, tmp_path):
    # Two host names for this machine: the hostfile's order gives the node ranks. --no_ssh starts
    # each node's launcher by hand instead of through pdsh and ssh, as a scheduler would.
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("127.0.0.1 slots=1\nlocalhost slots=1\n")
    port = free_port()
    run_dir = tmp_path / "nodes"
    run_nodes(
        [
            [
                launcher("deepspeed"),
                "--hostfile", str(hostfile),
                "--no_ssh",
                "--node_rank", str(node),
                "--master_addr", "127.0.0.1",
                "--master_port", str(port),
                "--module", "lmpipe.cli",
                *train_command(pattern_tokens, run_dir),
            ]
            for node in (0, 1)
        ]
    )  # fmt: skip
    assert_same_run(run_dir, one_node)


SCONTROL = """#!/bin/bash
# `scontrol show hostnames LIST` of a two-node allocation that is this machine twice
printf '127.0.0.1\\nlocalhost\\n'
"""
SRUN = """#!/bin/bash
# one task a node (SLURM_NNODES), in parallel, each with its node's SLURM_NODEID
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((n = 0; n < SLURM_NNODES; n++)); do SLURM_NODEID=$n "$@" > "node$n.log" 2>&1 & pids+=($!); done
rc=0; for p in "${pids[@]}"; do wait "$p" || rc=$?; done; exit $rc
"""


@pytest.mark.slow
def test_slurm_script_matches_one_node(one_node, pattern_tokens, tmp_path):
    """docs/slurm/train.sbatch, run by bash with srun and scontrol standing in for SLURM's."""
    from lmpipe.train.recipe import load_recipe, recipe_yaml
    from tests.train.test_distributed import SETTINGS

    script = Path(__file__).resolve().parents[2] / "docs" / "slurm" / "train.sbatch"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("scontrol", SCONTROL), ("srun", SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    # the test's settings as a recipe file: EXTRA splits on spaces, and one setting holds some
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_yaml(load_recipe("tiny", SETTINGS)))
    env = {
        **ENV,
        "PATH": f"{bin_dir}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "node[001-002]",
        "SLURM_NNODES": "2",
        "SLURM_GPUS_ON_NODE": "1",
        "SLURM_JOB_ID": "4242",
        "MASTER_PORT": str(free_port()),
        "RUN_DIR": str(tmp_path / "nodes"),
        "DATA": str(pattern_tokens),
        "RECIPE": str(recipe),
    }
    done = subprocess.run(
        ["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    node_logs = [tmp_path / f"node{n}.log" for n in (0, 1)]
    tails = "".join(log.read_text()[-2000:] for log in node_logs if log.exists())
    assert done.returncode == 0, done.stdout + done.stderr + tails
    assert "2 nodes x 1 GPUs, rendezvous 127.0.0.1:" in done.stdout
    assert_same_run(tmp_path / "nodes", one_node)
