"""zeroi2v.settings: every switch parsed once, by one parser, with errors that name the variable."""
from __future__ import annotations

import pytest

from zeroi2v import settings
from zeroi2v.cli import main


@pytest.mark.parametrize("name,raw,want", [
    ("native_shift", "1", True), ("native_shift", "off", False), ("native_shift", None, True),
    ("fused_adapters", "auto", None), ("fused_adapters", "Yes", True),
    ("fused_adapters", "0", False), ("fused_adapters", "", None),
    ("adapter_strategy", "dual", "dual"), ("adapter_strategy", None, "auto"),
    ("stdha_block_m", "128", 128), ("stdha_block_m", None, None),
    ("debug", "true", True), ("triton_interpret", "0", False),
])
def test_values_parse(name, raw, want):
    assert settings.SWITCHES[name].parse(raw) == want


@pytest.mark.parametrize("name,raw,expected", [
    ("native_shift", "2", "1 or 0"), ("fused_adapters", "maybe", "auto, 1 or 0"),
    ("adapter_strategy", "fast", "auto, residual, dual"), ("stdha_block_m", "96", "64, 128"),
    ("native_shift", "auto", "1 or 0"),
])
def test_bad_values_name_the_variable_and_the_choices(name, raw, expected):
    env = settings.SWITCHES[name].env
    with pytest.raises(ValueError, match=f"{env}='{raw}' is not valid: expected {expected}"):
        settings.SWITCHES[name].parse(raw)


def test_read_once_and_override(monkeypatch):
    monkeypatch.setattr(settings, "_values", {})
    monkeypatch.setenv("ZEROI2V_NATIVE_SHIFT", "0")
    assert settings.native_shift() is False
    monkeypatch.setenv("ZEROI2V_NATIVE_SHIFT", "1")
    assert settings.native_shift() is False  # read once, not at every call
    with settings.override(native_shift=True):
        assert settings.native_shift() is True
    assert settings.native_shift() is False
    with pytest.raises(ValueError, match="unknown switch 'native_shit'"):
        with settings.override(native_shit=True):
            pass


def test_a_bad_debug_value_is_one_line_and_exit_2(monkeypatch, capsys):
    monkeypatch.setattr(settings, "_values", {})
    monkeypatch.setenv("ZEROI2V_DEBUG", "maybe")
    assert main(["config"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ZEROI2V_DEBUG='maybe' is not valid" in err[0]


def test_the_extension_rejects_a_bad_block_size():
    from zeroi2v import _native

    lib = _native.load()
    if lib is None or not hasattr(lib, "set_block_m"):
        pytest.skip(f"zeroi2v._C with CUDA not built here: {_native.why_not()}")
    with pytest.raises((ValueError, RuntimeError), match="64|128"):
        lib.set_block_m(96)
    lib.set_block_m(0)  # back to the size-based choice


def test_build_time_switches_use_the_same_parser(monkeypatch):
    """setup.py and the build backend read ZEROI2V_NO_EXT / ZEROI2V_NO_CUDA_EXT through
    csrc_build.build_switch, which runs this module's parser (loaded by path)."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "csrc" / "csrc_build.py"
    spec = importlib.util.spec_from_file_location("_csrc_build_under_test", path)
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    monkeypatch.setenv("ZEROI2V_NO_EXT", "true")
    monkeypatch.delenv("ZEROI2V_NO_CUDA_EXT", raising=False)
    assert build.build_switch("no_ext") is True and build.build_switch("no_cuda_ext") is False
    monkeypatch.setenv("ZEROI2V_NO_CUDA_EXT", "maybe")
    with pytest.raises(ValueError, match="ZEROI2V_NO_CUDA_EXT='maybe' is not valid"):
        build.build_switch("no_cuda_ext")
