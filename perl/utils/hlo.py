"""Reading optimized HLO text: which instructions run inside loops.

The compiled-program tests (and benchmarks) pin properties of what XLA
actually emits, e.g. "no instruction inside the decode loop's while body
writes a whole KV-cache-sized buffer except an in-place dynamic-update-slice".
"""

from __future__ import annotations

import dataclasses
import re

_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\((.*)$")
_CALLED = re.compile(r"(calls|body|condition|to_apply|branch_computations)="
                     r"\{?(%[\w.\-]+(?:,\s*%[\w.\-]+)*)\}?")


@dataclasses.dataclass(frozen=True)
class Instruction:
  name: str
  # Result shape text, e.g. "f32[2,2,12,2,16]{4,3,2,1,0}" or a tuple.
  shape: str
  opcode: str
  # Computations this instruction calls (fusion, while body/condition, ...).
  called: tuple[str, ...]
  line: str


def parse(hlo_text: str) -> tuple[dict[str, list[Instruction]], str]:
  """{computation name: instructions} and the entry computation's name."""
  comps: dict[str, list[Instruction]] = {}
  entry, current = None, None
  for line in hlo_text.splitlines():
    if current is None:
      m = _COMPUTATION.match(line)
      if m and "=" not in line.split("(")[0]:
        current = m.group(2)
        comps[current] = []
        if m.group(1):
          entry = current
      continue
    if line.strip() == "}":
      current = None
      continue
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    calls = _CALLED.findall(line)
    called = tuple(c.strip().lstrip("%") for _, g in calls for c in g.split(","))
    comps[current].append(Instruction(m.group(1), m.group(2), m.group(3),
                                      called, line.strip()))
  if entry is None:
    raise ValueError("No ENTRY computation in the HLO text.")
  return comps, entry


def reachable(comps, root: str) -> list[str]:
  """Computations called from `root`, transitively (root included)."""
  seen, todo = [], [root]
  while todo:
    name = todo.pop()
    if name in seen or name not in comps:
      continue
    seen.append(name)
    for inst in comps[name]:
      todo.extend(inst.called)
  return seen


def while_bodies(comps, computation: str) -> list[str]:
  """Body computations of the while loops directly in `computation`."""
  out = []
  for inst in comps[computation]:
    if inst.opcode == "while":
      out.extend(c for c in inst.called if f"body=%{c}" in inst.line)
  return out


def fusion_root_opcode(comps, inst: Instruction) -> str | None:
  """Opcode of a fusion's root instruction (None if not a fusion)."""
  if inst.opcode != "fusion" or not inst.called:
    return None
  body = comps.get(inst.called[0], [])
  roots = [i for i in body if i.line.startswith("ROOT")]
  return roots[0].opcode if roots else None


def full_buffer_writes(hlo_text: str, shape: str) -> list[str]:
  """Instructions inside any while body that produce a whole `shape` buffer.

  `shape` is an HLO shape prefix such as "f32[2,2,12,2,16]". Allowed (not
  reported): in-place dynamic-update-slice (bare or as a fusion root),
  tuple plumbing, bitcasts, parameters and nested whiles. Anything else
  (copy, concatenate, broadcast, a loop fusion rewriting the buffer) is a
  full read + write of the buffer per iteration, and is returned.
  """
  comps, entry = parse(hlo_text)
  allowed = {"dynamic-update-slice", "tuple", "get-tuple-element", "bitcast",
             "parameter", "while", "opt-barrier", "call", "conditional"}
  bad, loop_comps = [], []
  for body in while_bodies(comps, entry):
    loop_comps.extend(reachable(comps, body))
  for name in dict.fromkeys(loop_comps):
    if name not in comps:
      continue
    # Inside a fusion the root's operands are not separate buffers.
    for inst in comps[name]:
      if not inst.shape.startswith(shape):
        continue
      if inst.opcode in allowed:
        continue
      if fusion_root_opcode(comps, inst) == "dynamic-update-slice":
        continue
      if any(name in i.called for c in comps.values() for i in c
             if i.opcode == "fusion"):
        continue  # an instruction inside a fusion computation
      bad.append(f"{name}: {inst.line[:160]}")
  return bad
