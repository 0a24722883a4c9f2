"""circuitsvis views: the right heads and values, and a standalone page."""

from __future__ import annotations

import json
import re

import pytest
import torch

from sa_lens.analysis.views import attention_view, projection_view, save_html


def _props(view) -> dict:
    # The last JSON object passed to render(...) in the CDN source holds the element's props.
    return json.loads(re.search(r"render\(\s*\"[^\"]+\",\s*\w+,\s*(\{.*\})\s*\)", view.cdn_src, re.S).group(1))


def test_attention_view_shows_each_requested_head_with_causal_rows(tiny_bridge):
    view = attention_view(tiny_bridge, "Write a poem about the sea", [(1, 2), (0, 0)])
    props = _props(view)
    assert props["attentionHeadNames"] == ["L1H2", "L0H0"]
    attention = torch.tensor(props["attention"])
    assert attention.shape[0] == 2 and attention.shape[1] == len(props["tokens"])
    torch.testing.assert_close(attention.sum(-1), torch.ones(attention.shape[:2]), atol=1e-4, rtol=0)
    assert torch.triu(attention, diagonal=1).abs().max() == 0


def test_attention_view_rejects_heads_outside_the_model(tiny_bridge):
    with pytest.raises(ValueError, match="outside the model"):
        attention_view(tiny_bridge, "hi", [(5, 0)])


def test_projection_view_values_are_the_residual_projection(tiny_bridge):
    direction = torch.zeros(tiny_bridge.cfg.n_layers, tiny_bridge.cfg.d_model)
    direction[:, 3] = 5.0  # unit e3: the projection is coordinate 3 of the residual
    view = projection_view(tiny_bridge, "Write a poem about the sea", direction, layers=[1])
    props = _props(view)
    seen = {}
    text = tiny_bridge.tokenizer.apply_chat_template([{"role": "user", "content": "Write a poem about the sea"}],
                                                     tokenize=False, add_generation_prompt=True)
    ids = tiny_bridge.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad(), tiny_bridge.hooks(fwd_hooks=[("blocks.1.hook_resid_post", lambda x, hook: seen.setdefault("r", x))]):
        tiny_bridge(ids)
    torch.testing.assert_close(torch.tensor(props["values"])[:, 0], seen["r"][0, :, 3], atol=1e-4, rtol=1e-4)


def test_save_html_writes_an_offline_page(tiny_bridge, tmp_path):
    view = attention_view(tiny_bridge, "hi there", [(0, 1)])
    path = save_html({"harmful <prompt>": view}, tmp_path / "v" / "views.html", title="Top heads")
    page = path.read_text()
    assert "harmful &lt;prompt&gt;" in page and "<h1>Top heads</h1>" in page
    assert "unpkg.com" not in page and "CircuitsVis.render" in page
