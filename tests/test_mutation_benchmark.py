"""benchmarks/mutation.py's bookkeeping (mutmut itself is not needed: CI does not install it)."""

import pytest

from tests.conftest import PROJECT, load_benchmark


@pytest.fixture(scope="module")
def mutation():
    return load_benchmark("mutation.py", "mutation_benchmark")


def test_function_spans_use_mutmuts_mangled_names(mutation):
    source = "import x\n\ndef f(a):\n    return a\n\n\nclass C:\n    def m(self):\n        pass\n\n    def n(self):\n        return 1\n"
    assert mutation.function_spans(source) == {"x_f": (3, 4), "xǁCǁm": (8, 9), "xǁCǁn": (11, 12)}


def test_kill_rate_counts_timeouts_as_detected_and_untested_code_as_surviving(mutation):
    result = mutation.ModuleResult("m", counts={"killed": 80, "timeout": 5, "survived": 10, "no tests": 5})
    assert result.total == 100 and result.detected == 85 and result.kill_rate == 0.85
    row = mutation.table([result], children=2).splitlines()[2]
    assert row == "| m | 100 | 80 | 10 | 5 | 5 | 85.0 % | 0.0 |"


def test_every_module_names_existing_files_and_fast_tests(mutation):
    root = PROJECT
    for files, tests in mutation.MODULES.values():
        assert all((root / "src" / "cimd_pipeline" / f).is_file() for f in files)
        paths = [t for t in tests if not t.startswith("--") and "::" not in t]
        assert all((root / t).exists() for t in paths)
        assert not any("pipelines" in t or "reliability" in t for t in paths)  # no Kedro subprocess tests
