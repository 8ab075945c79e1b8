"""Preservation figures on a real pretrained model: SmolLM2-135M-Instruct (GGUF Q4_1).

    make fetch-smollm2 && python benchmarks/smollm2_growth.py

Imports the GGUF (dequantised to fp32), grows it by llama_pro (30 -> 36 layers), hidden width
(576 -> 1152) and upcycling to 8 experts (top-2), and prints the max abs logit difference of
each grown model against the imported one, and of transformers reloading the exported folder
(Llama, Mixtral) against the same reference.  Ends with one JSON line.  The same checks, with
bounds, are tests/interop/test_smollm2_growth.py.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit_json, rounded  # noqa: E402

GGUF = Path(__file__).resolve().parent.parent / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "The capital of France is Paris. def add(a, b):\n    return a + b"


def main() -> None:
    import transformers

    from lite_llm.checkpoint import load_checkpoint
    from lite_llm.grow.expand import expand_checkpoint
    from lite_llm.grow.recipe import GrowthStep
    from lite_llm.interop import export_hf, import_gguf

    if not GGUF.exists():
        sys.exit(f"{GGUF} is absent; run `make fetch-smollm2` first")
    work = Path(tempfile.mkdtemp(prefix="smollm2-growth-"))
    source = import_gguf(GGUF, work / "ckpt")
    loaded = load_checkpoint(source)
    ids = torch.tensor([loaded.tokenizer.encode(PROMPT)[:24]])
    with torch.no_grad():
        reference = loaded.model(ids).logits
    figures: dict[str, object] = {"benchmark": "smollm2_growth", "max_abs_logit": rounded(float(reference.abs().max()), 3)}
    steps = [GrowthStep("llama_pro", {"target_layers": 36}), GrowthStep("width", {"d_model": 1152}), GrowthStep("upcycle", {"num_experts": 8})]
    for step in steps:
        grown = load_checkpoint(expand_checkpoint(source, work / step.method, [step], validate="never").path)
        with torch.no_grad():
            diff = float((grown.model(ids).logits - reference).abs().max())
        line = f"{step.describe():45s} {grown.model.num_params():>12,} params  max |Δlogit| {diff:.3e}"
        figures[f"{step.method}_max_abs"] = diff
        if step.method != "width":  # width-grown Llama exports too; two exports suffice here
            folder = export_hf(grown.path, work / f"{step.method}-hf")
            hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            with torch.no_grad():
                hf_diff = float((hf(ids).logits - reference).abs().max())
            line += f"  transformers reload {hf_diff:.3e}"
            figures[f"{step.method}_transformers_max_abs"] = hf_diff
        print(line, flush=True)
    emit_json(figures)


if __name__ == "__main__":
    main()
