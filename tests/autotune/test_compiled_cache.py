"""The shipped compiled kernels (fastbench.autotune.compiled_cache): packing a Triton cache directory, installing
the archive into another through Triton's cache manager (read back with Triton's FileCacheManager), a second
install that only checks the marker, archives that do not apply here, corrupt archives and an unwritable cache
(one log line, no exception), and a real compiled module found by Triton's own lookup after installation."""
import base64
import hashlib
import json
import logging
import os
import shutil
import sysconfig
import tarfile

import pytest

from fastbench.autotune import compiled_cache as cc
from fastbench.autotune import lookup

DEVICE = {"name": "h200", "cc": "9.0", "sms": 132}
TOOLS = {"triton": "3.6.0", "cuda": "13.0"}
MODULE = "__triton_launcher" + sysconfig.get_config_var("EXT_SUFFIX")


def _entry(seed: str) -> str:
    """A Triton cache directory name (base32 of a sha256 hex key, as get_cache_manager makes it)."""
    return base64.b32encode(hashlib.sha256(seed.encode()).digest()).decode().rstrip("=")


def _kernel(cache, seed, name="_rms_norm_fwd_kernel", binary=True):
    """A kernel entry as Triton's compile leaves it: every stage, the metadata and the group file."""
    d = cache / _entry(seed)
    d.mkdir(parents=True)
    children = {}
    for ext in ("source", "ttir", "ttgir", "llir", "ptx", "json") + (("cubin",) if binary else ()):
        f = d / f"{name}.{ext}"
        f.write_bytes(os.urandom(64) if ext == "cubin" else f"{ext} of {name} {seed}".encode())
        children[f.name] = str(f)
    (d / f"__grp__{name}.json").write_text(json.dumps({"child_paths": children}))
    return d.name


def _module(cache, seed):
    d = cache / _entry(seed)
    d.mkdir(parents=True)
    (d / MODULE).write_bytes(os.urandom(128))
    return d.name


@pytest.fixture
def fake_cache(tmp_path):
    """A collected Triton cache: two kernels, a launcher module, a kernel that never got its binary, a
    temporary directory and a lock."""
    cache = tmp_path / "collected"
    kernels = [_kernel(cache, "a"), _kernel(cache, "b", "_rope_kernel")]
    module = _module(cache, "launcher")
    _kernel(cache, "broken", binary=False)
    (cache / "tmp.pid_1_x").mkdir()
    (cache / _entry("a") / "lock").write_text("")
    return cache, kernels, module


@pytest.fixture
def triton_cache(tmp_path, monkeypatch):
    """A fresh, empty Triton cache for this test (Triton reads TRITON_CACHE_DIR at each lookup)."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    monkeypatch.delenv(cc.OFF_ENV, raising=False)
    monkeypatch.delenv(lookup.OFF_ENV, raising=False)
    monkeypatch.setattr(cc, "_state", None)
    return tmp_path / "triton"


def _archive(fake_cache, root, device=DEVICE, tools=TOOLS):
    cache, *_ = fake_cache
    out = root / cc.archive_name(device, tools)
    index = cc.pack(cache, out, device, tools, {"families": ["llama-3-8b"]})
    return out, index


def _lookup(device=DEVICE, tools=TOOLS):
    return lookup.Lookup(device=device, tools=tools)


def test_pack_keeps_what_a_hit_reads(fake_cache, tmp_path):
    cache, kernels, module = fake_cache
    out, index = _archive(fake_cache, tmp_path / "bundled")
    assert out.name == "h200-sm90-132sm__triton-3.6.0__cuda-13.0.tar.xz"
    assert sorted(index["entries"]) == sorted(kernels + [module])  # the binary-less kernel is left out
    assert index["entries"][kernels[0]] == {"files": ["_rms_norm_fwd_kernel.cubin", "_rms_norm_fwd_kernel.json"],
                                            "groups": {"_rms_norm_fwd_kernel.json": ["_rms_norm_fwd_kernel.cubin",
                                                                                     "_rms_norm_fwd_kernel.json"]}}
    assert index["entries"][module] == {"files": [MODULE], "groups": {}}
    assert cc.kernel_names(index["entries"]) == ["_rms_norm_fwd_kernel", "_rope_kernel"]
    assert index["device"] == DEVICE and index["toolchain"] == TOOLS and index["families"] == ["llama-3-8b"]
    with tarfile.open(out) as tar:
        names = tar.getnames()
    assert names[0] == cc.INDEX and not any(n.endswith((".ptx", ".ttir", ".source", "lock")) for n in names)
    again = tmp_path / "again.tar.xz"
    cc.pack(cache, again, DEVICE, TOOLS, {"families": ["llama-3-8b"]})
    assert again.read_bytes() == out.read_bytes()  # reproducible


def test_install_puts_entries_where_tritons_cache_manager_finds_them(fake_cache, tmp_path, triton_cache):
    from triton.runtime.cache import FileCacheManager

    cache, kernels, module = fake_cache
    out, _ = _archive(fake_cache, tmp_path / "bundled")
    record = cc.ensure_installed(_lookup(), root=tmp_path / "bundled")
    assert record["archive"] == out.name and record["skipped_reason"] is None
    assert (record["entries"], record["installed"], record["already_present"]) == (3, 3, 0)
    assert record["in_triton_cache"] and record["triton_cache_dir"] == str(triton_cache)
    for entry, name in zip(kernels, ("_rms_norm_fwd_kernel", "_rope_kernel")):
        group = FileCacheManager(entry).get_group(f"{name}.json")
        assert sorted(group) == [f"{name}.cubin", f"{name}.json"]
        for child, path in group.items():
            assert path.startswith(str(triton_cache / entry))
            assert open(path, "rb").read() == (cache / entry / child).read_bytes()
    assert open(FileCacheManager(module).get_file(MODULE), "rb").read() == (cache / module / MODULE).read_bytes()
    assert cc.describe() == record  # this process's record from now on


def test_a_second_install_only_checks_the_marker(fake_cache, tmp_path, triton_cache, monkeypatch):
    out, _ = _archive(fake_cache, tmp_path / "bundled")
    cc.install(out, DEVICE, TOOLS)
    monkeypatch.setattr(cc, "_read", lambda *a, **k: pytest.fail("the archive was read again"))
    record = cc.install(out, DEVICE, TOOLS)
    assert (record["installed"], record["already_present"], record["in_triton_cache"]) == (0, 3, True)
    first = cc.ensure_installed(_lookup(), root=tmp_path / "bundled")
    assert cc.ensure_installed(_lookup(), root=tmp_path / "elsewhere") == first  # once per process


def test_entries_already_in_the_cache_are_kept(fake_cache, tmp_path, triton_cache):
    from triton.runtime.cache import FileCacheManager

    cache, kernels, _ = fake_cache
    shutil.copytree(cache / kernels[0], triton_cache / kernels[0])  # compiled here before, with every stage
    mine = FileCacheManager(kernels[0])
    mine.put_group("_rms_norm_fwd_kernel.json", {f.name: str(f) for f in (triton_cache / kernels[0]).iterdir()
                                                  if not f.name.startswith("__grp__")})
    out, _ = _archive(fake_cache, tmp_path / "bundled")
    record = cc.install(out, DEVICE, TOOLS)
    assert (record["installed"], record["already_present"]) == (2, 1)
    assert "_rms_norm_fwd_kernel.ptx" in mine.get_group("_rms_norm_fwd_kernel.json")  # its group untouched


@pytest.mark.parametrize("device, tools, says", [
    ({**DEVICE, "sms": 114}, TOOLS, "none shipped for h200-sm90-114sm__triton-3.6.0__cuda-13.0.tar.xz"),
    (DEVICE, {**TOOLS, "cuda": "12.8"}, "none shipped for h200-sm90-132sm__triton-3.6.0__cuda-12.8.tar.xz"),
    (DEVICE, {**TOOLS, "triton": "3.5.1"}, "shipped: h200-sm90-132sm__triton-3.6.0__cuda-13.0.tar.xz"),
])
def test_no_archive_for_another_gpu_or_toolchain(fake_cache, tmp_path, triton_cache, caplog, device, tools, says):
    _archive(fake_cache, tmp_path / "bundled")
    with caplog.at_level(logging.INFO, "fastbench.autotune"):
        record = cc.ensure_installed(_lookup(device, tools), root=tmp_path / "bundled")
    assert record["archive"] is None and says in record["skipped_reason"] and record["installed"] is None
    assert len(caplog.records) == 1 and says in caplog.records[0].message
    assert not triton_cache.exists()
    assert "not used" in cc.summary(record)


def test_an_archive_whose_index_says_otherwise_is_not_installed(fake_cache, tmp_path, triton_cache, caplog):
    out, _ = _archive(fake_cache, tmp_path / "bundled", tools={**TOOLS, "cuda": "12.8"})
    out.rename(tmp_path / "bundled" / cc.archive_name(DEVICE, TOOLS))  # a misnamed file
    with caplog.at_level(logging.INFO, "fastbench.autotune"):
        record = cc.ensure_installed(_lookup(), root=tmp_path / "bundled")
    assert "built for" in record["skipped_reason"] and "'cuda': '12.8'" in record["skipped_reason"]
    assert record["installed"] is None and len(caplog.records) == 1
    assert [p for p in triton_cache.rglob("*") if p.is_file()] == []


def test_an_archive_of_another_triton_build_is_not_installed(fake_cache, tmp_path, triton_cache, monkeypatch):
    monkeypatch.setattr(cc, "triton_build", lambda: "0123456789abcdef")
    out, _ = _archive(fake_cache, tmp_path / "bundled")
    monkeypatch.undo()
    monkeypatch.setenv("TRITON_CACHE_DIR", str(triton_cache))
    with pytest.raises(cc.Unusable, match="another build of Triton 3.6.0"):
        cc.install(out, DEVICE, TOOLS)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "no index", "lying index"])
def test_a_corrupt_archive_is_one_log_line(fake_cache, tmp_path, triton_cache, caplog, damage):
    out, index = _archive(fake_cache, tmp_path / "bundled")
    data = out.read_bytes()
    if damage == "truncated":
        out.write_bytes(data[: len(data) * 2 // 3])
    elif damage == "garbage":
        out.write_bytes(os.urandom(len(data)))
    elif damage == "empty":
        out.write_bytes(b"")
    else:
        with tarfile.open(out, "w:xz") as tar:
            if damage == "lying index":
                index["entries"][next(iter(index["entries"]))]["files"].append("missing.cubin")
                cc._add(tar, cc.INDEX, json.dumps(index).encode())
            else:
                cc._add(tar, "other.json", b"{}")
    with caplog.at_level(logging.DEBUG, "fastbench.autotune"):
        record = cc.ensure_installed(_lookup(), root=tmp_path / "bundled")
    assert record["skipped_reason"].startswith("corrupt") and record["archive"] == out.name
    assert record["installed"] is None and not record["in_triton_cache"]
    assert [r.levelname for r in caplog.records] == ["WARNING"] and "not installed" in caplog.records[0].message
    installed = [p for p in triton_cache.rglob("*") if p.is_file()]
    assert installed == []  # nothing of a corrupt archive goes in
    assert cc.describe(_lookup(), root=tmp_path / "bundled")["skipped_reason"].startswith("corrupt")


def test_an_unwritable_cache_is_one_log_line(fake_cache, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(blocker / "triton"))  # under a file: no directory can be made
    monkeypatch.setattr(cc, "_state", None)
    _archive(fake_cache, tmp_path / "bundled")
    with caplog.at_level(logging.DEBUG, "fastbench.autotune"):
        record = cc.ensure_installed(_lookup(), root=tmp_path / "bundled")
    assert "NotADirectoryError" in record["skipped_reason"] or "FileExistsError" in record["skipped_reason"]
    assert len(caplog.records) == 1 and caplog.records[0].levelname == "WARNING"


@pytest.mark.parametrize("switch, says", [(cc.OFF_ENV, "FASTBENCH_COMPILED_CACHE=off"),
                                          (lookup.OFF_ENV, "FASTBENCH_AUTOTUNE=off")])
def test_the_users_switches_skip_it(fake_cache, tmp_path, triton_cache, monkeypatch, switch, says):
    _archive(fake_cache, tmp_path / "bundled")
    monkeypatch.setenv(switch, "off")
    record = cc.ensure_installed(_lookup(), root=tmp_path / "bundled")
    assert record["skipped_reason"].startswith(says) and not triton_cache.exists()


def test_no_gpu_skips_it(triton_cache):
    record = cc.ensure_installed(lookup.Lookup(device=None, tools=TOOLS))
    assert "no CUDA GPU" in record["skipped_reason"]


def test_describe_reads_without_installing(fake_cache, tmp_path, triton_cache):
    out, _ = _archive(fake_cache, tmp_path / "bundled")
    before = cc.describe(_lookup(), root=tmp_path / "bundled")
    assert (before["archive"], before["entries"], before["installed"], before["in_triton_cache"]) == \
        (out.name, 3, None, False)
    assert "when the first fused model is made" in cc.summary(before)
    cc.install(out, DEVICE, TOOLS)
    after = cc.describe(_lookup(), root=tmp_path / "bundled")
    assert after["in_triton_cache"] and "in Triton's cache" in cc.summary(after)


def test_a_compiled_module_is_found_by_tritons_own_lookup(tmp_path, monkeypatch):
    """End to end on a CPU: Triton compiles a host module into cache A (as it does a kernel's launcher), A is
    packed, installed into the empty cache B, and Triton's compile_module_from_src then loads it from B without
    building anything."""
    if shutil.which("gcc") is None and shutil.which("cc") is None:
        pytest.skip("no C compiler to build a host module with")
    from triton.runtime import build

    monkeypatch.delenv(cc.OFF_ENV, raising=False)
    src = ("#include <Python.h>\nstatic PyObject* answer(PyObject* s, PyObject* a) { return PyLong_FromLong(42); }\n"
           "static PyMethodDef m[] = {{\"answer\", answer, METH_NOARGS, \"\"}, {NULL, NULL, 0, NULL}};\n"
           "static struct PyModuleDef d = {PyModuleDef_HEAD_INIT, \"fb_probe\", NULL, -1, m};\n"
           "PyMODINIT_FUNC PyInit_fb_probe(void) { return PyModule_Create(&d); }\n")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "a"))
    try:
        assert build.compile_module_from_src(src, "fb_probe").answer() == 42
    except Exception as e:  # no Python headers or compiler here
        pytest.skip(f"cannot build a host module here: {type(e).__name__}: {e}")
    out = tmp_path / cc.archive_name(DEVICE, TOOLS)
    index = cc.pack(tmp_path / "a", out, DEVICE, TOOLS)
    assert [e["files"] for e in index["entries"].values()] == [["fb_probe" + sysconfig.get_config_var("EXT_SUFFIX")]]
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "b"))
    assert cc.install(out, DEVICE, TOOLS)["installed"] == 1

    def no_build(*args, **kwargs):
        raise AssertionError("Triton built the module instead of loading it from its cache")

    monkeypatch.setattr(build, "_build", no_build)
    assert build.compile_module_from_src(src, "fb_probe").answer() == 42
