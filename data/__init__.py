"""Data tools (run as python3 data/<tool>.py) and the shard format they share (data/shards.py)."""
