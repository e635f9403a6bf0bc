raise ImportError("recipes/ are scripts: run them with `accelerate launch recipes/<task>.py`, do not import them")
