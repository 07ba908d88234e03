"""Shared fixtures of the unit tests."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="session")
def load_benchmark():
    """``load_benchmark("drills")``: a script of benchmarks/ imported as a module (they are scripts,
    not a package). Registered in sys.modules, where their dataclasses look their module up; the
    folder goes on sys.path for their shared ``_common``."""
    def load(name: str):
        if name not in sys.modules:
            if str(BENCHMARKS) not in sys.path:
                sys.path.insert(0, str(BENCHMARKS))
            spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        return sys.modules[name]
    return load
