"""Shared test fixtures: offline hub, loopback-only Ray, one torch thread, tiny ViT configs, generated videos."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch  # noqa: E402

torch.set_num_threads(1)
