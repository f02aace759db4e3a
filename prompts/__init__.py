"""The MCP prompts: one markdown investigation recipe per file, served by the server (server/prompts.py).

This folder is the only copy: pyproject.toml installs it as the package `sae_mcp.prompts`, so a wheel, an
editable install and a source checkout all read these same files."""
