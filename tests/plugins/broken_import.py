"""A plugin whose import fails (its dependency is not installed)."""

import onex_module_that_does_not_exist  # type: ignore[import-not-found]  # noqa: F401
