"""The scripts in tools/ (not a package), loaded as modules for their tests."""
import importlib.util
import pathlib

TOOLS = pathlib.Path(__file__).parent.parent / "tools"


def load_tool(name: str):
    """tools/<name>.py as a module of that name."""
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
