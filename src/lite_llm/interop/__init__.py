"""Interop with Hugging Face and llama.cpp: the weight-name mapping, and streaming import and
export built on it.

* :func:`import_hf` — a Hugging Face Llama/Mistral/Qwen2/Mixtral folder -> a checkpoint.
* :func:`export_hf` — a dense or single-tier single-group MoE checkpoint -> a Llama (Qwen2
  with q/k/v biases) or Mixtral folder that ``AutoModelForCausalLM.from_pretrained`` loads.
* :func:`import_gguf` — a Llama-architecture GGUF file -> a checkpoint (dequantised).
"""

from .gguf_import import import_gguf
from .hf_export import export_hf
from .hf_import import import_hf
from .hf_mapping import config_from_hf, from_hf_state_dict, hf_config_dict, to_hf_state_dict

__all__ = ["config_from_hf", "export_hf", "from_hf_state_dict", "hf_config_dict", "import_gguf", "import_hf", "to_hf_state_dict"]
