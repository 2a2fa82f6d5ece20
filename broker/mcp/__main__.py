"""`python -m broker.mcp`: the same as `broker mcp`."""

from broker.mcp.cli import mcp_command

if __name__ == "__main__":
    mcp_command()
