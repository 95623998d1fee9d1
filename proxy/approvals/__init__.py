"""Human approval of held calls, and pinned MCP tool definitions (``approvals_from_config``)."""
