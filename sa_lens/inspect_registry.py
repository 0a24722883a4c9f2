"""Inspect's entry point into sa_lens (``[project.entry-points.inspect_ai]`` in pyproject.toml).

Inspect imports this module when it looks for a provider or task it does not know: it registers the ``sa_lens``
model provider (``--model sa_lens/<model>``; the class is imported on first use, see
:mod:`sa_lens.inspect_provider`) and the bundled tasks (``sa_lens/harmful_asr``, ``sa_lens/safe_over_refusal``,
:mod:`sa_lens.inspect_tasks`). Only Inspect imports it; ``import sa_lens`` never does.
"""

from __future__ import annotations

from inspect_ai.model import ModelAPI, modelapi

from sa_lens.inspect_tasks import harmful_asr, safe_over_refusal

__all__ = ["harmful_asr", "safe_over_refusal", "sa_lens_provider"]


@modelapi(name="sa_lens")
def sa_lens_provider() -> type[ModelAPI]:
    """The ``sa_lens`` provider class, imported when a model names it."""
    from sa_lens.inspect_provider import SaLensAPI

    return SaLensAPI
