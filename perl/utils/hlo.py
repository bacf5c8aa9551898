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


def loop_with_inner_loop(hlo_text: str) -> str:
  """The body of the entry's while loop that runs another loop: a decode
  loop's body (its layers are the inner loop)."""
  comps, entry = parse(hlo_text)
  bodies = [b for b in while_bodies(comps, entry)
            if any(i.opcode == "while" for i in comps[b])]
  if len(bodies) != 1:
    raise ValueError(f"expected one entry loop with an inner loop, found {len(bodies)}")
  return bodies[0]


def while_bodies(comps, computation: str) -> list[str]:
  """Body computations of the while loops directly in `computation`."""
  out = []
  for inst in comps[computation]:
    if inst.opcode == "while":
      out.extend(c for c in inst.called if f"body=%{c}" in inst.line)
  return out


def _root(body: list[Instruction]) -> Instruction | None:
  """A computation's ROOT instruction."""
  return next((i for i in body if i.line.startswith("ROOT")), None)


def fusion_root_opcode(comps, inst: Instruction) -> str | None:
  """Opcode of a fusion's root instruction (None if not a fusion)."""
  if inst.opcode != "fusion" or not inst.called:
    return None
  root = _root(comps.get(inst.called[0], []))
  return root.opcode if root else None


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


# -- HBM traffic of a compiled TPU program ------------------------------------

_ARRAY = re.compile(r"\b(pred|[su](?:4|8|16|32|64)|f8\w*|bf16|f16|f32|f64|c64|c128)"
                    r"\[([\d,]*)\](\{[^}]*\})?")
_ITEM_BITS = {"pred": 8, "bf16": 16, "f16": 16, "f32": 32, "f64": 64, "c64": 64,
              "c128": 128}
# Instructions that move no data of their own.
_PLUMBING = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast",
             "after-all", "partition-id", "replica-id", "opt-barrier", "while",
             "call", "conditional", "iota"}
# Reads of a window of the operand: the bytes read are the result's.
_WINDOW_READS = {"slice", "dynamic-slice", "gather", "slice-start"}


def _item_bytes(dtype: str) -> float:
  if dtype in _ITEM_BITS:
    return _ITEM_BITS[dtype] / 8
  if dtype.startswith("f8"):
    return 1
  return int(re.sub(r"\D", "", dtype)) / 8


def array_bytes(shape: str, *, hbm_only: bool = True) -> int:
  """Bytes of the arrays in an HLO shape; with hbm_only, those in HBM only.

  A TPU layout names its memory space as S(n) (1: VMEM, 2: SMEM, 5: host);
  none, or S(0), is HBM.
  """
  total = 0.0
  for dtype, dims, layout in _ARRAY.findall(shape):
    if hbm_only and layout and re.search(r"S\([1-9]\d*\)", layout):
      continue
    n = 1
    for d in dims.split(","):
      n *= int(d) if d else 1
    total += n * _item_bytes(dtype)
  return int(total)


def _operands(inst: Instruction) -> list[str]:
  rest = inst.line.split(f" {inst.opcode}(", 1)[1]
  return re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])


def hbm_bytes(hlo_text: str, computation: str | None = None) -> int:
  """HBM bytes read and written by one run of a compiled TPU program (or of
  one of its computations, e.g. a decode loop's body: one token)."""
  return sum(n for _, n in hbm_traffic(hlo_text, computation))


def hbm_traffic(hlo_text: str, computation: str | None = None
                ) -> list[tuple[Instruction, int]]:
  """(instruction, HBM bytes it reads and writes), for each that moves any.

  XLA:TPU's cost analysis "bytes accessed" also counts on-chip traffic: a
  weight prefetched into VMEM in four async slices is counted as four full
  reads of the weight, then again as the dot's (VMEM) operand. No library
  models HBM traffic from the memory spaces the compiler assigned, so this
  does: each instruction outside fusions reads its HBM operands and writes
  its HBM results; a window read (slice, dynamic-slice, gather, slice-start,
  or a fusion parameter used only through them) reads the window; an
  in-place dynamic-update-slice moves only the update; an async op reads at
  its start and writes at its done. A while body counts its trip count
  times (XLA's cost analysis counts it once).
  """
  comps, entry = parse(hlo_text)
  shapes = {i.name: i.shape for c in comps.values() for i in c}
  out = []
  for comp, times in _executions(comps, computation or entry).items():
    first = len(out)
    for inst in comps[comp]:
      op = inst.opcode
      if op in _PLUMBING:
        continue
      ins = _operands(inst)
      if op.endswith("-done"):
        out.append((inst, array_bytes(inst.shape)))
        continue
      if op in _WINDOW_READS:
        if not ins or array_bytes(shapes.get(ins[0], "")) == 0:
          continue  # the operand is already on chip
        result = inst.shape
        if op == "slice-start":  # ((operand), result, context): the result
          result = _ARRAY.search(inst.shape, inst.shape.index(")") + 1).group(0)
        out.append((inst, array_bytes(result, hbm_only=False)
                    + (array_bytes(inst.shape) if op != "slice-start" else 0)))
        continue
      if op == "dynamic-update-slice":
        update = array_bytes(shapes.get(ins[1], ""), hbm_only=False)
        out.append((inst, 2 * update if array_bytes(inst.shape) else 0))
        continue
      if op == "fusion" and inst.called:
        out.append((inst, _fusion_bytes(comps, inst, ins, shapes)))
        continue
      reads = sum(array_bytes(shapes.get(o, "")) for o in ins)
      out.append((inst, reads + (0 if op.endswith("-start") else array_bytes(inst.shape))))
    out[first:] = [(i, n * times) for i, n in out[first:]]
  return [(i, n) for i, n in out if n]


def _trip_count(comps, parent: str, loop: Instruction) -> int:
  """A while loop's trip count: XLA's known_trip_count, or (XLA:TPU drops it)
  read from `i < N` in the condition with i's initial value a constant."""
  m = re.search(r'"known_trip_count":\{"n":"(\d+)"', loop.line)
  if m:
    return int(m.group(1))
  fail = ValueError(f"while loop without a known trip count: {loop.line[:120]}")
  cond = re.search(r"condition=%?([\w.\-]+)", loop.line)
  body = {i.name: i for i in comps.get(cond.group(1), [])} if cond else {}
  root = _root(list(body.values()))
  if root is None or root.opcode != "compare" or "direction=LT" not in root.line:
    raise fail
  counter, limit = (body.get(o) for o in _operands(root))
  if not (counter and limit and counter.opcode == "get-tuple-element"
          and limit.opcode == "constant"):
    raise fail
  index = int(re.search(r"index=(\d+)", counter.line).group(1))
  insts = {i.name: i for i in comps[parent]}
  init = insts.get(_operands(loop)[0])
  start = insts.get(_operands(init)[index]) if init and init.opcode == "tuple" else None
  while start is not None and start.opcode in ("copy", "bitcast"):
    start = insts.get(_operands(start)[0])
  if start is None or start.opcode != "constant":
    raise fail
  value = lambda i: int(re.search(r"constant\((-?\d+)\)", i.line).group(1))
  return max(0, value(limit) - value(start))


def _executions(comps, entry: str) -> dict[str, int]:
  """{non-fusion computation: times one program run executes it}.

  A while loop's body and condition run its trip count; a loop whose trip
  count cannot be read raises, since its traffic is unknown.
  """
  times: dict[str, int] = {}

  def visit(name, n):
    times[name] = times.get(name, 0) + n
    for inst in comps.get(name, []):
      if inst.opcode == "fusion":
        continue
      k = n
      if inst.opcode == "while":
        k = n * _trip_count(comps, name, inst)
      for c in inst.called:
        if c in comps:
          visit(c, k)

  visit(entry, 1)
  return times


def _window_bytes(comps, comp: str, index: int, depth: int = 0) -> int | None:
  """Bytes read of parameter `index` of computation `comp` when every use of
  it is a window read (slice, dynamic-slice, gather as the sliced operand),
  through bitcasts and nested fusions; None when some use reads it whole."""
  body = comps.get(comp, [])
  param = next((i for i in body if i.opcode == "parameter"
                and re.search(rf"parameter\({index}\)", i.line)), None)
  if param is None or depth > 8:
    return None
  users: dict[str, list[Instruction]] = {}
  for i in body:
    if i.opcode != "parameter":
      for o in _operands(i):
        users.setdefault(o, []).append(i)

  root = _root(body)

  def reads(name):
    if name == root.name:
      return None  # flows out of the computation whole
    total = 0
    for u in users.get(name, []):
      ops = _operands(u)
      if u.opcode == "bitcast":
        sub = reads(u.name)
      elif (u.opcode in ("slice", "dynamic-slice", "gather") and ops[0] == name
            and ops.count(name) == 1):
        sub = array_bytes(u.shape, hbm_only=False)
      elif u.opcode == "fusion" and u.called:
        subs = [_window_bytes(comps, u.called[0], k, depth + 1)
                for k, o in enumerate(ops) if o == name]
        sub = None if None in subs else sum(subs)
      else:
        sub = None
      if sub is None:
        return None
      total += sub
    return total

  return reads(param.name)


def _fusion_bytes(comps, inst: Instruction, ins: list[str],
                  shapes: dict[str, str]) -> int:
  """HBM bytes of one fusion: its operands as read inside, its HBM result."""
  comp = inst.called[0]
  body = comps[comp]
  params = {int(re.search(r"parameter\((\d+)\)", i.line).group(1)): i.name
            for i in body if i.opcode == "parameter"}
  root = _root(body)
  roots = [root] if root.opcode != "tuple" else [
      next(i for i in body if i.name == o) for o in _operands(root)]
  in_place = {}  # parameter name -> bytes a root DUS writes into it
  for r in roots:
    if r.opcode == "dynamic-update-slice":
      target, update = _operands(r)[:2]
      in_place[target] = array_bytes(shapes.get(update, ""), hbm_only=False)
  total = 0
  for k, operand in enumerate(ins):
    if not array_bytes(shapes.get(operand, "")):
      continue  # on chip already
    if params.get(k) in in_place:
      continue  # aliased in place: only the update moves (below)
    window = _window_bytes(comps, comp, k)
    total += window if window is not None else array_bytes(shapes[operand])
  if in_place and array_bytes(inst.shape):
    total += sum(in_place.values())  # written; its source was read above
    written = sum(array_bytes(r.shape, hbm_only=False) for r in roots
                  if r.opcode != "dynamic-update-slice")
    return total + written
  return total + array_bytes(inst.shape)
