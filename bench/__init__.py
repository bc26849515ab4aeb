"""The fused_rnn benchmark harness: `python -m bench` (see bench/run.py)."""
