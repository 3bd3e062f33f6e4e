"""A plugin whose import raises."""

raise RuntimeError("boom at import time")
