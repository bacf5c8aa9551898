"""Synthetic coffee-order confirmations: no download, programmatic truth.

  prompt:   "order: 2 latte, 1 mocha\nconfirm:"
  response: " 2 latte, 1 mocha"          (truth: confirms exactly the order)

Small on purpose (5 drinks, counts 1-3, 1-3 distinct drinks; prompt <= 41
bytes, response <= 26 bytes) so a tiny byte-level transformer learns it in a
few hundred CPU steps. The SFT targets come from an imperfect policy (about
half are wrong in realistic ways) so RL has room to improve on SFT.

Held-out orders. There are only 1,815 distinct prompts (375 item sets, each
in every item order), so independent random streams per split would share
almost every prompt. Instead the space is partitioned: each item *set* (the
unit the ground truth sees: it ignores item order) belongs to exactly one
split, chosen by a fixed hash independent of the sampling seed, stratified by
the number of items so every split has 1-, 2- and 3-item orders. With the
default fractions (20% validation, 20% test) the splits hold 1,089 / 363 / 363
distinct prompts (`distinct_prompts(split)`); a split's examples are drawn
from its own orders with the same distribution as before (item count uniform
in 1-3, then a uniform order of that size), so validation and test prompts
never occur in train.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import math
import random
import re
from typing import Dict, Iterator, List, Optional, Tuple

import gin
import seqio

from tasks import common

DRINKS = ("latte", "mocha", "tea", "cocoa", "chai")
MAX_COUNT = 3
MAX_ITEMS = 3
PROMPT_PREFIX = "order: "
PROMPT_SUFFIX = "\nconfirm:"
# Feature lengths that fit every synthetic example, with room for EOS.
FEATURE_LENGTHS = {"prompt": 48, "response": 32}
SFT_FEATURE_LENGTHS = {"inputs": 48, "targets": 32}
SPLITS = ("train", "validation", "test")
# Salt of the split hash: fixed, so the sampling seed never moves an order
# between splits.
_SPLIT_SALT = "perl-synthetic-split/v1"
# "repeated_drink" (" 1 mocha, 1 mocha") is the error RL policies drift to when
# the reward model never saw it rejected: the Hydra-SFT reward model scored
# it above the correct confirmation, and RL moved toward it.
MISTAKES = ("dropped_item", "wrong_count", "swapped_drink", "extra_item",
            "repeated_drink")
# Markers a decoded response may end with; ground truth ignores them.
_EOS_MARKERS = ("</s>", "<eos>", "<|endoftext|>", "<|end_of_text|>", "\x01")
_ITEM = re.compile(r"^([0-9]+) ([a-z]+)$")

Order = Tuple[Tuple[int, str], ...]

_VOCABULARY = seqio.ByteVocabulary()


def vocabulary() -> seqio.ByteVocabulary:
  """The synthetic tasks' vocabulary: bytes, vocab_size 259 (0 pad, 1 EOS)."""
  return _VOCABULARY


@gin.configurable(module="tasks.synthetic")
@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  # Examples in the train split.
  num_train: int = 20_000
  # Examples in the validation split (the RM eval reads 1,000 pairs).
  num_validation: int = 1_000
  # Examples in the test split.
  num_test: int = 1_000
  # Fraction of item sets (per item count) held out for validation.
  validation_fraction: float = 0.2
  # Fraction of item sets (per item count) held out for test.
  test_fraction: float = 0.2
  # Base seed of the sampling streams (the split of an order does not depend on it).
  seed: int = 0
  # Fraction of SFT targets that the imperfect policy gets wrong.
  sft_error_rate: float = 0.5


def format_items(order: Order) -> str:
  return ", ".join(f"{count} {drink}" for count, drink in order)


def make_prompt(order: Order) -> str:
  return f"{PROMPT_PREFIX}{format_items(order)}{PROMPT_SUFFIX}"


def make_response(order: Order) -> str:
  return " " + format_items(order)


def parse_items(text: str) -> Optional[Dict[str, int]]:
  """{drink: count} from "2 latte, 1 mocha"; None if malformed or repeated."""
  items: Dict[str, int] = {}
  for part in text.split(","):
    match = _ITEM.match(part.strip())
    if not match or match.group(2) in items:
      return None
    items[match.group(2)] = int(match.group(1))
  return items


def _strip_eos(text: str) -> str:
  text = text.strip()
  stripped = True
  while stripped:
    stripped = False
    for marker in _EOS_MARKERS:
      if text.endswith(marker):
        text = text[: -len(marker)].rstrip()
        stripped = True
  return text


@gin.register(module="tasks.synthetic")  # RL configs pass it as GROUND_TRUTH
def ground_truth_reward(prompt: str, response: str) -> float:
  """1.0 when `response` confirms exactly the ordered items, else 0.0.

  Item order does not matter; counts and drinks must match exactly, with no
  extra or missing items. Trailing EOS markers and whitespace are ignored.
  """
  prompt = prompt.strip()
  if not prompt.startswith(PROMPT_PREFIX.strip()):
    return 0.0
  body = prompt[len(PROMPT_PREFIX.strip()):]
  if body.endswith(PROMPT_SUFFIX.strip()):
    body = body[: -len(PROMPT_SUFFIX.strip())]
  ordered = parse_items(body.strip())
  confirmed = parse_items(_strip_eos(response))
  return float(ordered is not None and confirmed == ordered)


def random_order(rng: random.Random) -> Order:
  drinks = rng.sample(DRINKS, rng.randint(1, MAX_ITEMS))
  return tuple((rng.randint(1, MAX_COUNT), drink) for drink in drinks)


def mistaken_order(order: Order, rng: random.Random) -> Order:
  """A realistic wrong confirmation: dropped item, wrong count, swapped
  drink, extra item or a drink confirmed twice. A dropped item needs two
  items; an extra item is only added below MAX_ITEMS so every response stays
  within 26 bytes (a repeated drink replaces another item's drink, or is
  added to a one-item order)."""
  choices = [m for m in MISTAKES
             if (m != "dropped_item" or len(order) > 1)
             and (m != "extra_item" or len(order) < MAX_ITEMS)]
  mistake = rng.choice(choices)
  items: List[Tuple[int, str]] = list(order)
  i = rng.randrange(len(items))
  unused = [d for d in DRINKS if d not in {drink for _, drink in items}]
  if mistake == "dropped_item":
    del items[i]
  elif mistake == "wrong_count":
    count, drink = items[i]
    items[i] = (rng.choice([c for c in range(1, MAX_COUNT + 1) if c != count]),
                drink)
  elif mistake == "swapped_drink":
    items[i] = (items[i][0], rng.choice(unused))
  elif mistake == "repeated_drink":
    if len(items) > 1:
      other = rng.choice([j for j in range(len(items)) if j != i])
      items[i] = (items[i][0], items[other][1])
    else:
      items.insert(rng.randrange(2), (rng.randint(1, MAX_COUNT), items[0][1]))
  else:
    items.insert(rng.randrange(len(items) + 1),
                 (rng.randint(1, MAX_COUNT), rng.choice(unused)))
  return tuple(items)


def _split_size(config: SyntheticConfig, split: str) -> int:
  sizes = {"train": config.num_train, "validation": config.num_validation,
           "test": config.num_test}
  if split not in sizes:
    raise ValueError(f"synthetic tasks have splits {SPLITS}, not {split!r}")
  return sizes[split]


Items = Tuple[Tuple[int, str], ...]  # An order's item set, sorted by drink.


def _item_sets(num_items: int) -> List[Items]:
  return [tuple((count, drink) for count, drink in zip(counts, drinks))
          for drinks in itertools.combinations(sorted(DRINKS), num_items)
          for counts in itertools.product(range(1, MAX_COUNT + 1),
                                          repeat=num_items)]


def _hash(items: Items) -> str:
  return hashlib.sha256(f"{_SPLIT_SALT}/{items}".encode()).hexdigest()


@functools.lru_cache(maxsize=None)
def _split_item_sets(split: str, validation_fraction: float,
                     test_fraction: float) -> Tuple[Tuple[Items, ...], ...]:
  """Per item count 1..MAX_ITEMS, the item sets of `split` (disjoint)."""
  if split not in SPLITS:
    raise ValueError(f"synthetic tasks have splits {SPLITS}, not {split!r}")
  per_count = []
  for num_items in range(1, MAX_ITEMS + 1):
    ranked = sorted(_item_sets(num_items), key=_hash)
    n_validation = max(1, round(validation_fraction * len(ranked)))
    n_test = max(1, round(test_fraction * len(ranked)))
    if n_validation + n_test >= len(ranked):
      raise ValueError("validation_fraction + test_fraction leave no "
                       f"{num_items}-item orders for train")
    bounds = {"validation": (0, n_validation),
              "test": (n_validation, n_validation + n_test),
              "train": (n_validation + n_test, len(ranked))}[split]
    per_count.append(tuple(ranked[bounds[0]:bounds[1]]))
  return tuple(per_count)


def split_item_sets(split: str, config: Optional[SyntheticConfig] = None
                    ) -> Tuple[Tuple[Items, ...], ...]:
  config = config or SyntheticConfig()
  return _split_item_sets(split, config.validation_fraction,
                          config.test_fraction)


def distinct_prompts(split: str, config: Optional[SyntheticConfig] = None
                     ) -> int:
  """How many distinct prompts `split` can emit: every order of its sets."""
  return sum(math.factorial(len(items))
             for sets in split_item_sets(split, config) for items in sets)


def split_of(order: Order, config: Optional[SyntheticConfig] = None) -> str:
  """The split whose orders include `order` (any item order)."""
  items = tuple(sorted(order, key=lambda item: item[1]))
  for split in SPLITS:
    if items in split_item_sets(split, config)[len(items) - 1]:
      return split
  raise ValueError(f"{order} is not a synthetic order")


def split_order(rng: random.Random, sets: Tuple[Tuple[Items, ...], ...]
                ) -> Order:
  """`random_order`'s distribution restricted to one split: the item count
  uniform, then every order of that size in the split equally likely."""
  items = rng.choice(sets[rng.randint(1, MAX_ITEMS) - 1])
  return tuple(rng.sample(items, len(items)))


def _rng(config: SyntheticConfig, split: str, kind: str) -> random.Random:
  # A string seed is hashed deterministically (sha512), independent of
  # PYTHONHASHSEED; the split name keeps train and validation streams apart.
  return random.Random(f"perl-synthetic/{config.seed}/{split}/{kind}")


def generate(kind: str, split: str,
             config: Optional[SyntheticConfig] = None) -> Iterator[dict]:
  """Text records of one kind; deterministic in (config.seed, split, kind)."""
  config = config or SyntheticConfig()
  rng = _rng(config, split, kind)
  sets = split_item_sets(split, config)
  for index in range(_split_size(config, split)):
    order = split_order(rng, sets)
    prompt = make_prompt(order)
    if kind == common.PROMPTS:
      yield {"prompt": prompt}
    elif kind == common.SFT:
      wrong = rng.random() < config.sft_error_rate
      target = mistaken_order(order, rng) if wrong else order
      yield {"inputs": prompt, "targets": make_response(target)}
    elif kind == common.PREFERENCE:
      yield {"prompt": prompt, "chosen": make_response(order),
             "rejected": make_response(mistaken_order(order, rng))}
    elif kind == common.POINTWISE:
      # Alternating labels: exactly balanced; seqio shuffles for training.
      correct = index % 2 == 0
      response = order if correct else mistaken_order(order, rng)
      yield {"prompt": prompt, "response": make_response(response),
             "label": float(correct)}
    else:
      raise ValueError(f"unknown kind {kind!r}")


def register() -> None:
  for kind in common.KINDS:
    common.register_task(
        f"synthetic_{kind}", kind=kind, splits=SPLITS,
        records_fn=lambda split, kind=kind: generate(kind, split),
        vocabulary=vocabulary(),
        suggested_lengths=(SFT_FEATURE_LENGTHS if kind == common.SFT else
                           {k: v for k, v in FEATURE_LENGTHS.items()
                            if kind != common.PROMPTS or k == "prompt"}))
