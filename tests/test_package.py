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


def test_is_bfloat16_supported_answers_for_this_machine():
    """Unsloth's notebooks set TrainingArguments(bf16=is_bfloat16_supported(), fp16=not ...)."""
    import torch

    from fastbench import is_bfloat16_supported
    from fastbench.model import default_dtype

    assert is_bfloat16_supported() == (torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if torch.cuda.is_available():
        assert default_dtype("cuda") == (torch.bfloat16 if is_bfloat16_supported() else torch.float16)
