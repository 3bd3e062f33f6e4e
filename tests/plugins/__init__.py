"""Handler plugins used by the loader and worker tests (outside the default allowlist)."""
