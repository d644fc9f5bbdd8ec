"""cfn_core.bench.talk throughput: a small run of both arms; its delivery check is exact (not a timing test)."""

import os
import subprocess
import sys

from cfn_core.bench import talk


def test_peers_are_chosen_the_same_in_every_process_and_never_the_sender():
    everyone = [f"talker-{i:04d}" for i in range(1, 6)]
    picks = talk.choose_peers("talker-0002", everyone, 50, seed=3)
    assert picks == talk.choose_peers("talker-0002", everyone, 50, seed=3)
    assert "talker-0002" not in picks and set(picks) <= set(everyone)
    probe = ("import sys; from cfn_core.bench import talk; "
             "print(talk.choose_peers('talker-0002', [f'talker-{i:04d}' for i in range(1, 6)], 50, 3))")
    other = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == repr(picks)


def test_both_arms_deliver_exactly(bus_root, no_leaks):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CFN_")}
    env["CFN_BUS_ROOT"] = str(bus_root)
    proc = subprocess.run([sys.executable, "-m", "cfn_core.bench.talk", "throughput", "--agents", "6", "--messages", "15"],
                          cwd=bus_root, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("without batch  (pool+parallel) 90 messages") and lines[0].endswith("delivery exact")
    assert lines[1].startswith("with batch     (") and "batch" in lines[1].split(")")[0] and lines[1].endswith("delivery exact")
    assert lines[2].startswith("6 agents x 15 messages, median of 1:") and "ratio with/without batch" in lines[2]


def test_the_delivery_check_sees_a_lost_a_doubled_and_a_reordered_message():
    plan = {"a": ["b", "b", "c"], "b": ["a"], "c": ["a", "b"]}  # index: a 0, b 1, c 2
    exact = {"a": {"received": {"1": [0], "2": [0]}}, "b": {"received": {"0": [0, 1], "2": [1]}},
             "c": {"received": {"0": [2]}}}
    assert talk.delivery_errors(plan, exact) == 0
    lost = {**exact, "c": {"received": {}}}
    doubled = {**exact, "a": {"received": {"1": [0, 0], "2": [0]}}}
    reordered = {**exact, "b": {"received": {"0": [1, 0], "2": [1]}}}
    silent = {k: v for k, v in exact.items() if k != "b"}  # b never reported
    assert [talk.delivery_errors(plan, r) for r in (lost, doubled, reordered, silent)] == [1, 1, 1, 2]


def _request_run(bus_root, *args, extra_path=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CFN_")}
    env["CFN_BUS_ROOT"] = str(bus_root)
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(extra_path), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "cfn_core.bench.talk", "--n", "30", *args],
                          cwd=bus_root, env=env, capture_output=True, text=True, timeout=240)


def test_the_request_arm_prints_cfn_and_the_pipe_and_their_ratio(bus_root, no_leaks):
    proc = _request_run(bus_root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("cfn request/reply (shm)") and "p50" in lines[0] and "p99" in lines[0]
    assert lines[1].startswith("multiprocessing.Pipe")
    assert lines[2].startswith("ratio p50 ") and lines[2].endswith("(n = 30)")


def test_the_ray_arm_without_ray_says_how_to_get_it(bus_root, tmp_path, no_leaks):
    # Ray is not a dependency of cfn: a module that fails to import stands for its absence
    fake = tmp_path / "no_ray"
    fake.mkdir()
    (fake / "ray.py").write_text("raise ImportError('no Ray here')\n")
    proc = _request_run(bus_root, "--ray", extra_path=fake)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "--ray needs Ray installed (pip install ray)" in proc.stderr and "Traceback" not in proc.stderr
