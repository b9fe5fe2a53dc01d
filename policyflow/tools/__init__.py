"""Tools agents call: the tool record and pool (base.py), local BM25 search (search.py) and the code sandbox (code.py)."""

from policyflow.tools.base import Tool, ToolPool, ToolResult, ToolStats, argument_errors, tool_stats
from policyflow.tools.code import ExecResult, SandboxUnavailable, run_python, run_python_async

__all__ = ["ExecResult", "SandboxUnavailable", "Tool", "ToolPool", "ToolResult", "ToolStats", "argument_errors",
           "run_python", "run_python_async", "tool_stats"]
