"""Adding a LoRA to a repository (``scripts/import_model.sh --add-lora``, which runs
``python -m model_tools.lora_files``): checked against the model the repository serves,
copied into ``loras/`` in one rename, and the repository left exactly as it was when refused.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from servers import clean_environ

from model_tools.importer import ImportFailed
from model_tools.lora_files import add_lora, random_lora, save_file
from sd_endpoint.loader import REPO_ROOT, load_handler
from tests.test_loras import ATTENTION, REQUEST, kohya, model_folder


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry under ``folder`` (links not followed): kind, size, time and content."""
    entries = {}
    for path in sorted(folder.rglob("*")):
        info = path.lstat()
        content = "" if path.is_symlink() or path.is_dir() else hashlib.sha256(path.read_bytes())
        entries[str(path.relative_to(folder))] = (
            path.is_symlink(),
            path.is_dir(),
            info.st_size,
            info.st_mtime_ns,
            content if isinstance(content, str) else content.hexdigest(),
        )
    return entries


@pytest.fixture(scope="module")
def sample(handler):
    """A random LoRA of kohya's default layout for the shipped model."""
    return random_lora(handler.engine.pipe, rank=4, seed=3, strength=0.5)


@pytest.fixture
def repo(tmp_path):
    return model_folder(tmp_path / "repo")


def test_adding_a_lora_copies_it_into_loras_and_the_endpoint_serves_it(repo, sample, tmp_path):
    source = save_file(sample, tmp_path / "ink.safetensors")
    done = subprocess.run(
        [sys.executable, "-m", "model_tools.lora_files", "--add-lora", str(source),
         "--out", str(repo)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=clean_environ(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    added = repo / "loras" / "ink.safetensors"
    assert f"added {added}" in done.stdout and '"loras": {"ink": 0.8}' in done.stdout
    assert added.read_bytes() == source.read_bytes()
    assert [p.name for p in repo.iterdir() if p.name.startswith(".")] == []  # no staging left
    handler = load_handler(repo)
    assert handler.engine.adapters.names == ("ink",)
    assert handler.engine.adapters.hashes["ink"] in done.stdout
    with_it = handler({**REQUEST, "loras": {"ink": 1}})["image"]
    assert with_it != handler(REQUEST)["image"]


def test_a_pickle_is_converted_with_allow_pickle_under_the_name_given(repo, sample, tmp_path):
    pickle = tmp_path / "old.ckpt"
    torch.save(sample, pickle)
    add_lora(pickle, "old-style", allow_pickle=True, repo=repo)
    written = load_file(str(repo / "loras" / "old-style.safetensors"))
    assert written.keys() == sample.keys()
    assert all(torch.equal(written[k], sample[k]) for k in sample)
    assert load_handler(repo).engine.adapters.names == ("old-style",)


REFUSALS = {
    "a pickle without --allow-pickle": ("old.ckpt", None, {}, ["pickle", "--allow-pickle"]),
    "another model family": (
        "sd15.safetensors",
        kohya(f"lora_unet_{ATTENTION}_attn2_to_k", 768, 128),
        {},
        ["loras/sd15.safetensors", "made for SD 1.x"],
    ),
    "not a LoRA": ("w.safetensors", {"weight": torch.zeros(3)}, {}, ["no LoRA layers"]),
    "layers the model lacks": (
        "partly.safetensors",
        kohya(f"lora_unet_{ATTENTION}_attn1_to_q", 128, 128)
        | kohya("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", 64, 64),
        {},
        ["only 1 of its 2 LoRA layers"],
    ),
    "a name requests cannot write": (
        "ink.safetensors",
        "sample",
        {"name": "ink style!"},
        ["'ink style!'", "--name"],
    ),
    "a name already taken": ("ink.safetensors", "sample", {"taken": True}, ["already exists"]),
    "not safetensors": ("notes.txt", "text", {}, ["not a .safetensors file"]),
    "no such file": ("missing.safetensors", "absent", {}, ["no such file"]),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_refused_lora_leaves_the_repository_exactly_as_it_was(repo, sample, tmp_path, case):
    file_name, content, options, words = REFUSALS[case]
    source = tmp_path / file_name
    if content is None:
        torch.save(sample, source)
    elif content == "sample":
        save_file(sample, source)
    elif content == "text":
        source.write_text("not weights\n")
    elif isinstance(content, dict):
        save_file(content, source)
    if options.get("taken"):
        (repo / "loras").mkdir()
        save_file(sample, repo / "loras" / "ink.safetensors")
    before = snapshot(repo)
    with pytest.raises(ImportFailed) as caught:
        add_lora(source, options.get("name"), allow_pickle=False, repo=repo)
    for word in words:
        assert word in str(caught.value), str(caught.value)
    assert snapshot(repo) == before


def test_the_command_says_what_was_wrong_and_that_nothing_changed(repo, tmp_path):
    source = save_file(kohya(f"lora_unet_{ATTENTION}_attn2_to_k", 768, 128), tmp_path / "x.pt")
    done = subprocess.run(
        [sys.executable, "-m", "model_tools.lora_files", "--add-lora", str(source),
         "--out", str(repo)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=clean_environ(),
    )  # fmt: skip
    assert done.returncode == 1
    assert "error: --add-lora x.pt is a pickle file" in done.stderr
    assert f"nothing was changed in {repo}" in done.stderr
    assert not (repo / "loras").exists()
