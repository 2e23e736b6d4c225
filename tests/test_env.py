import json

from click.testing import CliRunner

from fastbench.env import LIBRARIES, collect_environment
from fastbench.cli import main


def test_collect_environment_has_what_results_record():
    env = collect_environment()
    for key in ("gpu", "driver", "cuda", "versions", "git_sha", "git_dirty", "autotune", "python"):
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
    monkeypatch.setenv("FASTBENCH_OFFLOAD_SAVE_EVERY", "0")
    monkeypatch.setenv("FASTBENCH_CACHE_DIR", "/tmp/x")  # where files go: not a switch
    env = collect_environment()
    assert env["switches"] == {"FASTBENCH_OFFLOAD_SAVE_EVERY": "0"}
    assert "switches:  FASTBENCH_OFFLOAD_SAVE_EVERY=0" in format_environment(env)
