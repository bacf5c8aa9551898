"""Conversations rendered by the model's own chat template.

Tasks can give role/content messages (`prompt_messages`, and the response as
one assistant turn); gin picks how they become text (`rendering`):
  "raw"            the task's own text, as published (the default)
  "chat_template"  the tokenizer's Jinja chat template (tokenizer_config.json
                   "chat_template": Llama 3, Qwen2.5, Gemma), rendered the
                   way transformers' `apply_chat_template` renders it.
A response is the text the full conversation adds after the prompt rendered
with `add_generation_prompt=True` (TRL's convention), minus the template's
closing end-of-turn token: the pipeline appends the vocabulary's EOS, which
is set to that token, so the ids equal `apply_chat_template`'s. That is, for
prompt turns P and reply turns R (after the merging below):
  prompt ids            = apply_chat_template(P, add_generation_prompt=True)
  prompt + response ids = apply_chat_template(P + R), through R's closing
                          end-of-turn token (what follows it, such as
                          Qwen's newline, the model never has to produce).

The conversation is normalised first, the same way for every template:
  - text given as a string (a task's prompt or response text) becomes one
    turn with surrounding whitespace stripped: the space or newline that
    joins raw prompt and response text is layout the template replaces
    (Llama 3 and Gemma trim contents themselves; Qwen 2.5 does not).
  - consecutive turns of one role are merged into one turn, their contents
    joined by a blank line ("\n\n", the separator of HH transcripts), so a
    template that requires alternating roles (Gemma) renders them;
  - when the prompt's last turn and the reply's first are both assistant
    turns, they are one reply: that prompt turn moves into the response.
Whatever the template raises for a conversation (Gemma: a system turn, a
first turn that is not the user's) is a ChatTemplateError, a ValueError that
the readers' bad-row policy reports with the row it came from.

The Jinja environment mirrors transformers' (sandboxed, trim_blocks,
lstrip_blocks, loopcontrols, `raise_exception`, a `tojson` that does not
HTML-escape) so that a template from the Hub renders the same text here
without importing transformers into the input pipeline.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import re
from typing import Any, Mapping, Optional, Sequence

import gin

Message = Mapping[str, str]
ROLES = ("system", "user", "assistant")
RAW = "raw"
CHAT_TEMPLATE = "chat_template"
RENDERINGS = (RAW, CHAT_TEMPLATE)
CONFIG_FILE = "tokenizer_config.json"


def token_text(value: Any) -> Optional[str]:
  """tokenizer_config.json stores special tokens as strings or AddedToken dicts."""
  if isinstance(value, Mapping):
    return value.get("content")
  return value


def read_tokenizer_config(path: str) -> dict[str, Any]:
  """tokenizer_config.json of a tokenizer directory (or beside a tokenizer.json)."""
  directory = path if os.path.isdir(path) else os.path.dirname(path)
  config_path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(config_path):
    return {}
  try:
    with open(config_path, encoding="utf-8") as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{config_path} is not valid JSON ({e}); re-download the "
                     "tokenizer files.") from None


class ChatTemplateError(ValueError):
  """A chat template cannot render one conversation (a bad row, not a bad template)."""


@functools.lru_cache(maxsize=16)
def _compile(template: str):
  import jinja2  # pylint: disable=g-import-not-at-top
  from jinja2 import sandbox  # pylint: disable=g-import-not-at-top

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                      separators=separators, sort_keys=sort_keys)

  env = sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return env.from_string(template)


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """A tokenizer's chat template and the special tokens it refers to."""

  # The Jinja source (tokenizer_config.json "chat_template").
  template: str
  # Special-token strings the template may use ({{ bos_token }}, ...).
  special_tokens: tuple[tuple[str, str], ...] = ()
  # Where it came from, for error messages.
  source: str = "<string>"

  @classmethod
  def from_pretrained(cls, path: str) -> "ChatTemplate":
    """From a tokenizer directory (tokenizer_config.json) or a .jinja file."""
    if os.path.isfile(path) and path.endswith(".jinja"):
      with open(path, encoding="utf-8") as f:
        return cls(template=f.read(), source=path)
    config = read_tokenizer_config(path)
    template = config.get("chat_template")
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    jinja_file = os.path.join(directory, "chat_template.jinja")
    if template is None and os.path.isfile(jinja_file):
      with open(jinja_file, encoding="utf-8") as f:
        template = f.read()
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
      template = next((t["template"] for t in template
                       if t.get("name") == "default"), None)
    if not template:
      raise ValueError(
          f"No chat template in {path} (tokenizer_config.json 'chat_template' "
          "or chat_template.jinja). Fix: use rendering='raw', or point the "
          "tokenizer path at an instruct model's tokenizer directory.")
    specials = tuple(
        (key, text) for key in ("bos_token", "eos_token", "pad_token", "unk_token")
        if (text := token_text(config.get(key))) is not None)
    return cls(template=template, special_tokens=specials, source=path)

  def check(self) -> "ChatTemplate":
    """Compiles the template now, so a syntax error is one error before any row."""
    import jinja2  # pylint: disable=g-import-not-at-top
    try:
      _compile(self.template)
    except jinja2.exceptions.TemplateError as e:
      raise ValueError(f"The chat template of {self.source} is not valid Jinja "
                       f"({type(e).__name__}: {e}). Fix: use the template from "
                       "the model's tokenizer_config.json, or rendering='raw'."
                       ) from None
    return self

  def render(self, messages: Sequence[Message], *,
             add_generation_prompt: bool = False) -> str:
    for i, m in enumerate(messages):
      if not isinstance(m, Mapping) or not isinstance(m.get("content"), str) \
          or m.get("role") not in ROLES:
        raise ValueError(
            f"message {i} of a conversation is {m!r}: each message needs a "
            f"'role' in {ROLES} and a string 'content'.")
    import jinja2  # pylint: disable=g-import-not-at-top
    try:
      return _compile(self.template).render(
          messages=[dict(m) for m in messages],
          add_generation_prompt=add_generation_prompt,
          **dict(self.special_tokens))
    except jinja2.exceptions.TemplateError as e:
      roles = "/".join(m["role"] for m in messages)
      raise ChatTemplateError(
          f"the chat template of {self.source} cannot render this "
          f"conversation (roles {roles}): {e}") from None

  def split(self, prompt: Sequence[Message], response: Sequence[Message], *,
            eos_text: Optional[str]) -> tuple[str, str]:
    """(prompt text, response text) of one exchange; see the module doc."""
    prompt, response = exchange(prompt, response)
    head = self.render(prompt, add_generation_prompt=True)
    full = self.render(prompt + response)
    if not full.startswith(head):
      raise ValueError(
          f"The chat template of {self.source} does not render the prompt as a "
          "prefix of the whole conversation, so the response cannot be cut "
          "off it. Fix: use rendering='raw' for this tokenizer.")
    tail = full[len(head):]
    if eos_text:
      index = tail.rfind(eos_text)
      if index >= 0 and not tail[index + len(eos_text):].strip():
        tail = tail[:index]
    return head, tail


@gin.configurable(module="perl.data.chat")
def rendering(kind: str = RAW, tokenizer: Optional[str] = None) -> Optional[ChatTemplate]:
  """How conversations become text: None for "raw", else the chat template.

  tokenizer: the tokenizer directory (or .jinja file) whose template to use;
  defaults to the task vocabulary's path.
  """
  if kind == RAW:
    return None
  if kind != CHAT_TEMPLATE:
    raise ValueError(f"perl.data.chat.rendering.kind={kind!r}: choose one of "
                     f"{RENDERINGS}.")
  if tokenizer is None:
    from perl.data import vocabulary_config  # pylint: disable=g-import-not-at-top
    tokenizer = vocabulary_config.configured_tokenizer_path()
  if tokenizer is None:
    raise ValueError(
        "rendering kind='chat_template' needs a tokenizer with a chat template:"
        " set perl.data.vocabulary_config.task_vocabulary.path (or "
        "perl.data.chat.rendering.tokenizer) to the model's tokenizer directory.")
  return ChatTemplate.from_pretrained(tokenizer).check()


# Joins the contents of consecutive same-role turns (HH's own turn separator).
TURN_SEPARATOR = "\n\n"


def merge_turns(messages: Sequence[Message]) -> list[dict[str, str]]:
  """`messages` with each run of one role merged into one turn ("\n\n"-joined)."""
  merged: list[dict[str, str]] = []
  for m in messages:
    if merged and isinstance(m, Mapping) and m.get("role") == merged[-1].get("role") \
        and isinstance(m.get("content"), str) \
        and isinstance(merged[-1].get("content"), str):
      merged[-1] = {**merged[-1],
                    "content": merged[-1]["content"] + TURN_SEPARATOR + m["content"]}
    else:
      merged.append(dict(m) if isinstance(m, Mapping) else m)
  return merged


def exchange(prompt: Sequence[Message], response: Sequence[Message]
             ) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
  """(prompt turns, reply turns) as rendered; see the module doc."""
  prompt, response = merge_turns(prompt), merge_turns(response)
  if prompt and response and prompt[-1].get("role") == "assistant" \
      and response[0].get("role") == "assistant":
    response = merge_turns(prompt[-1:] + response)
    prompt = prompt[:-1]
  return prompt, response


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def _hh_turns(text: str) -> list[dict[str, str]]:
  parts = _HH_TURN.split(text)
  return [{"role": "user" if role == "Human" else "assistant",
           "content": content.strip()}
          for role, content in zip(parts[1::2], parts[2::2])]


def hh_messages(transcript: str) -> list[dict[str, str]]:
  """Anthropic HH's "\\n\\nHuman: ...\\n\\nAssistant: ..." text as messages.

  The prompt of an HH pair ends with "\\n\\nAssistant:" (no reply); that empty
  last assistant turn is dropped, the generation prompt takes its place.
  """
  text = transcript if transcript.startswith("\n\n") else "\n\n" + transcript
  text = re.sub(r"\n\nAssistant:\s*$", "\n\nAssistant: ", text)
  messages = _hh_turns(text)
  if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
    messages.pop()
  if not messages:
    raise ValueError(f"not an HH transcript (no 'Human:' turn): {transcript[:80]!r}")
  return messages


def hh_reply_messages(reply: str) -> list[dict[str, str]]:
  """The reply part of an HH transcript (the text after a prompt's final
  "\n\nAssistant:") as messages: an assistant turn, then any further turns."""
  return _hh_turns("\n\nAssistant: " + reply)


def as_messages(value: Any, role: str) -> list[dict[str, str]]:
  """A message list as given, or plain text as one stripped message of `role`."""
  if isinstance(value, str):
    return [{"role": role, "content": value.strip()}]
  return [dict(m) for m in value]


def render_record(record: Mapping[str, Any], fields: Sequence[str],
                  template: ChatTemplate, *, eos_text: Optional[str]) -> dict:
  """The text fields of one record rendered with `template`.

  The prompt is `record["prompt_messages"]` when the task gives it, else the
  prompt text as one user turn; each response field is
  `record[f"{field}_messages"]` when the task gives it, else its text as one
  assistant turn (or its own message list). Raises ChatTemplateError (a
  ValueError) when the template cannot render the conversation.
  """
  prompt_key = "prompt" if "prompt" in fields else "inputs"
  prompt = record.get("prompt_messages") or as_messages(record[prompt_key], "user")
  out = dict(record)
  head = None
  for field in fields:
    if field == prompt_key:
      continue
    reply = record.get(f"{field}_messages") or as_messages(record[field],
                                                           "assistant")
    head, out[field] = template.split(prompt, reply, eos_text=eos_text)
  out[prompt_key] = head if head is not None else template.render(
      merge_turns(prompt), add_generation_prompt=True)
  return out
