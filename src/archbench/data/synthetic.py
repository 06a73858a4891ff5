"""Synthetic capability tasks: instances generated deterministically from a seed.

A synthetic data set is a config entry such as ``mqar: {synthetic: mqar, seed: 0, n_pairs: 8}``
instead of a text file. Its task (a registry entry of `TASKS`) turns (knobs, seed, split) into
fixed-length instances over a small symbolic vocabulary: token ids (n, L) and an answer mask
(n, L), True on the answer tokens. Every instance is a pure function of its inputs; the train and
validation splits come from different random streams (they can share an instance only by
chance).

Tasks:

- ``mqar``: multi-query associative recall (Arora et al. 2023, "Zoology"). Key-value pairs, then
  queries of some of the keys, each followed by its value (the answer):

      <bos> k3 v7 k12 v1 ... k5 v9  k12 v1 _ k3 v7 ...     answers: the values after the queries

  Keys are distinct (so every answer is unique) and drawn from the first half of the non-special
  vocabulary, values (also distinct, as in Zoology) from the second half. The queried keys are
  drawn with replacement: Zoology queries every key once but keeps the answers out of the input;
  here the answers are in the sequence (the model reads its earlier answers), and queries without
  repetition would let it answer the last ones by elimination instead of recall. If `seq_len`
  leaves room, the query section is padded with filler tokens ``_`` at random places between the
  queries (Zoology puts queries at random gaps too, drawn from a power law; here uniform).
- ``path_star``: path-star graph planning (Bachmann & Nagarajan 2024, "The pitfalls of
  next-token prediction"). A centre with `degree` arms of `path_length` nodes each (node labels
  distinct random ids below `n_nodes`); the edges, directed away from the centre, are listed in
  random order, then the start (the centre) and the goal (the leaf of one arm), then the answer,
  the path from start to goal (path_length + 1 nodes):

      <bos> 4 17 | 9 2 | 17 9 | ... / 4 2 = 4 17 9 2

  In a tree the path is unique. Given the previous node, every next node but the first is found
  by looking up an edge (the "Clever Hans" shortcut that teacher forcing teaches); the first step
  from the centre needs planning, so teacher-forced models tend to pick the right arm with
  probability 1 / degree only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers

from archbench.errors import ConfigError
from archbench.options import (
    coerce_all,
    number_from_text,
    option,
    options_of,
    suggest,
    unknown_key_error,
)

SPLIT_STREAMS = {"train": 0, "val": 1}
# Leading entropy word of every generation stream [_STREAM, data seed, split], which keeps
# generated data apart from the training batches' streams (seed, step). numpy pads a shorter key
# with zero words, so the two kinds meet only where a training seed equals _STREAM (99,080,826):
# its batch at step s then draws from the stream of data seed s's train split.
_STREAM = 0x5E7_DA7A
# Seeds (data and training) are one 32-bit entropy word each: a larger one would take two words,
# and e.g. data seed 2**32's train split would be data seed 0's validation split.
MAX_SEED = 2**32 - 1


def check_seed(seed: object, where: str) -> int:
    """`seed` if it is an integer in 0 … MAX_SEED, else a ConfigError naming `where`."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"{where}: must be an integer from 0 to {MAX_SEED}, got {seed!r}")
    return seed


BOS = "<bos>"


@dataclass(frozen=True)
class Instances:
    """Instances of one split: token ids (n, L) int64 and the answer mask (n, L) bool."""

    ids: np.ndarray
    mask: np.ndarray


SUBSET_CHUNK_FLOATS = 1 << 24  # random keys ranked at once (128 MiB, and their argsort as much)


def _random_subsets(rng: np.random.Generator, n: int, population: int, size: int) -> np.ndarray:
    """(n, size) int64: per row, `size` distinct values of range(population) in random order.

    Each row ranks `population` uniform keys. The rows are drawn in chunks, which consume the
    generator's stream exactly as one (n, population) draw would (same instances), in bounded
    memory when the vocabulary is large.
    """
    subsets = np.empty((n, size), dtype=np.int64)
    rows = max(1, SUBSET_CHUNK_FLOATS // population)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        subsets[start:stop] = np.argsort(rng.random((stop - start, population)), axis=1)[:, :size]
    return subsets


@dataclass(frozen=True)
class SyntheticTask:
    """Knobs shared by every task; subclasses add theirs and lay out their instances."""

    name: ClassVar[str]
    n_train: int = option(20_000, "training instances", min=1)
    n_val: int = option(500, "validation instances", min=1)

    def symbols(self) -> list[str]:
        """Every token of the task's vocabulary; a token's id is its index."""
        raise NotImplementedError

    def instance_length(self) -> int:
        """L: tokens per instance (a model reads L - 1 of them)."""
        raise NotImplementedError

    def validate(self) -> None:
        """Check constraints between knobs; raise ConfigError naming them."""

    def sample(self, rng: np.random.Generator, n: int) -> Instances:
        """`n` instances drawn from `rng`."""
        raise NotImplementedError

    def knobs(self) -> dict[str, Any]:
        """Every knob's value (defaults included)."""
        return asdict(self)

    def problems(self, instances: Instances) -> np.ndarray:
        """(n, K) rows that are equal exactly when two instances pose the same problem: what
        decides the answers, with the order of unordered parts (pairs, edges) removed."""
        raise NotImplementedError

    def generate(self, seed: int, split: str) -> Instances:
        """The instances of `split` ("train" or "val") for data seed `seed`: a pure function."""
        if split not in SPLIT_STREAMS:
            raise ConfigError(f"unknown split {split!r}; choose one of {', '.join(SPLIT_STREAMS)}")
        rng = np.random.default_rng([_STREAM, seed, SPLIT_STREAMS[split]])
        return self.sample(rng, self.n_train if split == "train" else self.n_val)

    def tokenizer(self) -> Tokenizer:
        """A word-level tokenizer over `symbols()` (split at whitespace), so ids decode readably.

        It has no unknown token: encoding a word outside the vocabulary is an error.
        """
        vocab = {symbol: i for i, symbol in enumerate(self.symbols())}
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        return tok


@dataclass(frozen=True)
class MQAR(SyntheticTask):
    """Multi-query associative recall: key-value pairs, then queried keys each followed by its
    value (see the module docstring)."""

    name: ClassVar[str] = "mqar"
    specials: ClassVar[tuple[str, ...]] = (BOS, "_")  # "_": filler between queries
    vocab_size: int = option(64, "tokens in all: 2 specials, then half keys, half values", min=4)
    n_pairs: int = option(8, "key-value pairs per instance", min=1)
    n_queries: int = option(8, "queried keys per instance (drawn with replacement)", min=1)
    seq_len: int = option(
        0, "instance length; 0 = tight (1 + 2 n_pairs + 2 n_queries), more = filler gaps", min=0
    )

    @property
    def n_keys(self) -> int:
        """Size of the key vocabulary."""
        return (self.vocab_size - len(self.specials)) // 2

    @property
    def n_values(self) -> int:
        """Size of the value vocabulary."""
        return self.vocab_size - len(self.specials) - self.n_keys

    def symbols(self) -> list[str]:
        """<bos>, _, k0 … k{K-1}, v0 … v{V-1}."""
        keys = [f"k{i}" for i in range(self.n_keys)]
        return [*self.specials, *keys, *(f"v{i}" for i in range(self.n_values))]

    def instance_length(self) -> int:
        """seq_len, or the tight length when seq_len is 0."""
        return self.seq_len or 1 + 2 * self.n_pairs + 2 * self.n_queries

    def validate(self) -> None:
        """Enough keys and values for distinct pairs, and room for the queries."""
        if self.n_pairs > min(self.n_keys, self.n_values):
            raise ConfigError(
                f"n_pairs={self.n_pairs} needs as many distinct keys and values, but "
                f"vocab_size={self.vocab_size} gives {self.n_keys} keys and {self.n_values} values"
            )
        tight = 1 + 2 * self.n_pairs + 2 * self.n_queries
        if self.seq_len and self.seq_len < tight:
            raise ConfigError(
                f"seq_len={self.seq_len} is too short for n_pairs={self.n_pairs} and "
                f"n_queries={self.n_queries}: at least {tight} (or 0 for exactly that)"
            )

    def sample(self, rng: np.random.Generator, n: int) -> Instances:
        """Pairs at 1, 2, …; each query block (key, value) at a random place in the query part."""
        p, q, length = self.n_pairs, self.n_queries, self.instance_length()
        first_key, first_value = len(self.specials), len(self.specials) + self.n_keys
        keys = first_key + _random_subsets(rng, n, self.n_keys, p)
        values = first_value + _random_subsets(rng, n, self.n_values, p)
        asked = rng.integers(0, p, size=(n, q))  # which pairs are queried, in query order
        room = length - 1 - 2 * p  # the query section: q blocks of 2 tokens + filler
        # Of the room - q items (q blocks, the rest fillers) choose which are blocks; block i
        # then starts after i earlier blocks and (slot_i - i) fillers.
        slots = np.sort(_random_subsets(rng, n, room - q, q), axis=1)
        starts = 1 + 2 * p + slots + np.arange(q)
        ids = np.full((n, length), self.specials.index("_"), dtype=np.int64)
        ids[:, 0] = self.specials.index(BOS)
        ids[:, 1 : 1 + 2 * p : 2], ids[:, 2 : 2 + 2 * p : 2] = keys, values
        rows = np.arange(n)[:, None]
        ids[rows, starts] = np.take_along_axis(keys, asked, axis=1)
        ids[rows, starts + 1] = np.take_along_axis(values, asked, axis=1)
        mask = np.zeros((n, length), dtype=bool)
        mask[rows, starts + 1] = True
        return Instances(ids, mask)

    def problems(self, instances: Instances) -> np.ndarray:
        """The key-value pairs sorted by key, then the queried keys in order (the fillers'
        places and the order in which the pairs are listed decide no answer)."""
        ids, p = instances.ids, self.n_pairs
        keys, values = ids[:, 1 : 1 + 2 * p : 2], ids[:, 2 : 2 + 2 * p : 2]
        order = np.argsort(keys, axis=1)
        queried = ids[:, :-1][instances.mask[:, 1:]].reshape(len(ids), self.n_queries)
        pairs = [np.take_along_axis(part, order, axis=1) for part in (keys, values)]
        return np.concatenate([*pairs, queried], axis=1)


@dataclass(frozen=True)
class PathStar(SyntheticTask):
    """Path-star graph planning: shuffled edges of a star graph, start and goal, then the path
    (see the module docstring)."""

    name: ClassVar[str] = "path_star"
    specials: ClassVar[tuple[str, ...]] = (BOS, "|", "/", "=")  # edge separator, query, answer
    degree: int = option(2, "arms of the star (choices at the centre)", min=2)
    path_length: int = option(4, "nodes on each arm (the answer has path_length + 1)", min=1)
    n_nodes: int = option(
        32, "node labels 0 … n_nodes-1 (at least 1 + degree * path_length)", min=3
    )

    def symbols(self) -> list[str]:
        """<bos>, |, /, =, then the node labels 0 … n_nodes-1."""
        return [*self.specials, *(str(i) for i in range(self.n_nodes))]

    @property
    def n_edges(self) -> int:
        """Edges of the graph: degree * path_length."""
        return self.degree * self.path_length

    def instance_length(self) -> int:
        """<bos>, edges "u v" with E - 1 separators, "/ s g =", and the path_length + 1 nodes."""
        return 1 + 3 * self.n_edges - 1 + 4 + self.path_length + 1

    def validate(self) -> None:
        """Enough distinct node labels for the graph."""
        needed = 1 + self.n_edges
        if self.n_nodes < needed:
            raise ConfigError(
                f"n_nodes={self.n_nodes} is too small: degree={self.degree} arms of "
                f"path_length={self.path_length} nodes plus the centre need {needed} labels"
            )

    def sample(self, rng: np.random.Generator, n: int) -> Instances:
        """Draw labels, list the edges in random order, pick a goal arm, write out the path."""
        d, arm_len, n_edges = self.degree, self.path_length, self.n_edges
        rows = np.arange(n)[:, None]
        label = len(self.specials) + _random_subsets(rng, n, self.n_nodes, 1 + n_edges)
        centre, arms = label[:, 0], label[:, 1:].reshape(n, d, arm_len)
        parents = np.concatenate([np.repeat(centre[:, None, None], d, 1), arms[:, :, :-1]], 2)
        edges = np.stack([parents, arms], axis=-1).reshape(n, n_edges, 2)
        edges = edges[rows, _random_subsets(rng, n, n_edges, n_edges)]
        goal_arm = rng.integers(0, d, size=n)
        path = np.concatenate([centre[:, None], arms[np.arange(n), goal_arm]], axis=1)
        sep, query, answer = (self.specials.index(s) for s in ("|", "/", "="))
        listed = np.concatenate([edges, np.full((n, n_edges, 1), sep)], axis=2).reshape(n, -1)
        prompt = [
            np.full((n, 1), self.specials.index(BOS)),
            listed[:, :-1],  # no separator after the last edge
            np.full((n, 1), query),
            centre[:, None],
            path[:, -1:],
            np.full((n, 1), answer),
        ]
        ids = np.concatenate([*prompt, path], axis=1).astype(np.int64)
        mask = np.zeros(ids.shape, dtype=bool)
        mask[:, -path.shape[1] :] = True
        return Instances(ids, mask)

    def problems(self, instances: Instances) -> np.ndarray:
        """The edges sorted (as parent * vocabulary + child), then the goal (the order in which
        the edges are listed decides no answer; the start is the centre, fixed by the edges)."""
        ids, n_edges = instances.ids, self.n_edges
        parents, children = ids[:, 1 : 3 * n_edges : 3], ids[:, 2 : 3 * n_edges : 3]
        edges = np.sort(parents * len(self.symbols()) + children, axis=1)
        return np.concatenate([edges, ids[:, 3 * n_edges + 2 : 3 * n_edges + 3]], axis=1)


TASKS: dict[str, type[SyntheticTask]] = {task.name: task for task in (MQAR, PathStar)}


def make_task(name: str, knobs: dict[str, Any]) -> SyntheticTask:
    """The validated task `name` with `knobs` (typed values or strings); ConfigError if bad."""
    if name not in TASKS:
        raise ConfigError(
            f"unknown synthetic task {name!r}{suggest(str(name), TASKS)}; "
            f"choose one of {', '.join(TASKS)}"
        )
    task_cls = TASKS[name]
    task = task_cls(**coerce_all(task_cls, knobs, f"synthetic task '{name}'"))
    task.validate()
    return task


@dataclass(frozen=True)
class SyntheticSpec:
    """A data-set entry generated by a synthetic task: the task, its data seed and all knobs."""

    name: str
    synthetic: str  # a key of TASKS
    seed: int = 0
    knobs: tuple[tuple[str, Any], ...] = ()  # every knob of the task, defaults included

    def task(self) -> SyntheticTask:
        """The configured task."""
        return make_task(self.synthetic, dict(self.knobs))

    def entry(self) -> dict[str, Any]:
        """The config entry that parses back to this spec (for `archbench prepare`)."""
        return {"synthetic": self.synthetic, "seed": self.seed, **dict(self.knobs)}


def parse_synthetic(name: str, entry: dict[str, Any], where: str) -> SyntheticSpec:
    """Validate a `datasets.<name>` entry with a `synthetic:` key; errors name `where` and key."""
    values = dict(entry)
    task_name, seed = values.pop("synthetic"), number_from_text(values.pop("seed", 0), int)
    if not isinstance(task_name, str):
        raise ConfigError(
            f"{where}.synthetic: must be the name of a task ({', '.join(TASKS)}), got {task_name!r}"
        )
    try:
        if task_name in TASKS:
            known = [*options_of(TASKS[task_name]), "seed", "synthetic"]
            for key in values:
                if key not in known:
                    raise unknown_key_error(str(key), f"synthetic task '{task_name}'", known)
        task = make_task(task_name, values)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    check_seed(seed, f"{where}.seed")
    return SyntheticSpec(name, task_name, seed, tuple(task.knobs().items()))
