"""Options shared by every command that runs a model."""

from __future__ import annotations

import typer

MODEL = typer.Option(
    None, "--model", "-m", envvar="CLAP_MODEL",
    help="Hub id, local model directory or LAION .pt file. (default: laion/clap-htsat-fused)",
)
DEVICE = typer.Option("auto", "--device", help="auto (CUDA when available), cpu or cuda.")
PRECISION = typer.Option(
    "auto", "--precision",
    help="auto (fp32 on every machine: exact, and a file's vector does not depend on its batch), fp32, bf16 "
    "(faster where native, vectors within ~cosine 0.9997 of fp32 and moved by their batch mates), or int8 (CPU: "
    "dynamic int8 quantisation, faster, within cosine 0.995 of fp32).",
)
ENGINE = typer.Option(
    None, "--engine", envvar="CLAP_ENGINE", show_default="auto",
    help="What runs the audio encoder: auto (onnxruntime for --precision int8 on the CPU with HTSAT models; else "
    "torch), torch, or onnx (fp32 or int8). The onnx graph is exported once per model.",
)
BATCH_SIZE = typer.Option(8, "--batch-size", "-b", min=1, help="Clips per forward pass.")
TOKENIZER = typer.Option(None, "--tokenizer", help="Tokenizer directory or hub id for .pt checkpoints.")


def load(model, device, precision, tokenizer=None, text_only=False, engine=None):
    from ..engine.load import load_model

    return load_model(model, device=device, precision=precision, tokenizer=tokenizer, text_only=text_only,
                      engine=engine)
