"""What HTTP and MCP share before the pipeline (``request``): identity, path, body, Call."""
