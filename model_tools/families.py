"""The model families the importer knows, and what differs between them: one entry each.

Stable Diffusion 1.x and 2.x share a pipeline (``StableDiffusionPipeline``: a UNet, a VAE, one
CLIP-architecture text encoder and its tokenizer); SDXL has its own
(``StableDiffusionXLPipeline``: two text encoders and tokenizers). All three share the
single-file layout of the UNet and the VAE (``model.diffusion_model.*``,
``first_stage_model.*``). They differ in the text encoders (OpenAI's CLIP ViT-L/14, stored under
transformers' key names, or OpenCLIP ViT-H / ViT-bigG, stored under OpenCLIP's with q/k/v
fused), the token each tokenizer pads with, the configs, and the prediction types and sizes
their models come in. Family detection and the key maps (``model_tools.single_file``), the
import's conversion and writing (``model_tools.importer``) and the tokenizer files
(``model_tools.clip_bpe``) all read those facts here.

Adding a family is adding its entry to ``FAMILIES`` and its configs under ``configs/<key>/``
(``clip_bpe`` writes the tokenizer files), and taking its layout out of ``REFUSED``. A fact no
entry had before comes as a new field, with a default the other entries keep, and the one place
that reads it (SDXL's ``scheduler_markers``, read by the import's plan).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

CONFIG_ROOT = Path(__file__).resolve().parent / "configs"
EOS = "<|endoftext|>"


@dataclass(frozen=True)
class TextEncoder:
    """One text encoder of a family, with the tokenizer that feeds it."""

    component: str  # its folder in a diffusers model, and the pipeline's attribute
    tokenizer: str  # its tokenizer's folder and attribute
    prefix: str  # where a single-file checkpoint keeps its weights
    # How the keys under the prefix are named: "clip" (transformers' own names) or "openclip"
    # (OpenCLIP's, q/k/v fused as in_proj); single_file.key_maps has a map for each.
    layout: str
    architecture: str  # what it is, for messages
    width: int  # hidden size of the real model: how a diffusers folder shows its family
    # OpenAI's CLIP uses quick GELU, OpenCLIP GELU: how a miniature test model shows its family.
    hidden_act: str
    pad_token: str  # the text embedding at every padded position depends on it
    model_class: str = "CLIPTextModel"  # transformers' class


@dataclass(frozen=True, eq=False)
class Family:
    key: str  # the folder of its configs, and its name in code
    name: str
    short: str
    # A key prefix that only this family's single files have.
    marker: str
    text_encoders: tuple[TextEncoder, ...]
    # What the UNet predicts when the user does not say (it is not in the weights; the shipped
    # scheduler config says the same), and the native side in pixels of the models each
    # prediction type comes in; a prediction type not listed keeps the config's size.
    default_prediction: str
    native_sizes: Mapping[str, int]
    prediction_advice: str  # said beside the default, when the default was taken
    license: str  # the model card's, unless it has one
    card_tags: tuple[str, ...]
    pipeline_class: str  # diffusers' class
    # Pipeline parts the endpoint leaves empty (an imported model's are removed), and settings
    # the pipeline is built with and model_index.json records.
    unused_components: tuple[str, ...]
    pipeline_options: Mapping[str, object]
    # Keys some single files of the family carry (an empty tensor each) to say how the UNet was
    # trained, which its weights do not show, and the scheduler settings each one means.
    # ComfyUI and A1111 read SDXL's this way; --prediction-type wins over a marker's.
    scheduler_markers: Mapping[str, Mapping[str, object]] = field(default_factory=dict)

    @property
    def config(self) -> Path:
        """A complete diffusers folder without weights: ``config=`` for diffusers'
        ``from_single_file``, and the template of an imported model."""
        return CONFIG_ROOT / self.key

    @property
    def text_components(self) -> tuple[str, ...]:
        return tuple(encoder.component for encoder in self.text_encoders)

    @property
    def components(self) -> tuple[str, ...]:
        """The parts that hold weights, in the order the import reports them."""
        return ("unet", "vae", *self.text_components)

    @property
    def architectures(self) -> str:
        return " + ".join(encoder.architecture for encoder in self.text_encoders)

    @property
    def prediction_note(self) -> str:
        advice = f", {self.prediction_advice}" if self.prediction_advice else ""
        return f" (the {self.short} default{advice})"

    def markers_in(self, keys: Iterable[str]) -> dict[str, Mapping[str, object]]:
        """The scheduler markers among a single file's ``keys``, with what each one sets."""
        keys = set(keys)
        return {key: settings for key, settings in self.scheduler_markers.items() if key in keys}


# SD 1.x and 2.x pipelines have a safety checker; the endpoint leaves it out (safety is its own
# setting), so imported models say so in model_index.json.
_SD_UNUSED = ("safety_checker", "feature_extractor")
_SD_OPTIONS = {"requires_safety_checker": False}
_SD_TAGS = ("stable-diffusion", "stable-diffusion-diffusers", "text-to-image", "diffusers")

SD1 = Family(
    key="sd1",
    name="Stable Diffusion 1.x",
    short="SD 1.x",
    marker="cond_stage_model.transformer.",
    text_encoders=(
        TextEncoder(
            component="text_encoder",
            tokenizer="tokenizer",
            prefix="cond_stage_model.transformer.",
            layout="clip",
            architecture="CLIP ViT-L",
            width=768,
            hidden_act="quick_gelu",
            pad_token=EOS,
        ),
    ),
    default_prediction="epsilon",
    native_sizes={"epsilon": 512},
    prediction_advice="",
    license="creativeml-openrail-m",
    card_tags=_SD_TAGS,
    pipeline_class="StableDiffusionPipeline",
    unused_components=_SD_UNUSED,
    pipeline_options=_SD_OPTIONS,
)

SD2 = Family(
    key="sd2",
    name="Stable Diffusion 2.x",
    short="SD 2.x",
    marker="cond_stage_model.model.",
    text_encoders=(
        TextEncoder(
            component="text_encoder",
            tokenizer="tokenizer",
            prefix="cond_stage_model.model.",
            layout="openclip",
            architecture="OpenCLIP ViT-H",
            width=1024,
            hidden_act="gelu",
            pad_token="!",
        ),
    ),
    # SD 2.0-v and 2.1 (and their fine-tunes) are 768 px v-prediction models, which is also
    # what diffusers assumes for an SD 2.x file; the 512 px "base" models predict noise.
    default_prediction="v_prediction",
    native_sizes={"v_prediction": 768, "epsilon": 512},
    prediction_advice=(
        "for the 768x768 models; --prediction-type epsilon for the 512x512 'base' models"
    ),
    license="openrail++",
    card_tags=_SD_TAGS,
    pipeline_class="StableDiffusionPipeline",
    unused_components=_SD_UNUSED,
    pipeline_options=_SD_OPTIONS,
)

SDXL = Family(
    key="sdxl",
    name="Stable Diffusion XL",
    short="SDXL",
    marker="conditioner.embedders.",
    text_encoders=(
        TextEncoder(
            component="text_encoder",
            tokenizer="tokenizer",
            prefix="conditioner.embedders.0.transformer.",
            layout="clip",
            architecture="CLIP ViT-L",
            width=768,
            hidden_act="quick_gelu",
            pad_token=EOS,
        ),
        TextEncoder(
            component="text_encoder_2",
            tokenizer="tokenizer_2",
            prefix="conditioner.embedders.1.model.",
            layout="openclip",
            architecture="OpenCLIP ViT-bigG",
            width=1280,
            hidden_act="gelu",
            pad_token="!",
            # Its projected end-token state is the pooled embedding the UNet also takes.
            model_class="CLIPTextModelWithProjection",
        ),
    ),
    # SDXL base and most fine-tunes predict noise; the v-prediction ones (NoobAI-XL V-Pred and
    # the like) say so with a v_pred key, and all of them are 1024 px models.
    default_prediction="epsilon",
    native_sizes={"epsilon": 1024, "v_prediction": 1024},
    prediction_advice=(
        "--prediction-type v_prediction for a v-prediction model without a v_pred key"
    ),
    license="openrail++",
    card_tags=(
        "stable-diffusion-xl",
        "stable-diffusion-xl-diffusers",
        "text-to-image",
        "diffusers",
    ),
    pipeline_class="StableDiffusionXLPipeline",
    # Parts for IP-Adapters, which the endpoint does not load.
    unused_components=("image_encoder", "feature_extractor"),
    # An empty negative prompt encodes as zeros, as SDXL was trained and A1111 does.
    pipeline_options={"force_zeros_for_empty_prompt": True},
    scheduler_markers={
        "v_pred": {"prediction_type": "v_prediction"},
        # Zero terminal SNR: betas rescaled so the last step is pure noise, and the steps
        # spaced from the last timestep (the schedule it was trained with).
        "ztsnr": {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"},
    },
)

FAMILIES: dict[str, Family] = {family.key: family for family in (SD1, SD2, SDXL)}
CONFIGS = {key: family.config for key, family in FAMILIES.items()}
# How messages name what the importer takes.
SUPPORTED = "Stable Diffusion 1.x, 2.x and XL"
SUPPORTED_SHORT = "SD 1.x, 2.x and SDXL"

# Single files of other kinds, recognised by a key prefix or fragment and refused by name.
# (SDXL inpainting models have SDXL's keys and are refused by their UNet's 9 input channels.)
REFUSED = (
    (
        # SDXL base keeps bigG as embedders.1 beside CLIP-L; the refiner has bigG alone.
        "conditioner.embedders.0.model.",
        "the SDXL refiner (OpenCLIP ViT-bigG alone, as conditioner.embedders.0.model.*), "
        "which refines another model's images and draws none of its own",
    ),
    ("edm_mean", "Playground v2.5 (edm_mean: an SDXL-shaped model trained with EDM)"),
    ("text_encoders.clip_g.", "an SD3 checkpoint (text_encoders.clip_g.*)"),
    ("joint_blocks.", "an SD3 checkpoint (joint_blocks.*)"),
    ("double_blocks.", "a Flux checkpoint (double_blocks.*)"),
    ("single_transformer_blocks.", "a Flux checkpoint in diffusers layout"),
    ("lora_unet_", "a LoRA (lora_unet_*), not a model: pass it as a LoRA"),
    ("lora_te_", "a LoRA (lora_te_*), not a model: pass it as a LoRA"),
    (".lora_down.", "a LoRA (*.lora_down.*), not a model: pass it as a LoRA"),
    (".lora_A.", "a LoRA (*.lora_A.*), not a model: pass it as a LoRA"),
    ("control_model.", "a ControlNet (control_model.*)"),
    ("down_blocks.0.resnets.0.conv1.weight", "a diffusers component (diffusers key names)"),
)


def of_config(folder: Path) -> Family | None:
    """The family whose shipped configs ``folder`` is, if it is one of them."""
    folder = Path(folder).resolve()
    return next((f for f in FAMILIES.values() if f.config.resolve() == folder), None)


def best_match(candidates: Iterable[Family], fits: Callable[[TextEncoder], bool]) -> Family | None:
    """The family all of whose text encoders ``fits``; of several, the one with the most (a
    family's first text encoder can be another family's only one)."""
    found = [f for f in candidates if all(fits(encoder) for encoder in f.text_encoders)]
    return max(found, key=lambda f: len(f.text_encoders), default=None)
