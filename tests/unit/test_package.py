"""The sa_lens package: what ``import sa_lens`` loads, its version, and its public names."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys

import pytest

import sa_lens

HEAVY = ("matplotlib", "pandas", "circuitsvis", "transformer_lens")


def _fresh(code: str) -> str:
    """Run ``code`` in a new interpreter (this one has long imported everything) and return its stdout."""
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout


def test_import_loads_no_plotting_library_pandas_or_transformer_lens():
    loaded = json.loads(_fresh(f"import sys, json, sa_lens; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"))
    assert loaded == []


def test_analysis_loads_on_first_use_and_from_imports_work():
    out = _fresh(
        "import sys, sa_lens\n"
        "from sa_lens.analysis import trace_heads\n"
        "print(sa_lens.analysis.trace_heads is trace_heads, 'matplotlib' in sys.modules)\n"
        "sa_lens.analysis.plot_method_comparison\n"
        "print('matplotlib' in sys.modules)"
    )
    assert out.split() == ["True", "False", "True"]  # heads alone does not pull in the figures


def test_version_is_the_installed_distributions():
    assert sa_lens.__version__ == importlib.metadata.version("sa_lens")


def test_every_public_name_resolves():
    for name in sa_lens.__all__:
        assert getattr(sa_lens, name) is not None, name
    for name in sa_lens.analysis.__all__:
        assert callable(getattr(sa_lens.analysis, name)), name
    assert set(sa_lens.__all__) <= set(dir(sa_lens))


@pytest.mark.parametrize("module", [sa_lens, sa_lens.analysis], ids=["sa_lens", "analysis"])
def test_unknown_attribute_is_an_attribute_error(module):
    with pytest.raises(AttributeError, match="no_such_name"):
        module.no_such_name  # noqa: B018
