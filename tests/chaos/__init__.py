"""The chaos runner (``make chaos``) and its short profile in the test suite."""
