"""Single-file checkpoints: family detection, EMA, and the exact diffusers -> original writer.

Round trips go through diffusers' own reader, ``StableDiffusionPipeline.from_single_file(...,
config=<folder>, local_files_only=True)``, so a wrong key map fails here however the
writer is built.
"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import pytest
import torch
import transformers
from diffusers import AutoencoderKL, UNet2DConditionModel
from packaging.version import Version
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig

from model_tools import single_file as sf
from model_tools.families import FAMILIES

REPO = Path(__file__).resolve().parent.parent


def keys_of(path: Path) -> list[str]:
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("single_file")


@pytest.fixture(scope="module")
def sd1_file(workdir) -> Path:
    return sf.write_single_file(REPO, workdir / "shipped-sd1.safetensors")


@pytest.fixture(scope="module")
def sd2_folder(workdir) -> Path:
    return sf.tiny_sd2_folder(workdir / "tiny-sd2")


@pytest.fixture(scope="module")
def sd2_file(workdir, sd2_folder) -> Path:
    return sf.write_single_file(sd2_folder, workdir / "tiny-sd2.safetensors")


def load_single_file(path: Path, config: Path, family: str = "sd1", **kwargs):
    """The file read by diffusers' own reader, into its family's pipeline."""
    family = FAMILIES[family]
    return getattr(diffusers, family.pipeline_class).from_single_file(
        str(path),
        config=str(config),
        local_files_only=True,
        **dict.fromkeys(family.unused_components),
        **family.pipeline_options,
        **kwargs,
    )


def assert_same_weights(pipe, folder: Path) -> None:
    for name in FAMILIES[sf.family_of_folder(folder)].components:
        expected = sf.read_weights(folder / name)
        got = getattr(pipe, name).state_dict()
        if name.startswith("text_encoder"):  # transformers >= 5.6 drops the text_model. prefix
            expected, got = sf.text_state(expected), sf.text_state(got)
        assert set(got) == set(expected), f"{name}: {sorted(set(got) ^ set(expected))[:5]}"
        unequal = [k for k in expected if not torch.equal(got[k].float(), expected[k].float())]
        assert not unequal, f"{name}: {len(unequal)} tensors differ, e.g. {unequal[:3]}"


# --- family detection ---------------------------------------------------------------------


def test_detects_sd1_from_clip_keys(sd1_file):
    assert sf.detect_family(keys_of(sd1_file)) == "sd1"


def test_detects_sd2_from_openclip_keys_with_fused_qkv(sd2_file):
    keys = keys_of(sd2_file)
    assert sf.detect_family(keys) == "sd2"
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert not any(".q_proj." in k for k in keys)


@pytest.mark.parametrize(
    "key, name",
    [
        ("conditioner.embedders.0.model.text_projection", "SDXL refiner"),
        ("edm_mean", "Playground"),
        ("model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight", "SD3"),
        ("model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale", "Flux"),
        ("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", "LoRA"),
    ],
)
def test_refuses_other_families_by_name(sd1_file, key, name):
    with pytest.raises(sf.UnsupportedCheckpoint, match=name):
        sf.detect_family([*keys_of(sd1_file), key])


def test_refuses_a_file_without_vae_naming_the_group(sd1_file):
    keys = [k for k in keys_of(sd1_file) if not k.startswith("first_stage_model.")]
    with pytest.raises(sf.UnsupportedCheckpoint, match=r"without a VAE: no first_stage_model\.\*"):
        sf.detect_family(keys)


def test_names_the_missing_keys_of_an_incomplete_text_encoder(sd2_file):
    gone = "cond_stage_model.model.ln_final.weight"
    keys = [k for k in keys_of(sd2_file) if k != gone]
    with pytest.raises(sf.UnsupportedCheckpoint, match="incomplete text encoder") as info:
        sf.detect_family(keys)
    assert gone in str(info.value)


def test_refuses_a_file_without_text_encoder_naming_both_layouts(sd1_file):
    keys = [k for k in keys_of(sd1_file) if not k.startswith("cond_stage_model.")]
    with pytest.raises(sf.UnsupportedCheckpoint) as info:
        sf.detect_family(keys)
    message = str(info.value)
    assert "cond_stage_model.transformer." in message and "cond_stage_model.model." in message


def test_refuses_an_inpainting_unet_by_its_input_channels(sd1_file):
    conv_in = "model.diffusion_model.input_blocks.0.0.weight"
    with pytest.raises(sf.UnsupportedCheckpoint, match="9 input channels"):
        sf.detect_family(keys_of(sd1_file), {conv_in: (64, 9, 3, 3)})
    assert sf.detect_family(keys_of(sd1_file), {conv_in: (64, 4, 3, 3)}) == "sd1"


def test_refuses_a_vae_alone(sd1_file):
    vae = [k.removeprefix("first_stage_model.") for k in keys_of(sd1_file) if "first_stage" in k]
    with pytest.raises(sf.UnsupportedCheckpoint, match="VAE on its own"):
        sf.detect_family(vae)


def test_refuses_a_diffusers_state_dict_and_an_empty_file():
    with pytest.raises(sf.UnsupportedCheckpoint, match="diffusers"):
        sf.detect_family(["down_blocks.0.resnets.0.conv1.weight"])
    with pytest.raises(sf.UnsupportedCheckpoint, match="no tensors"):
        sf.detect_family([])


# --- EMA ----------------------------------------------------------------------------------


def test_ema_weights_are_found_and_picked_only_when_asked(workdir, sd1_file):
    path = sf.write_single_file(REPO, workdir / "ema.safetensors", ema=True)
    state = load_file(str(path))
    assert sf.has_ema(state) and not sf.has_ema(keys_of(sd1_file))
    conv_in = "model.diffusion_model.input_blocks.0.0.weight"
    state[sf.ema_key(conv_in)] = state[sf.ema_key(conv_in)] + 1  # EMA differs from the live copy

    default = sf.select_unet_weights(state)
    assert sf.EMA_DEFAULT is False
    assert torch.equal(default[conv_in], state[conv_in])
    assert not sf.has_ema(default)
    picked = sf.select_unet_weights(state, use_ema=True)
    assert torch.equal(picked[conv_in], state[sf.ema_key(conv_in)])
    assert sf.detect_family(picked) == "sd1"

    with pytest.raises(sf.UnsupportedCheckpoint, match="no EMA copy"):
        sf.select_unet_weights(load_file(str(sd1_file)), use_ema=True)


def test_ema_key_is_ldms_flattened_name():
    key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    assert sf.ema_key(key) == "model_ema.diffusion_modelinput_blocks11proj_inweight"


# --- writer round trips -------------------------------------------------------------------


def test_shipped_model_round_trips_exactly_through_from_single_file(sd1_file):
    assert_same_weights(load_single_file(sd1_file, REPO), REPO)


def test_sd2_variant_round_trips_exactly_through_from_single_file(sd2_file, sd2_folder):
    pipe = load_single_file(sd2_file, sd2_folder)
    assert_same_weights(pipe, sd2_folder)
    assert pipe.tokenizer.pad_token == "!" and pipe.tokenizer.pad_token_id == 0
    assert pipe.text_encoder.config.hidden_act == "gelu"


# Keys only the full layout has: SD's 12 input/output blocks and mid-block attention; SDXL's 9,
# its ten-layer transformers, its pooled-text embedding and both text encoders.
LAYOUT_KEYS = {
    "sd1": ("output_blocks.11.1.proj_out.weight", "output_blocks.8.2.conv.weight"),
    "sd2": ("output_blocks.11.1.proj_out.weight", "output_blocks.8.2.conv.weight"),
    "sdxl": (
        "output_blocks.2.2.conv.weight",
        "input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight",
        "middle_block.1.transformer_blocks.9.ff.net.2.weight",
        "label_emb.0.2.weight",
    ),
}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_full_layout_miniature_round_trips_in_float32(workdir, family):
    """Each family's own block structure (mid-block and VAE attention, all input/output
    blocks), read back equal by diffusers."""
    folder = sf.miniature_folder(workdir / f"mini-{family}", family)
    path = sf.write_single_file(folder, workdir / f"mini-{family}.safetensors", dtype=torch.float32)
    keys = keys_of(path)
    assert sf.detect_family(keys) == family
    for key in (
        "model.diffusion_model.middle_block.1.proj_in.weight",
        *("model.diffusion_model." + k for k in LAYOUT_KEYS[family]),
        "first_stage_model.decoder.mid.attn_1.q.weight",
    ):
        assert key in keys
    with safe_open(str(path), framework="pt") as f:
        assert f.get_tensor("first_stage_model.encoder.mid.attn_1.k.weight").ndim == 4
        assert f.get_tensor("model.diffusion_model.out.2.weight").dtype == torch.float32
    assert_same_weights(load_single_file(path, folder, family), folder)


def test_sdxl_text_encoders_are_written_in_their_own_layouts(workdir):
    """CLIP ViT-L under transformers' names, ViT-bigG under OpenCLIP's: q/k/v fused, and the
    projection stored transposed ([width, projection]) as OpenCLIP multiplies by it."""
    folder = sf.miniature_folder(workdir / "mini-sdxl-text", "sdxl")
    path = sf.write_single_file(folder, workdir / "mini-sdxl-text.safetensors")
    keys = keys_of(path)
    clip, bigg = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."
    assert clip + "text_model.encoder.layers.1.self_attn.q_proj.weight" in keys
    assert bigg + "transformer.resblocks.1.attn.in_proj_weight" in keys
    assert not any(k.startswith(bigg) and "q_proj" in k for k in keys)
    with safe_open(str(path), framework="pt") as f:
        projection = f.get_tensor(bigg + "text_projection")
    stored = sf.read_weights(folder / "text_encoder_2")["text_projection.weight"]
    assert torch.equal(projection, stored.T.half())


def test_writes_float16_by_default_and_leaves_no_partial_file(sd1_file):
    with safe_open(str(sd1_file), framework="pt") as f:
        assert f.get_tensor("first_stage_model.quant_conv.weight").dtype == torch.float16
        ids = f.get_tensor("cond_stage_model.transformer.text_model.embeddings.position_ids")
        assert ids.dtype == torch.int64 and ids.tolist() == [list(range(77))]
    assert not list(sd1_file.parent.glob("*.partial"))
    assert sd1_file.stat().st_mode & 0o777 == 0o644


def test_refuses_a_unet_with_layers_the_original_layout_lacks(workdir):
    folder = workdir / "extra"
    for name in ("unet", "vae", "text_encoder"):
        (folder / name).mkdir(parents=True)
        (folder / name / "config.json").write_text((REPO / name / "config.json").read_text())
    unet = dict(sf.read_weights(REPO / "unet"))
    unet["add_embedding.linear_1.weight"] = torch.zeros(2, 2)
    save_file(unet, str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    for name, file in (("vae", "diffusion_pytorch_model"), ("text_encoder", "model")):
        save_file(sf.read_weights(REPO / name), str(folder / name / f"{file}.safetensors"))
    with pytest.raises(sf.UnsupportedCheckpoint, match="add_embedding.linear_1.weight"):
        sf.write_single_file(folder, workdir / "never.safetensors")
    assert not (workdir / "never.safetensors").exists()


# --- shipped configs ----------------------------------------------------------------------

# Published parameter counts of SD 1.5, SD 2.1 and SDXL base 1.0 (UNet, VAE, text encoders).
PARAMETERS = {
    "sd1": (859_520_964, 83_653_863, 123_060_480),
    "sd2": (865_910_724, 83_653_863, 340_387_840),
    "sdxl": (2_567_463_684, 83_653_863, 123_060_480, 694_659_840),
}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_configs_build_the_real_architectures(family):
    folder = sf.CONFIGS[family]
    with torch.device("meta"):
        modules = [
            UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")),
            AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")),
        ]
        for encoder in FAMILIES[family].text_encoders:
            text = json.loads((folder / encoder.component / "config.json").read_text())
            text = {k: v for k, v in text.items() if k != "architectures"}
            modules.append(getattr(transformers, encoder.model_class)(CLIPTextConfig(**text)))
    counts = tuple(sum(p.numel() for p in m.parameters()) for m in modules)
    assert counts == PARAMETERS[family]


def test_sdxl_configs_are_sdxl_base():
    folder = sf.CONFIGS["sdxl"]
    unet = json.loads((folder / "unet" / "config.json").read_text())
    assert unet["transformer_layers_per_block"] == [1, 2, 10]
    assert unet["attention_head_dim"] == [5, 10, 20] and unet["cross_attention_dim"] == 2048
    assert (unet["addition_embed_type"], unet["addition_time_embed_dim"]) == ("text_time", 256)
    assert unet["projection_class_embeddings_input_dim"] == 2816  # 6 x 256 + 1280 pooled
    vae = json.loads((folder / "vae" / "config.json").read_text())
    assert (vae["scaling_factor"], vae["force_upcast"]) == (0.13025, True)
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "EulerDiscreteScheduler"
    assert (scheduler["timestep_spacing"], scheduler["steps_offset"]) == ("leading", 1)


def test_prediction_type_sets_scheduler_and_native_size(tmp_path):
    import shutil

    shutil.copytree(sf.CONFIGS["sd2"], tmp_path / "m")
    read = lambda part, name: json.loads((tmp_path / "m" / part / name).read_text())  # noqa: E731
    assert read("scheduler", "scheduler_config.json")["prediction_type"] == "v_prediction"
    sf.apply_prediction_type(tmp_path / "m", "epsilon")
    assert read("scheduler", "scheduler_config.json")["prediction_type"] == "epsilon"
    assert read("unet", "config.json")["sample_size"] == 64
    with pytest.raises(ValueError, match="v_prediction"):
        sf.apply_prediction_type(tmp_path / "m", "sample")


# --- full size (opt-in) -------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["sd15", "sd21-768"])
def test_full_size_random_checkpoint_imports_with_the_shipped_configs(tmp_path, fixture):
    family = sf.FIXTURES[fixture]
    path = sf.save_checkpoint(sf.random_checkpoint(fixture), tmp_path / "model.safetensors")
    assert sf.detect_family(keys_of(path)) == family
    # diffusers 0.40 renamed torch_dtype to dtype; the base image's 0.33 knows only the old.
    new_name = Version(diffusers.__version__).release >= (0, 40)
    pipe = load_single_file(
        path, sf.CONFIGS[family], family, **{"dtype" if new_name else "torch_dtype": torch.float32}
    )
    stored = load_file(str(path))
    back = sf.to_original(
        family,
        pipe.unet.state_dict(),
        pipe.unet.config,
        pipe.vae.state_dict(),
        pipe.vae.config,
        pipe.text_encoder.state_dict(),
    )
    # SD 2.x never uses OpenCLIP's text_projection: diffusers drops it, the writer puts an
    # identity in its place.
    back.pop("cond_stage_model.model.text_projection", None)
    unequal = [k for k in back if not torch.equal(back[k].to(stored[k].dtype), stored[k])]
    assert not unequal, unequal[:5]
    assert path.stat().st_mode & 0o777 == 0o644
    with torch.no_grad():
        ids = pipe.tokenizer(["a cat"], padding="max_length", max_length=77, return_tensors="pt")
        text = pipe.text_encoder(ids.input_ids)[0]
        latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        noise = pipe.unet(latents, 999, encoder_hidden_states=text).sample
    assert noise.isfinite().all() and text.isfinite().all()
