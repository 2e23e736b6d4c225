import subprocess
import sys


def test_cli_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "fastbench.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_import_has_no_side_effects_on_transformers():
    code = ("import transformers.models.llama.modeling_llama as m; before = dict(vars(m)); "
            "import fastbench, fastbench.kernels, fastbench.autotune; "
            "assert all(vars(m)[k] is v for k, v in before.items())")
    subprocess.run([sys.executable, "-c", code], check=True)
