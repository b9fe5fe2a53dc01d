"""Tools agents call: the tool record and pool (base.py) and local BM25 search (search.py)."""

from policyflow.tools.base import Tool, ToolPool, ToolResult, ToolStats, argument_errors, tool_stats

__all__ = ["Tool", "ToolPool", "ToolResult", "ToolStats", "argument_errors", "tool_stats"]
