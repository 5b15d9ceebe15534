"""Import a Stable Diffusion model into this repository: ``python -m model_tools.importer``
(cli.py says how). One module per step, in the order an import takes them:

    cli.py       arguments, the plan (everything checked before any work), the run, the summary
    plan.py      the Plan and the one error an import reports (ImportFailed)
    sources.py   reading sources: single files, pickles, diffusers folders, Hub repos
    convert.py   loading the source into one diffusers pipeline; prediction type, native size
    edit.py      another VAE, LoRAs fused in, the model card
    write.py     the folder both library stacks load, its check, the all-or-nothing swap

What differs between model families (configs, key names, sizes, tokenizers) is read from
``model_tools.families``; single-file layouts from ``model_tools.single_file``.
"""

from .cli import main
from .edit import join_front_matter, split_front_matter
from .plan import ImportFailed, Lora, Plan
from .write import MODEL_ENTRIES, TOKENIZER_FILES

__all__ = [
    "MODEL_ENTRIES",
    "TOKENIZER_FILES",
    "ImportFailed",
    "Lora",
    "Plan",
    "join_front_matter",
    "main",
    "split_front_matter",
]
