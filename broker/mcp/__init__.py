"""`broker mcp`: an MCP server that lets an AI agent use task-scoped credentials it never sees.

One server process acts as one workload (its token comes from the client's token sources).
See docs/mcp.md for the tools, their schemas and a client configuration.
"""
