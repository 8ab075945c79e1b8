"""Hugging Face interop: the weight-name mapping (import/export build on it)."""

from .hf_mapping import config_from_hf, from_hf_state_dict, hf_config_dict, to_hf_state_dict

__all__ = ["config_from_hf", "from_hf_state_dict", "hf_config_dict", "to_hf_state_dict"]
