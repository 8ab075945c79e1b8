"""Run-time environment: the device a run uses and how it computes (no model code here)."""
