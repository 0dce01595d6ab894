"""Operating a run: the launcher (`npo up/down/restart`), the Ray backend and the experiment runner."""
