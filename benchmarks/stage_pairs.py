"""The stages of a request on torch's paths and on OpenVINO, alternated call by call.

    .venv/bin/python -m benchmarks.stage_pairs --configs bf16-cl,openvino

On a machine that other work shares, a figure taken minutes after another says more about the
load than about either: here every contender is loaded once in a live process of its own and
the parent asks each in turn for one call of a stage (text encoder, UNet call, VAE decode;
benchmarks/cpu_levers.py builds them), alternating the order round by round, so that a change
of load hits all alike. Reported per stage: the fastest and the median call of each contender
and, against the first, the median of round-by-round ratios.

``openvino`` runs the IR that bench_sd15_cpu.py exported beside the model folder
(``<model>-openvino``) with OpenVINO's own runtime in .venv-openvino, reshaped to static
shapes and compiled for the CPU as optimum-intel compiles it (latency hint, its default
precision: bf16 where the CPU has AMX or AVX-512 BF16).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import REPO_ROOT, SD15_DEFAULT_DIR, table
from benchmarks.cpu_levers import CONFIGS, STAGES, stage_inputs, torch_stages
from benchmarks.sd15_cpu import OPENVINO_PYTHON


def openvino_stages(model: Path, size: int, threads: int) -> dict:
    import numpy as np
    import openvino

    exported = model.with_name(model.name + "-openvino")
    if not (exported / "unet" / "openvino_model.xml").is_file():
        raise SystemExit(f"{exported} has no export: run scripts/bench_sd15_cpu.py once")
    unet_config = json.loads((exported / "unet" / "config.json").read_text())
    text_config = json.loads((exported / "text_encoder" / "config.json").read_text())
    inputs = stage_inputs(size, text_config["vocab_size"], unet_config["cross_attention_dim"])
    latent = size // 8
    core = openvino.Core()

    def compiled(part: str, shapes: dict):
        network = core.read_model(exported / part / "openvino_model.xml")
        network.reshape(shapes)
        config = {"PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        return core.compile_model(network, "CPU", config)

    text_encoder = compiled("text_encoder", {"input_ids": [2, 77]})
    unet = compiled(
        "unet",
        {"sample": [2, 4, latent, latent], "timestep": [1], "encoder_hidden_states": [2, 77, 768]},
    )
    decoder = compiled("vae_decoder", {"latent_sample": [1, 4, latent, latent]})
    unet_inputs = {
        "sample": inputs["sample"],
        "timestep": np.array([inputs["timestep"]], dtype=np.int64),
        "encoder_hidden_states": inputs["context"],
    }
    return {
        "text_encoder": lambda: text_encoder({"input_ids": inputs["tokens"]}),
        "unet": lambda: unet(unet_inputs),
        "vae_decode": lambda: decoder({"latent_sample": inputs["latents"]}),
    }


def serve(model: Path, contender: str, size: int, threads: int) -> None:
    """In a child: load, say ready, then run one call of each stage named on stdin."""
    if contender == "openvino":
        calls = openvino_stages(model, size, threads)
    else:
        import torch

        if threads:
            torch.set_num_threads(threads)
        calls = torch_stages(model, contender, size)
    print("ready", flush=True)
    for line in sys.stdin:
        started = time.perf_counter()
        calls[line.strip()]()
        print(time.perf_counter() - started, flush=True)


class Contender:
    def __init__(self, name: str, model: Path, size: int, threads: int):
        python = OPENVINO_PYTHON if name == "openvino" else Path(sys.executable)
        command = [str(python), "-m", "benchmarks.stage_pairs", "--child", name]
        command += ["--model", str(model), "--size", str(size), "--threads", str(threads)]
        self.name = name
        self.process = subprocess.Popen(
            command, cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        for line in self.process.stdout:
            if line.strip() == "ready":
                break
        else:
            raise RuntimeError(f"{name} ended before it was ready")

    def call(self, stage: str) -> float:
        self.process.stdin.write(stage + "\n")
        self.process.stdin.flush()
        return float(self.process.stdout.readline())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=SD15_DEFAULT_DIR)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="per contender (0: its default)")
    parser.add_argument(
        "--configs", default="bf16-cl,openvino", help=", ".join([*CONFIGS, "openvino"])
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    model = args.model.resolve()
    if args.child:
        serve(model, args.child, args.size, args.threads)
        return
    contenders = []
    try:
        for name in args.configs.split(","):
            started = time.perf_counter()
            contenders.append(Contender(name, model, args.size, args.threads))
            print(f"  {name} loaded in {time.perf_counter() - started:.0f} s", flush=True)
        times = {c.name: {stage: [] for stage in STAGES} for c in contenders}
        for stage in STAGES:
            for contender in contenders:  # a first call: compiles where there is compiling
                started = time.perf_counter()
                contender.call(stage)
                print(
                    f"  {contender.name} {stage}: first call {time.perf_counter() - started:.1f} s"
                )
            for round_ in range(args.rounds):
                for contender in contenders if round_ % 2 == 0 else reversed(contenders):
                    times[contender.name][stage].append(contender.call(stage))
    finally:
        for contender in contenders:
            contender.close()
    first = contenders[0].name
    rows = []
    for name, stages in times.items():
        row = [name]
        for stage in STAGES:
            ratio = statistics.median(
                a / b for a, b in zip(stages[stage], times[first][stage], strict=True)
            )
            row.append(
                f"{min(stages[stage]):.3f} ({statistics.median(stages[stage]):.3f}) s, {ratio:.2f}x"
            )
        rows.append(row)
    table(rows, ["contender", *(f"{s}: fastest (median), time / {first}'s" for s in STAGES)])
    if args.json:
        args.json.write_text(json.dumps(times, indent=2) + "\n")


if __name__ == "__main__":
    main()
