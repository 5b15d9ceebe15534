"""model_tools.importer: every source into a folder the handler serves, and every bad input
refused with one message and the target folder left byte for byte as it was.

Images are compared through the handler (handler.py loaded by file path, as the runtime
does), same request, same seed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model_tools import importer
from model_tools import single_file as sf
from sd_endpoint.loader import REPO_ROOT, load_handler
from tests.conftest import decode_image

REQUEST = {"inputs": "a red circle on a white background", "seed": 3, "inference_steps": 4}
# The model entries the shipped (SD 1.x) model has: a stand-in for a repository's own model.
SHIPPED_ENTRIES = [name for name in importer.MODEL_ENTRIES if (REPO_ROOT / name).exists()]
PLAIN_LOAD = """
import sys, numpy, torch
from diffusers import StableDiffusionPipeline
for folder in sys.argv[1:]:
    pipe = StableDiffusionPipeline.from_pretrained(folder)  # what the Hub's snippet does
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert numpy.isfinite(image).all() and image.std() > 0, "blank image"
    print("generated", folder, {n: str(getattr(pipe, n).dtype) for n in ("unet", "text_encoder")})
"""


def run_import(*args, capsys=None) -> tuple[int, str, str]:
    code = importer.main([str(a) for a in args])
    out, err = capsys.readouterr() if capsys else ("", "")
    return code, out, err


def tree_digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (dot files included) with its SHA-256."""
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def serve(folder: Path):
    """The folder's EndpointHandler, built by the runtime's loader (handler.py linked in)."""
    if not (folder / "handler.py").exists():
        (folder / "handler.py").symlink_to(REPO_ROOT / "handler.py")
    return load_handler(folder)


def pixels(handler, request=REQUEST) -> np.ndarray:
    return np.asarray(decode_image(handler(request)["image"]), dtype=np.int16)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("import")


@pytest.fixture(scope="module")
def shipped_pixels() -> np.ndarray:
    return pixels(load_handler(REPO_ROOT))


@pytest.fixture(scope="module")
def sd1_file(work) -> Path:
    return sf.write_single_file(REPO_ROOT, work / "shipped-sd1.safetensors")


@pytest.fixture(scope="module")
def target(work) -> Path:
    """A stand-in for a model repo: the shipped model plus files the import must not touch."""
    folder = work / "repo" / "target"  # alone in its parent, which must stay clean too
    folder.parent.mkdir()
    for name in SHIPPED_ENTRIES:
        source = REPO_ROOT / name
        if source.is_dir():
            shutil.copytree(source, folder / name)
        else:
            folder.mkdir(exist_ok=True)
            shutil.copy(source, folder / name)
    (folder / "README.md").write_text("---\nlicense: mit\ntags:\n- mine\n---\n\n# My model\n")
    (folder / "notes.txt").write_text("not part of the model\n")
    return folder


# --- sources ----------------------------------------------------------------------------------


def test_single_file_round_trip_gives_the_shipped_images(work, sd1_file, shipped_pixels, capsys):
    out = work / "from-sd1-file"
    code, stdout, _ = run_import(sd1_file, "--config", REPO_ROOT, "--out", out, capsys=capsys)
    assert code == 0
    for line in (
        "family           Stable Diffusion 1.x",
        "native size      64x64",
        "prediction type  epsilon",
        "dtype            float16",
        "hf upload",
    ):
        assert line in stdout
    assert "check            loaded as the endpoint does" in stdout
    difference = np.abs(pixels(serve(out)) - shipped_pixels)
    assert difference.max() == 0, f"images differ by up to {difference.max()} levels"


def test_sd2_layout_round_trip_gives_the_source_images(work, capsys):
    source = sf.tiny_sd2_folder(work / "tiny-sd2")
    checkpoint = sf.write_single_file(source, work / "tiny-sd2.safetensors", dtype=torch.float32)
    out = work / "from-sd2-file"
    code, stdout, _ = run_import(
        checkpoint,
        "--config",
        source,
        "--out",
        out,
        "--dtype",
        "float32",
        "--skip-check",
        capsys=capsys,
    )
    assert code == 0
    assert "family           Stable Diffusion 2.x" in stdout
    tokenizer = json.loads((out / "tokenizer" / "special_tokens_map.json").read_text())
    assert tokenizer["pad_token"] == "!"  # SD 2.x pads with "!", not <|endoftext|>
    assert np.abs(pixels(serve(out)) - pixels(serve(source))).max() == 0


def test_ema_weights_are_taken_only_when_asked(work, capsys):
    state = load_file(str(sf.write_single_file(REPO_ROOT, work / "plain.safetensors")))
    sf.add_ema(state)
    ema_keys = [k for k in state if k.startswith("model_ema.diffusion_model")]
    for key in ema_keys:  # EMA copies that differ from the regular weights
        state[key] = state[key] + 1
    checkpoint = sf.save_checkpoint(state, work / "with-ema.safetensors")
    for flag, offset in (([], 0), (["--ema"], 1)):
        out = work / f"ema{len(flag)}"
        code, stdout, _ = run_import(
            checkpoint, "--config", REPO_ROOT, "--out", out, "--skip-check", *flag, capsys=capsys
        )
        assert code == 0 and "EMA weights" in stdout
        written = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
        shipped = load_file(str(REPO_ROOT / "unet" / "diffusion_pytorch_model.safetensors"))
        key = "conv_in.weight"
        assert torch.equal(written[key], shipped[key] + offset)


def test_diffusers_folder_source_writes_a_complete_repo(target, shipped_pixels, capsys):
    before = tree_digest(target)
    code, stdout, _ = run_import(
        REPO_ROOT, "--out", target, "--base-model", "me/base", capsys=capsys
    )
    assert code == 0, stdout
    after = tree_digest(target)
    assert after["notes.txt"] == before["notes.txt"]  # only the model's own files are replaced
    # The weights are the shipped ones, in files both library stacks read.
    for name, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model")):
        written = load_file(str(target / name / f"{stem}.safetensors"))
        shipped = load_file(str(REPO_ROOT / name / f"{stem}.safetensors"))
        assert (
            all(torch.equal(written[k], shipped[k]) for k in shipped)
            and written.keys() == shipped.keys()
        )
    with safe_open(str(target / "text_encoder" / "model.safetensors"), "pt") as f:
        assert all(k.startswith("text_model.") for k in f.keys())  # noqa: SIM118
    assert {p.name for p in (target / "tokenizer").iterdir()} == set(importer.TOKENIZER_FILES)
    index = json.loads((target / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None]
    # LFS for the weights, and the card's front matter kept and completed.
    assert (
        "*.safetensors filter=lfs diff=lfs merge=lfs -text"
        in (target / ".gitattributes").read_text()
    )
    meta, body = importer.split_front_matter((target / "README.md").read_text())
    assert meta["license"] == "mit" and "mine" in meta["tags"] and meta["base_model"] == "me/base"
    assert "text-to-image" in meta["tags"] and body.strip() == "# My model"
    assert np.abs(pixels(serve(target)) - shipped_pixels).max() == 0


def test_replacing_the_vae(work, sd1_file, capsys):
    # A "fine-tuned" VAE: the shipped one with its decoder changed, in both file layouts.
    vae = load_file(str(REPO_ROOT / "vae" / "diffusion_pytorch_model.safetensors"))
    vae = {k: (v * 1.5 if k.startswith("decoder.") else v) for k, v in vae.items()}
    diffusers_file = work / "vae-diffusers.safetensors"
    save_file(vae, str(diffusers_file))
    original = {
        k.removeprefix(sf.VAE): v
        for k, v in load_file(str(sd1_file)).items()
        if k.startswith(sf.VAE)
    }
    original = {k: (v * 1.5 if k.startswith("decoder.") else v) for k, v in original.items()}
    original_file = work / "vae-original.safetensors"
    save_file(original, str(original_file))
    for vae_file in (diffusers_file, original_file):
        out = work / f"vae-{vae_file.stem}"
        code, stdout, _ = run_import(
            REPO_ROOT, "--vae", vae_file, "--out", out, "--skip-check", capsys=capsys
        )
        assert code == 0 and f"VAE replaced by {vae_file.name}" in stdout
        written = load_file(str(out / "vae" / "diffusion_pytorch_model.safetensors"))
        assert written.keys() == vae.keys()
        assert all(torch.equal(written[k], vae[k]) for k in vae), vae_file.name


# --- LoRA -------------------------------------------------------------------------------------


def make_lora(folder: Path) -> dict[str, Path]:
    """A rank-4 LoRA on the shipped UNet's attention and text encoder, built with peft, saved
    in the diffusers format and in kohya's (A1111's) format."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    pipe = StableDiffusionPipeline.from_pretrained(REPO_ROOT, safety_checker=None)
    torch.manual_seed(0)
    states = {}
    for name, targets in (
        ("unet", ["to_q", "to_k", "to_v", "to_out.0"]),
        ("text_encoder", ["q_proj", "k_proj", "v_proj", "out_proj"]),
    ):
        config = LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False)
        module = inject_adapter_in_model(config, getattr(pipe, name))
        states[name] = {k: v * 0.5 for k, v in get_peft_model_state_dict(module).items()}
    folder.mkdir(exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=convert_state_dict_to_diffusers(states["unet"]),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(states["text_encoder"]),
        weight_name="diffusers-lora.safetensors",
    )
    kohya = {}
    for prefix, state in (("lora_unet_", states["unet"]), ("lora_te_", states["text_encoder"])):
        for key, tensor in state.items():
            module, _, part = key.partition(".lora_")
            if prefix == "lora_te_" and not module.startswith("text_model."):
                module = "text_model." + module  # transformers >= 5.6 names drop the prefix
            name = prefix + module.replace(".", "_")
            kohya[f"{name}.lora_{'down' if part.startswith('A') else 'up'}.weight"] = tensor
            kohya[f"{name}.alpha"] = torch.tensor(4.0)
    save_file({k: v.contiguous() for k, v in kohya.items()}, str(folder / "kohya-lora.safetensors"))
    return {
        "diffusers": folder / "diffusers-lora.safetensors",
        "kohya": folder / "kohya-lora.safetensors",
    }


@pytest.fixture(scope="module")
def loras(work) -> dict[str, Path]:
    return make_lora(work / "loras")


@pytest.fixture(scope="module")
def runtime_lora_image(loras) -> np.ndarray:
    """The LoRA loaded at run time on the source model, not fused."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(REPO_ROOT, safety_checker=None)
    pipe.load_lora_weights(str(loras["diffusers"].parent), weight_name=loras["diffusers"].name)
    return generate(pipe)


def generate(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        REQUEST["inputs"],
        num_inference_steps=4,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]
    return image * 255


# Fusing W + BA into float32 weights rounds differently from adding BAx at run time: the
# images agree to within this many 8-bit levels (float16 weights add their own rounding).
LORA_TOLERANCE = {"float32": 0.5, "float16": 3.0}


@pytest.mark.parametrize("form, dtype", [("diffusers", "float32"), ("kohya", "float16")])
def test_fused_lora_equals_the_lora_loaded_at_run_time(
    work, loras, runtime_lora_image, form, dtype, capsys
):
    from diffusers import StableDiffusionPipeline

    out = work / f"lora-{form}"
    code, stdout, _ = run_import(
        REPO_ROOT,
        "--lora",
        f"{loras[form]}:1.0",
        "--out",
        out,
        "--dtype",
        dtype,
        "--skip-check",
        capsys=capsys,
    )
    assert code == 0
    assert "unet" in stdout and "text_encoder" in stdout  # both halves of the LoRA applied
    fused = generate(StableDiffusionPipeline.from_pretrained(out, safety_checker=None))
    base = generate(StableDiffusionPipeline.from_pretrained(REPO_ROOT, safety_checker=None))
    assert np.abs(runtime_lora_image - base).max() > 20  # the LoRA changes the picture
    assert np.abs(fused - runtime_lora_image).max() <= LORA_TOLERANCE[dtype]


def test_lora_scale_zero_is_refused_as_changing_nothing(work, loras, capsys):
    target = work / "untouched"
    code, _, err = run_import(
        REPO_ROOT, "--lora", f"{loras['kohya']}:0", "--out", target, capsys=capsys
    )
    assert code == 1 and "matched none" in err and not target.exists()


# --- bad input --------------------------------------------------------------------------------


@pytest.fixture
def guarded(target):
    """The target folder, hashed before a failing import and compared after it."""
    before = tree_digest(target)
    siblings = set(target.parent.iterdir())
    yield target
    assert tree_digest(target) == before
    assert set(target.parent.iterdir()) == siblings  # no temporary folder left behind


def refuse(capsys, *args) -> str:
    code, stdout, err = run_import(*args, capsys=capsys)
    assert code == 1, stdout
    assert err.startswith("error: ") and err.count("error: ") == 1
    return err.splitlines()[0]


def test_refuses_a_file_that_is_not_safetensors(work, guarded, capsys):
    path = work / "model.txt"
    path.write_text("hello")
    assert "model.txt is not a .safetensors file" in refuse(capsys, path, "--out", guarded)


def test_refuses_a_truncated_file(work, sd1_file, guarded, capsys):
    path = work / "truncated.safetensors"
    path.write_bytes(sd1_file.read_bytes()[: sd1_file.stat().st_size // 2])
    message = refuse(capsys, path, "--out", guarded)
    assert "truncated.safetensors is not a readable safetensors file" in message


def test_refuses_random_bytes(work, guarded, capsys):
    path = work / "corrupt.safetensors"
    path.write_bytes(os.urandom(4096))
    assert "not a readable safetensors file" in refuse(capsys, path, "--out", guarded)


def test_refuses_a_pickle_unless_allowed(work, sd1_file, guarded, capsys):
    path = work / "model.ckpt"
    torch.save({"state_dict": load_file(str(sd1_file))}, path)
    message = refuse(capsys, path, "--out", guarded)
    assert "model.ckpt is a pickle file" in message and "--allow-pickle" in message


def test_a_pickle_that_runs_code_is_refused_even_when_allowed(work, guarded, capsys):
    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(work / "pwned"),))

    path = work / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": Payload()}, path)
    message = refuse(capsys, path, "--out", guarded, "--allow-pickle")
    assert "weights-only" in message and not (work / "pwned").exists()


def test_allowed_pickle_is_converted(work, sd1_file, shipped_pixels, capsys):
    path = work / "allowed.ckpt"
    torch.save({"state_dict": load_file(str(sd1_file))}, path)
    out = work / "from-pickle"
    code, _, _ = run_import(
        path, "--allow-pickle", "--config", REPO_ROOT, "--out", out, capsys=capsys
    )
    assert code == 0
    assert np.abs(pixels(serve(out)) - shipped_pixels).max() == 0


def test_a_folder_of_pickle_weights_is_refused_unless_allowed(
    work, guarded, shipped_pixels, capsys
):
    folder = work / "pickled-folder"
    folder.mkdir()
    for name in SHIPPED_ENTRIES:
        source = REPO_ROOT / name
        if source.is_dir():
            shutil.copytree(source, folder / name)
        else:
            shutil.copy(source, folder / name)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(weights)), weights.with_suffix(".bin"))
    weights.unlink()
    message = refuse(capsys, folder, "--out", guarded)
    assert "holds only pickle weights (diffusion_pytorch_model.bin)" in message
    assert "--allow-pickle" in message
    out = work / "from-pickled-folder"
    code, _, _ = run_import(folder, "--allow-pickle", "--out", out, "--skip-check", capsys=capsys)
    assert code == 0
    assert np.abs(pixels(serve(out)) - shipped_pixels).max() == 0
    weights.with_suffix(".bin").unlink()
    assert "unet holds no weights" in refuse(capsys, folder, "--allow-pickle", "--out", guarded)


def test_refuses_the_sdxl_refiner_naming_it(work, guarded, capsys):
    path = work / "sdxl-refiner.safetensors"
    save_file(
        {
            "conditioner.embedders.0.model.text_projection": torch.zeros(1),
            "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1),
        },
        str(path),
    )
    assert "the SDXL refiner" in refuse(capsys, path, "--out", guarded)


@pytest.mark.parametrize("part", ["first_stage_model.", "cond_stage_model."])
def test_refuses_a_checkpoint_missing_a_component(work, sd1_file, guarded, part, capsys):
    path = work / f"without-{part[:-1]}.safetensors"
    save_file(
        {k: v for k, v in load_file(str(sd1_file)).items() if not k.startswith(part)}, str(path)
    )
    message = refuse(capsys, path, "--config", REPO_ROOT, "--out", guarded)
    assert {"first_stage_model.": "VAE", "cond_stage_model.": "text encoder"}[part] in message


def test_refuses_a_lora_that_matches_nothing(work, guarded, capsys):
    path = work / "other-model-lora.safetensors"
    save_file(
        {
            "lora_unet_no_such_layer.lora_down.weight": torch.ones(4, 8),
            "lora_unet_no_such_layer.lora_up.weight": torch.ones(8, 4),
        },
        str(path),
    )
    message = refuse(capsys, REPO_ROOT, "--lora", path, "--out", guarded)
    assert "other-model-lora.safetensors" in message


def test_refuses_missing_files_before_any_work(work, guarded, capsys):
    assert "no such file" in refuse(
        capsys, REPO_ROOT, "--lora", work / "nope.safetensors", "--out", guarded
    )
    assert "no such file" in refuse(
        capsys, REPO_ROOT, "--vae", work / "nope.safetensors", "--out", guarded
    )
    assert "neither a file, a folder nor a Hub repo id" in refuse(
        capsys, "no such thing", "--out", guarded
    )


def test_hub_source_offline_says_what_to_do(guarded, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = refuse(capsys, "someone/some-model", "--out", guarded)
    assert "cannot reach the Hugging Face Hub" in message and "as SOURCE" in message


@pytest.fixture
def small_disk(work):
    """A 3 MiB filesystem, which fills up while the model (8 MiB) is written."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    mount = work / "small-disk"
    mount.mkdir(exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3M", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.parametrize("when", ["foreseen", "while writing"])
def test_a_disk_that_fills_leaves_the_target_as_it_was(small_disk, when, capsys, monkeypatch):
    target = small_disk / "repo"
    target.mkdir()
    (target / "model_index.json").write_text("{}\n")
    (target / "README.md").write_text("---\nlicense: mit\n---\nmine\n")
    before = tree_digest(target)
    if when == "while writing":  # past the estimate of the space needed, into a real ENOSPC
        monkeypatch.setattr(importer.write, "free_space_check", lambda plan, n_bytes: None)
    message = refuse(capsys, REPO_ROOT, "--out", target)
    expected = "not enough disk space" if when == "foreseen" else "the disk filled up"
    assert expected in message
    assert tree_digest(target) == before
    assert sorted(p.name for p in small_disk.iterdir()) == ["repo"]


# --- the default load ---------------------------------------------------------------------------


def other_python() -> list[str]:
    return [os.environ["SD_OTHER_PYTHON"]] if os.environ.get("SD_OTHER_PYTHON") else []


def test_plain_from_pretrained_generates_in_both_stacks(work, sd1_file, capsys):
    """The Hub's usage snippet, `from_pretrained(repo)` with no arguments, on the shipped model
    and on an imported one, in this stack and the other (SD_OTHER_PYTHON, as scripts/test.sh
    sets it)."""
    imported = work / "plain"
    code, _, _ = run_import(
        sd1_file, "--config", REPO_ROOT, "--out", imported, "--skip-check", capsys=capsys
    )
    assert code == 0
    for python in [sys.executable, *other_python()]:
        result = subprocess.run(
            [python, "-c", PLAIN_LOAD, str(REPO_ROOT), str(imported)],
            capture_output=True,
            text=True,
            cwd=REPO_ROOT,
            timeout=600,
        )
        assert result.returncode == 0, f"{python}: {result.stderr[-1500:]}"
        assert result.stdout.count("generated") == 2


# --- full size (opt-in) ------------------------------------------------------------------------

MEASURED = """
import json, resource, runpy, sys, time
started = time.perf_counter()
try:
    sys.argv = sys.argv[1:]
    runpy.run_module(sys.argv[0], run_name="__main__")
except SystemExit as exit:
    assert not exit.code, exit.code
finally:
    print(json.dumps({"seconds": time.perf_counter() - started,
                      "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""
SERVE = """
import json, os, resource, sys, time
os.environ["SD_WARMUP"] = ""  # time the load alone, then the request
started = time.perf_counter()
from sd_endpoint.loader import load_handler
handler = load_handler(sys.argv[1])
loaded = time.perf_counter()
from sd_endpoint.weights import check_loaded
check_cpu = time.process_time()
check_loaded(handler.engine.pipe, sys.argv[1])  # again, timed alone (it ran in the load too)
check_cpu = time.process_time() - check_cpu
checked = time.perf_counter()
response = handler({"inputs": "an astronaut riding a horse", "height": 256, "width": 256,
                    "inference_steps": 2, "seed": 0})
print(json.dumps({"load_s": loaded - started, "request_s": time.perf_counter() - checked,
                  "check_s": checked - loaded, "check_cpu_s": check_cpu,
                  "per_step_s": handler.last_timings["denoising"] / 2,
                  "timings": handler.last_timings, "image_chars": len(response["image"]),
                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def measured(*command: str | Path, cwd: Path = REPO_ROOT) -> tuple[dict, str]:
    result = subprocess.run(
        [sys.executable, "-c", MEASURED, *map(str, command)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=3600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("fixture, native", [("sd15", 512), ("sd21-768", 768)])
def test_full_size_single_file_imports_and_serves(tmp_path, fixture, native):
    """SD 1.5's and SD 2.1-768's exact architectures (random weights) as single files,
    imported and served through the handler: the figures of docs/import.md come from here
    (`pytest -m slow -s tests/test_import.py -k full_size`)."""
    checkpoint = tmp_path / f"{fixture}.safetensors"
    made, _ = measured(
        "model_tools.single_file", "random", "--family", fixture, "--out", checkpoint
    )
    repo = tmp_path / "repo"
    # The serving step below loads it the endpoint's way: the import's own check would repeat it.
    imported, summary = measured("model_tools.importer", checkpoint, "--out", repo, "--skip-check")
    assert f"native size      {native}x{native}" in summary
    (repo / "handler.py").symlink_to(REPO_ROOT / "handler.py")
    result = subprocess.run(
        [sys.executable, "-c", SERVE, str(repo)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=3600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    served = json.loads(result.stdout.strip().splitlines()[-1])
    assert served["image_chars"] > 1000
    size = sum(p.stat().st_size for p in repo.rglob("*") if p.is_file())
    print(
        f"\n{fixture}: checkpoint {checkpoint.stat().st_size / 2**30:.2f} GiB written in "
        f"{made['seconds']:.0f} s | import {imported['seconds']:.0f} s, peak RSS "
        f"{imported['peak_rss_gib']:.1f} GiB, {size / 2**30:.2f} GiB on disk | handler load "
        f"{served['load_s']:.1f} s, 256x256 2-step request {served['request_s']:.1f} s, "
        f"{served['per_step_s']:.2f} s per step, peak RSS {served['peak_rss_gib']:.1f} GiB | "
        f"start-up weights check {served['check_s'] * 1000:.0f} ms "
        f"({served['check_cpu_s'] * 1000:.0f} ms CPU)\n"
        + "\n".join(line for line in summary.splitlines() if line.startswith("  "))
    )
