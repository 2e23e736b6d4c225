import json

from click.testing import CliRunner

from fastbench.env import LIBRARIES, collect_environment
from fastbench.cli import main


def test_collect_environment_has_what_results_record():
    env = collect_environment()
    for key in ("gpu", "driver", "cuda", "versions", "git_sha", "git_dirty", "autotune", "python", "host"):
        assert key in env
    assert set(env["versions"]) == set(LIBRARIES)
    assert env["versions"]["torch"] and env["versions"]["fastbench"]
    json.dumps(env, default=str)


def test_env_command_text_and_json():
    runner = CliRunner()
    text = runner.invoke(main, ["env"])
    assert text.exit_code == 0 and "GPU:" in text.output and "autotune cache:" in text.output
    assert "patches:" in text.output and "bundled" in text.output
    as_json = runner.invoke(main, ["env", "--json"])
    assert as_json.exit_code == 0
    assert json.loads(as_json.output)["versions"]["transformers"]


def test_fastbench_git_sha_names_the_commit_of_a_copied_tree(monkeypatch):
    """A copy of the tree may carry a stale .git; the commit named by FASTBENCH_GIT_SHA wins."""
    from fastbench.env import collect_environment

    monkeypatch.setenv("FASTBENCH_GIT_SHA", "0123abc")
    env = collect_environment()
    assert env["git_sha"] == "0123abc" and env["git_dirty"] is None


def test_switches_that_change_behaviour_are_recorded_and_shown(monkeypatch):
    """A result made with a behaviour switch set reads as such (env, results' environment, report header)."""
    from fastbench.env import SWITCHES, format_environment

    for name in SWITCHES:
        monkeypatch.delenv(name, raising=False)
    assert collect_environment()["switches"] == {}
    assert "switches:  none set (every default)" in format_environment(collect_environment())
    monkeypatch.setenv("FASTBENCH_AUTOTUNE", "off")
    monkeypatch.setenv("FASTBENCH_CACHE_DIR", "/tmp/x")  # where files go: not a switch
    env = collect_environment()
    assert env["switches"] == {"FASTBENCH_AUTOTUNE": "off"}
    assert "switches:  FASTBENCH_AUTOTUNE=off" in format_environment(env)


def test_host_topology_reads_numa_and_says_what_it_cannot():
    from fastbench.env import format_host, host_topology

    host = host_topology()  # no GPU: the NUMA side only
    assert host["pcie"] is None and host["gpu_numa_node"] is None
    assert host["cpus_allowed"] is None or host["cpus_allowed"] >= 1
    line = format_host(host)
    assert "NUMA node(s)" in line and "PCIe" not in line
    assert format_host(None) == "not recorded"
    full = {"numa_nodes": 2, "gpu_numa_node": 1, "cpus_allowed": 16, "cpus_allowed_on_gpu_node": 8,
            "pcie": {"gen": 5, "width": 16, "max_gen": 5, "max_width": 16}}
    assert format_host(full) == ("2 NUMA node(s), GPU on node 1, 16 CPUs allowed (8 on the GPU's node), "
                                 "PCIe gen 5 x16 (at most gen 5 x16)")
