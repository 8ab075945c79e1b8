"""`lite-llm import` and `export`: Hugging Face and GGUF."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import LiteLLMError
from .app import app, console, friendly_errors, overwrite_option, parse_dtype, plain_warnings


@app.command("import")
@friendly_errors
def import_command(
    source: Path = typer.Argument(..., help="Hugging Face folder (config.json + safetensors) or a .gguf file."),
    output: Path = typer.Option(..., "-o", "--output", help="New checkpoint directory."),
    overwrite: bool = overwrite_option(),
    dtype: Optional[str] = typer.Option(None, help="float32, bfloat16 or float16 (default: as stored; GGUF: float32)."),
) -> None:
    """Bring a Llama/Mistral/Qwen2/Mixtral Hugging Face model or a Llama GGUF file in.

    Examples:

      lite-llm import ~/models/Qwen2-0.5B -o ckpt/qwen2

      lite-llm import models/SmolLM2-135M-Instruct.Q4_1.gguf -o ckpt/smollm2
    """
    from ..checkpoint.atomic import refuse_existing

    src, out = source.resolve(), output.resolve()
    if src.is_relative_to(out) or (src.is_dir() and out.is_relative_to(src)):  # replacing OUTPUT would delete the source, or write into it
        raise LiteLLMError(f"the output {output} and the source {source} are nested in each other; write the checkpoint to a directory outside the source")
    refuse_existing(output, overwrite, "checkpoint")
    from ..interop import import_gguf, import_hf
    from ..interop.gguf_import import is_gguf

    torch_dtype = parse_dtype(dtype)
    with console.status("importing…"):
        if is_gguf(source):
            path = import_gguf(source, output, **({"dtype": torch_dtype} if torch_dtype else {}))
        else:
            path = import_hf(source, output, dtype=torch_dtype)
    console.print(f"wrote {path}")


@app.command("export")
@friendly_errors
def export_command(
    checkpoint: Path = typer.Argument(..., help="Checkpoint directory."),
    output: Path = typer.Option(..., "-o", "--output", help="New Hugging Face folder."),
    dtype: Optional[str] = typer.Option(None, help="float32, bfloat16 or float16 (default: as stored)."),
    overwrite: bool = overwrite_option(),
) -> None:
    """Write a dense model as Llama, or a one-tier one-group MoE as Mixtral, for transformers.

    A dense model with q/k/v biases is written as Qwen2, and one whose hidden size is not a
    multiple of its heads (a width growth keeps the heads) as Mistral: the architectures that
    compute the same function.

    Example:

      lite-llm export ckpt/grown -o hf/grown
    """
    from ..interop import export_hf

    with console.status("exporting…"), plain_warnings():
        path = export_hf(checkpoint, output, dtype=parse_dtype(dtype), overwrite=overwrite)
    console.print(f"wrote {path} (load with transformers.AutoModelForCausalLM.from_pretrained)")
