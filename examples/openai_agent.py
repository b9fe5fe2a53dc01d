"""A small agent program that speaks only the OpenAI API, trained as it is by policyflow.

    policyflow train task.name=agent_program task.path=problems.jsonl model.path=MODEL model.chat_template=true \\
        task.options='{command: [python, examples/openai_agent.py]}'

policyflow runs it once per episode (docs/agent_programs.md): the problem arrives on stdin as
JSON ({"id", "prompt", "answer", "columns"}), the endpoint in OPENAI_BASE_URL and
OPENAI_API_KEY (the official client reads both), and the reward leaves as the last stdout line.
Nothing here knows about policyflow: pointed at any OpenAI-compatible server, it runs the same.

The episode: ask the question, offering a calculator tool; if the model calls it, answer the
call and ask again; otherwise ask the model to check its answer. Both second calls append the
model's message to the chat, so with a chat template that renders history as the model wrote it
the episode is one training row. The reward is 1 when the final reply's last number is the
reference answer. `--no-tools` offers no tool.
"""

from __future__ import annotations

import ast
import json
import operator
import os
import re
import sys

import openai

CALCULATOR = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate integers joined by +, - and *.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
}}
OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def calculate(expression: str) -> str:
    """The value of integers joined by + - * as text, or an error message (never `eval`)."""
    def value(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int and abs(node.value) < 10**9:
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
            return OPERATORS[type(node.op)](value(node.left), value(node.right))
        raise ValueError("only integers joined by + - * are allowed")

    try:
        return str(value(ast.parse(expression.strip(), mode="eval").body))
    except (SyntaxError, ValueError, RecursionError) as err:
        return f"error: {err}"


def last_number(text: str) -> str | None:
    numbers = re.findall(r"-?\d+", text)
    return numbers[-1] if numbers else None


def main() -> None:
    problem = json.loads(sys.stdin.read())
    tools = [] if "--no-tools" in sys.argv[1:] else [CALCULATOR]
    client = openai.OpenAI(max_retries=0)  # OPENAI_BASE_URL and OPENAI_API_KEY from the environment
    model = os.environ.get("POLICYFLOW_MODEL", "policy")
    ask = {"model": model, "max_tokens": 64, **({"tools": tools} if tools else {})}

    messages = [{"role": "user", "content": problem["prompt"]}]
    reply = client.chat.completions.create(messages=messages, **ask).choices[0].message
    final = reply.content or ""
    messages.append(reply.model_dump(exclude_none=True))
    if reply.tool_calls:  # one tool round
        for call in reply.tool_calls:
            try:
                expression = str(json.loads(call.function.arguments).get("expression", ""))
            except (ValueError, AttributeError):
                expression = ""
            messages.append({"role": "tool", "tool_call_id": call.id, "content": calculate(expression)})
    else:
        messages.append({"role": "user", "content": "Check your answer and reply with the final answer only."})
    try:
        final = client.chat.completions.create(messages=messages, **ask).choices[0].message.content or ""
    except openai.BadRequestError as err:  # e.g. a plain model without a chat template, or the episode's turn limit
        print(f"second call refused: {err}", file=sys.stderr)

    correct = float(last_number(final) == str(problem["answer"]).strip())
    print(json.dumps({"reward": correct, "parts": {"correct": correct}, "answer": final.strip()}))


if __name__ == "__main__":
    main()
