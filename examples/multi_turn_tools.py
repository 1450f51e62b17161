"""A 3-turn tool-calling conversation through `parity serve`, token ids end to end, with the RL loss mask.

Model turns are never re-tokenized: each turn sends the whole conversation so far as token ids to
/v1/completions and appends the `token_ids` the server returns, verbatim. Only what the model did not
write (the system and user turns, tool results, the chat template's turn markers) is tokenized, by the
trainer's own tokenizer, as the difference between two renderings of the chat template. The loss mask is
1 exactly on the model's tokens. Since every turn's prompt starts with the previous turn's prompt and
output, turns 2 and 3 find that prefix in the server's KV cache (`usage.prompt_tokens_details.cached_tokens`).

    python examples/multi_turn_tools.py                         # starts a server on the tiny factory model
    python examples/multi_turn_tools.py --base-url http://127.0.0.1:8000/v1 --model NAME --tokenizer DIR
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass, field

TOOLS = [{
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers.",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                       "required": ["a", "b"]},
    },
}]
SYSTEM = ("You are a careful assistant. To compute, call the add tool with a JSON object such as "
          '{"name": "add", "arguments": {"a": 1, "b": 2}} and wait for its result before answering.')
QUESTION = "What is 12 + 34 + 56? Use the tool for each addition."


@dataclass
class Trajectory:
    """One conversation as a trainer consumes it."""

    token_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)  # 1: sampled by the model, 0: prompt, template or tool output
    logprobs: list[float | None] = field(default_factory=list)  # the engine's logprob of each model token
    cached_tokens: list[int] = field(default_factory=list)  # per turn: prompt tokens served from the prefix cache
    finish_reasons: list[str] = field(default_factory=list)

    def extend(self, ids: list[int], by_model: bool, logprobs: list[float] | None = None) -> None:
        self.token_ids += ids
        self.loss_mask += [int(by_model)] * len(ids)
        self.logprobs += logprobs if logprobs is not None else [None] * len(ids)


def call_tool(text: str) -> dict:
    """Run the add tool if the model's text holds a call to it; otherwise say why not (that is the tool's answer)."""
    match = re.search(r"\{.*\}", text, re.DOTALL)
    try:
        call = json.loads(match.group(0)) if match else None
        args = call["arguments"]
        return {"result": int(args["a"]) + int(args["b"])}
    except (ValueError, KeyError, TypeError):
        return {"error": "no add call found; send {\"name\": \"add\", \"arguments\": {\"a\": ..., \"b\": ...}}"}


class TemplateDelta:
    """Token ids of messages appended to a conversation, as the chat template renders them (the trainer's
    tokenizer): the rendering with them minus the rendering without, so no earlier token is touched."""

    def __init__(self, tokenizer, tools: list[dict]):
        self.tokenizer = tokenizer
        self.tools = tools
        self._anchor = [{"role": "user", "content": "anchor"}]  # templates want a conversation to append to

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tools=self.tools, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def opening(self, messages: list[dict]) -> list[int]:
        """The first prompt: system and user turns, then the assistant's turn opened."""
        return self._encode(self._render(messages, add_generation_prompt=True))

    def close_model_turn(self, model_text: str) -> list[int]:
        """What the template writes after the assistant's content to end its turn (e.g. "<|im_end|>\\n")."""
        before = self._render(self._anchor, add_generation_prompt=True) + model_text
        after = self._render(self._anchor + [{"role": "assistant", "content": model_text}], add_generation_prompt=False)
        if not after.startswith(before):
            raise ValueError("the chat template rewrites the assistant's content; its closing cannot be isolated")
        return self._encode(after[len(before):])

    def tool_turn(self, result: dict, model_text: str) -> list[int]:
        """The tool's message and the next assistant opening."""
        done = self._anchor + [{"role": "assistant", "content": model_text}]
        before = self._render(done, add_generation_prompt=False)
        after = self._render(done + [{"role": "tool", "content": json.dumps(result)}], add_generation_prompt=True)
        if not after.startswith(before):
            raise ValueError("the chat template re-renders earlier turns when a tool message follows")
        return self._encode(after[len(before):])


def run_conversation(client, model: str, tokenizer, turns: int = 3, max_tokens: int = 24, seed: int = 0,
                     end_of_turn_token: str = "<|im_end|>") -> Trajectory:
    """`client` is an `openai.OpenAI` pointed at a parity server; the model's turn ends at `end_of_turn_token`."""
    template = TemplateDelta(tokenizer, TOOLS)
    end_of_turn = tokenizer.convert_tokens_to_ids(end_of_turn_token)
    traj = Trajectory()
    traj.extend(template.opening([{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]),
                by_model=False)
    for turn in range(turns):
        response = client.completions.create(
            model=model, prompt=traj.token_ids, max_tokens=max_tokens, seed=seed + turn, logprobs=0,
            extra_body={"return_token_ids": True, "stop_token_ids": [end_of_turn]},
        )
        choice = response.choices[0]
        if choice.prompt_token_ids != traj.token_ids:
            raise RuntimeError("the server did not run the prompt it was sent")
        traj.extend(choice.token_ids, by_model=True, logprobs=choice.logprobs.token_logprobs)
        traj.cached_tokens.append(response.usage.prompt_tokens_details.cached_tokens)
        traj.finish_reasons.append(choice.finish_reason)
        if turn == turns - 1:
            break
        if choice.token_ids[-1] != end_of_turn:
            traj.extend(template.close_model_turn(choice.text), by_model=False)
        traj.extend(template.tool_turn(call_tool(choice.text), choice.text), by_model=False)
    return traj


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", help="a running server's /v1 URL (default: start one on the tiny model)")
    parser.add_argument("--model", default="tiny", help="the served model name")
    parser.add_argument("--tokenizer", help="the model's directory, for its tokenizer (default: the tiny model's)")
    args = parser.parse_args()
    import openai
    from transformers import AutoTokenizer

    from parity.testing.factory import default_model_dir

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or default_model_dir())
    if args.base_url:
        traj = run_conversation(openai.OpenAI(base_url=args.base_url, api_key="none"), args.model, tokenizer)
    else:
        from parity.server.launch import ServerThread, build_app

        app = build_app(default_model_dir(), served_model_name=args.model, dtype="fp32", device="cpu", block_size=4)
        with ServerThread(app) as server:
            traj = run_conversation(openai.OpenAI(base_url=server.url + "/v1", api_key="none"), args.model, tokenizer)
    print(f"{len(traj.token_ids)} tokens, {sum(traj.loss_mask)} by the model; cached prompt tokens per turn: "
          f"{traj.cached_tokens}; finish reasons: {traj.finish_reasons}")


if __name__ == "__main__":
    main()
