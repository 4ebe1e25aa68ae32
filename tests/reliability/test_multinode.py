"""Multi-node launching on one machine: ``examples/pretrain_multinode.sh`` (and ``examples/pretrain_slurm.sbatch``
through it) started as two "nodes" on localhost, one gloo process each, c10d rendezvous on a free port.

- pretraining on two nodes logs the same metrics and writes the same final weights, bit for bit, as
  ``torchrun --nproc-per-node 2`` on one node;
- a bilevel round and scoring on two nodes equal the single-node runs;
- ``kill -9`` of every process of node 1 after the first checkpoint: the surviving node exits on its own (gloo
  reports the closed connection, its torchrun ends), nothing of either node is left behind, and relaunching both
  nodes resumes from the latest checkpoint and ends with the uninterrupted run's metrics and weights.

Node 0 is started first and node 1 once node 0's rendezvous store listens, so node 0 hosts the store, as the node
named by ``MASTER_ADDR`` does on a real cluster. Every process of a node carries a marker in its environment, so
that a node can be killed whole (torchrun, the rank, which torch elastic starts in a session of its own, and the
rank's checkpoint-writer helpers) and so that a timeout leaves nothing behind.
"""

import glob
import json
import os
import socket
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
import yaml

from tests.bilevel import realtext
from tests.conftest import REPO_ROOT, free_port, kill_processes, processes_with, run_torchrun
from tests.pretrain.conftest import SEQ, common_args
from tests.pretrain.textdata import build_text_data

pytestmark = [pytest.mark.dist, pytest.mark.slow,
              pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc to find a node's processes")]

MULTINODE = os.path.join(REPO_ROOT, "examples", "pretrain_multinode.sh")
SLURM = os.path.join(REPO_ROOT, "examples", "pretrain_slurm.sbatch")
NODE_MARKER = "MEGATRON_BLISS_TEST_NODE"
TIMEOUT = 180  # s, for one launch of both nodes; a hang fails the test instead of blocking the suite
SURVIVOR_EXIT_S = 60  # the surviving node must be gone this long after its peer was killed
STEPS, SAVE_INTERVAL = 12, 4  # the kill comes at the first checkpoint (step 4), 8 steps before the end
# the bilevel proxy of tests/bilevel/test_trainer.py, and a round of 2 outer steps with an evaluation
PROXY = dict(preset="debug", vocab_size=8000, make_vocab_size_divisible_by=64, seq_length=64, hidden_size=16,
             num_attention_heads=4, num_layers=2)
ROUND = {"kl_coef": 0.0, "outer_steps": 2, "micro_batch_size": 4, "val_micro_batch_size": 4, "save_interval": 2,
         "eval_interval": 2, "score_lr": 1e-3, "proxy_lr": 1e-3, "tensorboard": False}
_UNTIMED = ("step_time_s", "tokens_per_s", "tflops_per_device", "mfu")


# ------------------------------------------------------------------ launching nodes


def _marked(token: str) -> list[int]:
    """pids of the live processes whose environment carries ``token``."""
    return list(processes_with(NODE_MARKER, token))


def _kill_marked(token: str) -> None:
    kill_processes(_marked(token))


class Node:
    """One "node": ``cmd`` (the example script) in a session of its own, its output in ``log``."""

    def __init__(self, cmd: list[str], env: dict, log: str):
        self.token, self.log = uuid.uuid4().hex, log
        self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=dict(env, **{NODE_MARKER: self.token}),
                                     stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        with open(self.log) as f:
            return f.read()

    def kill(self) -> None:
        """kill -9 of every process of the node, as when the machine dies."""
        _kill_marked(self.token)
        self.proc.wait(timeout=30)


def _env(port: int, module: str, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()  # not a rank of some enclosing job
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(NNODES="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GPUS_PER_NODE="1", MODULE=module,
               RDZV_ID=f"test-{port}", OMP_NUM_THREADS="1",
               PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),  # this venv's torchrun
               PYTHONPATH=REPO_ROOT + os.pathsep + env.get("PYTHONPATH", ""))
    env.update(extra)
    return env


def _wait_listening(port: int, node: Node, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert node.proc.poll() is None, f"node 0 ended ({node.proc.returncode}):\n{node.output()[-4000:]}"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"node 0's rendezvous store did not listen on {port} within {timeout} s")


def _start_nodes(config: str, args: list[str], module: str, log_dir) -> list[Node]:
    """``examples/pretrain_multinode.sh`` as node 0, then (once its store listens) as node 1."""
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    cmd = ["bash", MULTINODE, config, *args]
    nodes = [Node(cmd, _env(port, module), str(log_dir / "node0.log"))]
    try:
        _wait_listening(port, nodes[0])
        nodes.append(Node(cmd, _env(port, module), str(log_dir / "node1.log")))
    except BaseException:
        nodes[0].kill()
        raise
    return nodes


def _wait_all(nodes: list[Node], timeout: float = TIMEOUT) -> None:
    """Waits for every node to end; on a timeout or a failure kills them all and raises with their logs. Once one
    node has failed, the others get ``SURVIVOR_EXIT_S`` seconds (a node left alone may wait for its peer)."""
    deadline = time.monotonic() + timeout
    try:
        while any(n.proc.poll() is None for n in nodes) and time.monotonic() < deadline:
            if any(n.proc.poll() not in (None, 0) for n in nodes):
                deadline = min(deadline, time.monotonic() + SURVIVOR_EXIT_S)
            time.sleep(0.1)
        if all(n.proc.poll() == 0 for n in nodes):
            _assert_nothing_left(nodes)
    finally:
        for node in nodes:
            _kill_marked(node.token)
            node.proc.wait(timeout=30)
    failed = [(i, n.proc.returncode) for i, n in enumerate(nodes) if n.proc.returncode != 0]
    assert not failed, f"node(s) failed or timed out (limit {timeout} s): {failed}\n" + "\n".join(
        f"--- node {i}:\n{n.output()[-4000:]}" for i, n in enumerate(nodes))


def _assert_nothing_left(nodes: list[Node], grace: float = 15) -> None:
    """No rank or checkpoint helper of ``nodes`` outlives its torchrun (by more than ``grace`` seconds)."""
    deadline = time.monotonic() + grace
    while any(_marked(n.token) for n in nodes) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [pid for n in nodes for pid in _marked(n.token)]
    assert not left, f"processes outlived their node's torchrun: {left}"


def _run_nodes(config: str, args: list[str], module: str, log_dir) -> None:
    _wait_all(_start_nodes(config, args, module, log_dir))


def _run_single_node(config: str, args: list[str], module: str) -> None:
    """The same stage as ``torchrun --nproc-per-node 2`` on one node."""
    run_torchrun("-m", module, "--config", config, *args, nproc=2, timeout=TIMEOUT)


# ------------------------------------------------------------------ comparing runs


def _metrics(run_dir) -> list[dict]:
    """``run_dir/metrics.jsonl`` without the timings."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in _UNTIMED and not k.startswith("time_")}
                for line in f]


def _tensor_files(checkpoint) -> dict:
    """name -> bytes of a checkpoint's tensor shards (``*.distcp``) and common state (``common.pt``); the
    ``.metadata`` index is left out (it names the save, which differs between runs)."""
    names = sorted(glob.glob(os.path.join(checkpoint, "*.distcp"))) + [os.path.join(checkpoint, "common.pt")]
    assert len(names) > 1, os.listdir(checkpoint)
    out = {}
    for name in names:
        with open(name, "rb") as f:
            out[os.path.basename(name)] = f.read()
    return out


def _assert_same_final_checkpoint(run_dir, ref_dir) -> None:
    final = os.path.join(run_dir, f"iter_{STEPS:07d}")
    assert open(os.path.join(run_dir, "latest_checkpointed_iteration.txt")).read().strip() == str(STEPS)
    assert _tensor_files(final) == _tensor_files(os.path.join(ref_dir, f"iter_{STEPS:07d}"))


# ------------------------------------------------------------------ pretraining


@pytest.fixture(scope="module")
def pretrain_setup(tmp_path_factory):
    """(base dir, config path, overrides for a run into ``save_dir``) of the tiny pretraining."""
    base = tmp_path_factory.mktemp("multinode_pretrain")
    data = build_text_data(str(base), SEQ + 1)
    config = base / "pretrain.yaml"
    config.write_text(yaml.safe_dump({"model": {"preset": "debug"}}))

    def args(save_dir) -> list[str]:
        return common_args(data, str(save_dir), STEPS, **{"checkpoint.save_interval": SAVE_INTERVAL,
                                                          "train.eval_interval": SAVE_INTERVAL})

    return base, str(config), args


@pytest.fixture(scope="module")
def pretrain_reference(pretrain_setup):
    """Run directory of the uninterrupted single-node run (``torchrun --nproc-per-node 2``)."""
    base, config, args = pretrain_setup
    run_dir = base / "single_node"
    _run_single_node(config, args(run_dir), "megatron_bliss.pretrain")
    assert [r["step"] for r in _metrics(run_dir)] == list(range(1, STEPS + 1))
    assert "val_loss" in _metrics(run_dir)[SAVE_INTERVAL - 1]
    return run_dir


def _fake_slurm(bin_dir) -> None:
    """``scontrol`` and ``srun`` stand-ins: this machine is every node of the allocation; srun starts its command
    once per node, as ``--ntasks-per-node=1`` does."""
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\necho 127.0.0.1\n")
    (bin_dir / "srun").write_text(
        "#!/usr/bin/env bash\nwhile [[ $1 == -* ]]; do shift; done\npids=()\n"
        "for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i SLURM_PROCID=$i \"$@\" & pids+=($!); done\n"
        "rc=0\nfor p in \"${pids[@]}\"; do wait \"$p\" || rc=$?; done\nexit $rc\n")
    for name in ("scontrol", "srun"):
        os.chmod(bin_dir / name, 0o755)


def test_slurm_job_of_two_nodes_equals_single_node_pretraining(pretrain_reference, pretrain_setup, tmp_path):
    """``sbatch examples/pretrain_slurm.sbatch`` as its job would run on a 2-node allocation."""
    _, config, args = pretrain_setup
    run_dir = tmp_path / "run"
    _fake_slurm(tmp_path / "bin")
    env = _env(free_port(), "megatron_bliss.pretrain", SLURM_JOB_NODELIST="node[001-002]", SLURM_NNODES="2",
               SLURM_JOB_ID=f"test-{uuid.uuid4().hex[:8]}", SLURM_SUBMIT_DIR=REPO_ROOT)
    for key in ("NNODES", "MASTER_ADDR", "RDZV_ID"):  # the job script derives these from the allocation
        env.pop(key)
    env["PATH"] = str(tmp_path / "bin") + os.pathsep + env["PATH"]
    _wait_all([Node(["bash", SLURM, config, *args(run_dir)], env, str(tmp_path / "job.log"))])
    assert _metrics(run_dir) == _metrics(pretrain_reference)
    _assert_same_final_checkpoint(run_dir, pretrain_reference)


def test_killed_node_stops_the_job_and_a_relaunch_resumes(pretrain_reference, pretrain_setup, tmp_path):
    """kill -9 of node 1 after the first checkpoint; node 0 must exit on its own; both relaunched resume."""
    _, config, args = pretrain_setup
    run_dir = tmp_path / "run"
    marker = run_dir / "latest_checkpointed_iteration.txt"
    survivor, victim = nodes = _start_nodes(config, args(run_dir), "megatron_bliss.pretrain", tmp_path / "killed")
    try:
        deadline = time.monotonic() + TIMEOUT
        while not marker.exists() and all(n.proc.poll() is None for n in nodes) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert marker.exists(), f"no checkpoint:\n{survivor.output()[-4000:]}"
        victim.kill()
        killed_at = time.monotonic()
        try:
            survivor.proc.wait(timeout=SURVIVOR_EXIT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the surviving node still runs {SURVIVOR_EXIT_S} s after its peer was killed:\n"
                        + survivor.output()[-4000:])
        survivor_exit_s = time.monotonic() - killed_at
        _assert_nothing_left(nodes)
    finally:
        _kill_marked(survivor.token)
        _kill_marked(victim.token)
    checkpoint = int(marker.read_text())
    assert SAVE_INTERVAL <= checkpoint < STEPS, "the run finished before node 1 was killed"
    assert survivor.proc.returncode != 0, "the surviving node reported success"
    print(f"surviving node exited {survivor_exit_s:.1f} s after node 1 was killed at checkpoint {checkpoint}")

    _run_nodes(config, args(run_dir), "megatron_bliss.pretrain", tmp_path / "relaunched")
    relaunch = (tmp_path / "relaunched" / "node0.log").read_text() + (tmp_path / "relaunched" / "node1.log").read_text()
    assert f"resumed from {run_dir / f'iter_{checkpoint:07d}'}" in relaunch, relaunch[-4000:]
    assert _metrics(run_dir) == _metrics(pretrain_reference)  # steps past the checkpoint replaced, not duplicated
    _assert_same_final_checkpoint(run_dir, pretrain_reference)


# ------------------------------------------------------------------ bilevel round and scoring


def test_two_nodes_bilevel_round_and_scoring_equal_single_node(tmp_path):
    train, val = realtext.build_prefixes(str(tmp_path))
    round_config, score_config = tmp_path / "round.yaml", tmp_path / "score.yaml"
    round_config.write_text(yaml.safe_dump({"proxy": PROXY, "bilevel": ROUND,
                                            "paths": {"train_prefix": train, "val_prefix": val}}))
    score_config.write_text(yaml.safe_dump({"model": PROXY, "paths": {"data_prefix": train},
                                            "scoring": {"micro_batch_size": 4, "chunk_size": 16,
                                                        "max_sequences": 64}}))
    runs = {}
    for name, launch in (("single_node", _run_single_node),
                         ("two_nodes", lambda c, a, m: _run_nodes(c, a, m, tmp_path / "logs" / m))):
        bilevel, scores = tmp_path / name / "bilevel", tmp_path / name / "scores"
        launch(str(round_config), [f"--paths.output_dir={bilevel}"], "megatron_bliss.bilevel")
        launch(str(score_config), [f"--paths.checkpoint={bilevel / 'score'}", f"--paths.output_dir={scores}"],
               "megatron_bliss.score")
        runs[name] = bilevel, np.load(scores / "scores.npy")
    (one, one_scores), (two, two_scores) = runs["single_node"], runs["two_nodes"]
    assert [r["step"] for r in _metrics(one)] == [1, 2] and "eval_loss" in _metrics(one)[-1]
    assert _metrics(two) == _metrics(one)
    assert _tensor_files(two / "score") == _tensor_files(one / "score")
    assert one_scores.shape == (64,) and np.unique(one_scores).size > 1
    np.testing.assert_array_equal(two_scores, one_scores)
