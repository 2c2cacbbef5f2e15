"""fleetsync benchmark harness: fleetsync side by side with rsync and lsyncd (see bench/run.py)."""
