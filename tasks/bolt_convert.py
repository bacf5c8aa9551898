"""Convert a local LDC2018T19 copy (BOLT English SMS/Chat XML) to the JSON-lines
schema documented in tasks/bolt.py.

    python -m tasks.bolt_convert --ldc_root=/path/to/LDC2018T19 \\
        --out=$PERL_DATA_DIR/bolt-sms-chat/perl [--summaries=summaries.jsonl]

Reads every *.xml under ldc_root. Best effort on the XML (the release could not
be inspected here): any element named "conversation" (attribute "id") holding
elements named "message" (attributes id, participant|speaker, datetime; text in
a "body" child or the element itself). Medium comes from a "medium" attribute
or from "sms"/"chat"/"cht" in the file path. Splits are deterministic:
crc32(conversation_id) % 20 == 0 -> test, == 1 -> validation, else train.
Optional summaries: JSON lines {conversation_id, summary}.
"""
from __future__ import annotations

import argparse
import json
import os
import xml.etree.ElementTree as ElementTree
import zlib
from typing import Dict, Iterator, Optional

SPLIT_BUCKETS = 20


def _local(tag: str) -> str:
  return tag.rsplit("}", 1)[-1].lower()


def _medium(element, path: str) -> str:
  medium = (element.get("medium") or "").lower()
  if medium in ("sms", "chat"):
    return medium
  lowered = path.lower()
  return "chat" if ("chat" in lowered or "cht" in lowered) else "sms"


def conversations_in_file(path: str) -> Iterator[dict]:
  root = ElementTree.parse(path).getroot()
  for conversation in root.iter():
    if _local(conversation.tag) != "conversation":
      continue
    messages = []
    for message in conversation.iter():
      if _local(message.tag) != "message":
        continue
      body = next((c for c in message if _local(c.tag) == "body"), None)
      text = "".join((body if body is not None else message).itertext()).strip()
      messages.append({
          "id": message.get("id", str(len(messages))),
          "participant": message.get("participant") or message.get("speaker")
                         or message.get("from") or "unknown",
          "datetime": message.get("datetime", ""),
          "text": text,
      })
    if messages:
      conversation_id = conversation.get("id") or os.path.basename(path)
      yield {"conversation_id": conversation_id,
             "medium": _medium(conversation, path), "messages": messages}


def split_of(conversation_id: str) -> str:
  bucket = zlib.crc32(conversation_id.encode()) % SPLIT_BUCKETS
  return {0: "test", 1: "validation"}.get(bucket, "train")


def convert(*, ldc_root: str, out_dir: str,
            summaries_path: Optional[str] = None) -> Dict[str, int]:
  """Writes {train,validation,test}.jsonl; returns conversations per split."""
  summaries = {}
  if summaries_path:
    with open(summaries_path, encoding="utf-8") as f:
      for line in f:
        if line.strip():
          record = json.loads(line)
          summaries[record["conversation_id"]] = record["summary"]
  xml_files = sorted(
      os.path.join(d, name) for d, _, names in os.walk(ldc_root)
      for name in names if name.lower().endswith(".xml"))
  if not xml_files:
    raise FileNotFoundError(f"no *.xml files under {ldc_root} (LDC2018T19)")
  os.makedirs(out_dir, exist_ok=True)
  counts = {"train": 0, "validation": 0, "test": 0}
  outputs = {s: open(os.path.join(out_dir, f"{s}.jsonl"), "w", encoding="utf-8")
             for s in counts}
  try:
    for path in xml_files:
      for conversation in conversations_in_file(path):
        if conversation["conversation_id"] in summaries:
          conversation["summary"] = summaries[conversation["conversation_id"]]
        split = split_of(conversation["conversation_id"])
        outputs[split].write(json.dumps(conversation, ensure_ascii=False) + "\n")
        counts[split] += 1
  finally:
    for f in outputs.values():
      f.close()
  return counts


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--ldc_root", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--summaries", default=None)
  args = parser.parse_args()
  print(convert(ldc_root=args.ldc_root, out_dir=args.out,
                summaries_path=args.summaries))


if __name__ == "__main__":
  main()
