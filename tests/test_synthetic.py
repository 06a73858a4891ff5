"""Synthetic tasks: generators (validity checked by brute force, determinism, separate streams),
config entries, prepared files, instance batches and masked losses, and the task evaluation."""

from __future__ import annotations

import json
import re
import shutil
from collections import deque
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from archbench.cli import main
from archbench.data import (
    MASK_FILES,
    Instances,
    SyntheticSpec,
    check_local_copy,
    load_instances,
    load_meta,
    load_tokenizer,
    make_task,
    parse_datasets,
    prepare_dataset,
    synthetic,
)
from archbench.data.synthetic import MQAR, PathStar
from archbench.errors import ConfigError, DataError
from archbench.evaluate.submodels import SUBMODELS
from archbench.evaluate.synthetic import evaluate_task, greedy_answers, score_instances
from archbench.generate import generate
from archbench.io import read_json
from archbench.models import build_model
from archbench.models.fractalformer import SubModelView, parse_submodel
from archbench.models.futureformer import bag_loss
from archbench.runs import load_run
from archbench.train import (
    IGNORE_INDEX,
    estimate_val_loss,
    instance_batch_at,
    make_train_config,
    train_run,
)

MQAR_CASES = [
    {},
    {"vocab_size": 20, "n_pairs": 4, "n_queries": 3, "seq_len": 30},
    {"vocab_size": 9, "n_pairs": 3, "n_queries": 1, "seq_len": 12},
    {"vocab_size": 10, "n_pairs": 2, "n_queries": 5},
]
PATH_CASES = [{}, {"degree": 3, "path_length": 1, "n_nodes": 4}, {"degree": 5, "path_length": 3}]
SMALL = {"n_train": 64, "n_val": 16}
SHAPE = {"n_layer": 1, "n_head": 2, "d_model": 16}


# --- brute-force readers of instances -----------------------------------------------------------


def read_mqar(task: MQAR, ids: np.ndarray, mask: np.ndarray) -> None:
    """Check one MQAR instance token by token and that the mask marks exactly the answers."""
    symbols = task.symbols()
    words = [symbols[i] for i in ids]
    assert len(words) == task.instance_length() and words[0] == "<bos>"
    keys, values = words[1 : 1 + 2 * task.n_pairs : 2], words[2 : 2 + 2 * task.n_pairs : 2]
    pairs = dict(zip(keys, values, strict=True))
    assert len(pairs) == task.n_pairs  # distinct keys: every answer is unique
    assert len(set(pairs.values())) == task.n_pairs
    assert all(k[0] == "k" and v[0] == "v" for k, v in pairs.items())
    answers, queried, position = [], [], 1 + 2 * task.n_pairs
    while position < len(words):
        if words[position] == "_":
            position += 1
            continue
        key, value = words[position], words[position + 1]
        assert pairs[key] == value
        queried.append(key)
        answers.append(position + 1)
        position += 2
    assert len(queried) == task.n_queries
    assert np.flatnonzero(mask).tolist() == answers


def star_paths(task: PathStar, ids: np.ndarray) -> tuple[list[str], list[list[str]]]:
    """The instance's answer words and every simple start-goal path of its edge list (treated
    as undirected), found by exhaustive search after a BFS check that the graph is a tree."""
    symbols = task.symbols()
    words = [symbols[i] for i in ids]
    prompt, answer = " ".join(words).split(" = ")
    edge_text, query = prompt.removeprefix("<bos> ").split(" / ")
    edges = [tuple(edge.split()) for edge in edge_text.split(" | ")]
    start, goal = query.split()
    assert len(edges) == task.degree * task.path_length
    neighbours: dict[str, set[str]] = {}
    for u, v in edges:
        neighbours.setdefault(u, set()).add(v)
        neighbours.setdefault(v, set()).add(u)
    assert len(neighbours) == len(edges) + 1  # nodes distinct
    seen, queue = {start}, deque([start])
    while queue:
        for nxt in neighbours[queue.popleft()] - seen:
            seen.add(nxt)
            queue.append(nxt)
    assert seen == set(neighbours)  # connected with |E| = |V| - 1: a tree
    assert len(neighbours[start]) == task.degree and len(neighbours[goal]) == 1
    paths: list[list[str]] = []

    def walk(path: list[str]) -> None:
        if path[-1] == goal:
            paths.append(path)
            return
        for nxt in sorted(neighbours[path[-1]] - set(path)):
            walk([*path, nxt])

    walk([start])
    return answer.split(), paths


# --- generators ---------------------------------------------------------------------------------


@pytest.mark.parametrize("knobs", MQAR_CASES)
def test_mqar_instances_are_valid(knobs: dict) -> None:
    task = make_task("mqar", {**knobs, **SMALL})
    for split in ("train", "val"):
        instances = task.generate(3, split)
        assert instances.ids.shape == instances.mask.shape
        assert instances.ids.shape == (
            task.n_train if split == "train" else task.n_val,
            task.instance_length(),
        )
        for ids, mask in zip(instances.ids, instances.mask, strict=True):
            read_mqar(task, ids, mask)


def test_mqar_queries_are_drawn_with_replacement() -> None:
    """Some instances ask a key twice (so answered values reveal nothing about the rest)."""
    task = make_task("mqar", SMALL)
    ids = task.generate(0, "train").ids
    asked = ids[:, 1 + 2 * task.n_pairs :: 2]
    repeats = [len(set(row.tolist())) < task.n_queries for row in asked]
    assert sum(repeats) > len(repeats) / 2  # 8 draws of 8 keys repeat one with p = 0.998


def test_mqar_gaps_spread_over_the_query_section() -> None:
    """With room to spare, queries sit at different places, and the filler fills the rest."""
    task = make_task("mqar", {"vocab_size": 20, "n_pairs": 4, "n_queries": 2, "seq_len": 30})
    mask = task.generate(0, "train").mask
    assert len({tuple(np.flatnonzero(row)) for row in mask}) > 20
    assert mask[:, : 1 + 2 * 4 + 1].sum() == 0


@pytest.mark.parametrize("knobs", PATH_CASES)
def test_path_star_instances_are_valid_and_the_answer_is_the_unique_path(knobs: dict) -> None:
    task = make_task("path_star", {**knobs, **SMALL})
    instances = task.generate(1, "train")
    length = task.path_length + 1
    assert instances.ids.shape == (64, task.instance_length())
    assert (instances.mask.sum(axis=1) == length).all() and instances.mask[:, -length:].all()
    for ids in instances.ids:
        answer, paths = star_paths(task, ids)
        assert paths == [answer] and len(answer) == length


def test_path_star_goal_arms_and_edge_orders_vary() -> None:
    task = make_task("path_star", {"degree": 3, **SMALL})
    instances = task.generate(0, "train")
    second = {int(ids[-task.path_length]) for ids in instances.ids}  # first step from the centre
    assert len(second) > 10
    first_edges = {tuple(ids[1:3]) for ids in instances.ids}
    centres = {int(ids[-task.path_length - 1]) for ids in instances.ids}
    assert any(int(edge[0]) not in centres for edge in first_edges)  # not always a centre edge


@pytest.mark.parametrize(("name", "knobs"), [("mqar", {}), ("path_star", {})])
def test_generation_is_deterministic_with_separate_streams(name: str, knobs: dict) -> None:
    task = make_task(name, {**knobs, "n_train": 200, "n_val": 50})
    train, again = task.generate(0, "train"), task.generate(0, "train")
    assert np.array_equal(train.ids, again.ids) and np.array_equal(train.mask, again.mask)
    val = task.generate(0, "val")
    assert not {r.tobytes() for r in val.ids} & {r.tobytes() for r in train.ids}
    assert not np.array_equal(task.generate(1, "train").ids[:50], train.ids[:50])
    bigger_val = make_task(name, {**knobs, "n_train": 200, "n_val": 80})
    assert np.array_equal(bigger_val.generate(0, "train").ids, train.ids)  # train ignores n_val
    bigger_train = make_task(name, {**knobs, "n_train": 300, "n_val": 50})
    assert np.array_equal(bigger_train.generate(0, "val").ids, val.ids)  # val ignores n_train


@pytest.mark.parametrize(("name", "knobs"), [("mqar", {}), ("path_star", {})])
def test_drawing_in_chunks_gives_the_same_instances(
    name: str, knobs: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bounded memory for large vocabularies must not change a seed's data."""
    task = make_task(name, {**knobs, "n_train": 300, "n_val": 5})
    whole = task.generate(0, "train")
    monkeypatch.setattr(synthetic, "SUBSET_CHUNK_FLOATS", 100)  # a few rows per chunk
    chunked = task.generate(0, "train")
    assert np.array_equal(whole.ids, chunked.ids) and np.array_equal(whole.mask, chunked.mask)


def test_tokenizer_decodes_symbol_names() -> None:
    task = make_task("path_star", {"degree": 2, "path_length": 1, "n_nodes": 3})
    tok = task.tokenizer()
    assert task.symbols() == ["<bos>", "|", "/", "=", "0", "1", "2"]
    assert tok.decode([0, 4, 5, 1, 4, 6, 2, 4, 6, 3, 4, 6]) == "<bos> 0 1 | 0 2 / 0 2 = 0 2"
    assert tok.encode("<bos> 2 | 0").ids == [0, 6, 1, 4]
    with pytest.raises(Exception, match="UNK|unk"):
        tok.encode("ROMEO:")


# --- config entries -----------------------------------------------------------------------------


def test_synthetic_entry_parses_with_defaults_and_round_trips() -> None:
    specs = parse_datasets({"ps": {"synthetic": "path_star", "seed": 4, "degree": 3}})
    spec = specs["ps"]
    assert isinstance(spec, SyntheticSpec) and spec.seed == 4
    assert dict(spec.knobs) == {
        "n_train": 20_000,
        "n_val": 500,
        "degree": 3,
        "path_length": 4,
        "n_nodes": 32,
    }
    assert parse_datasets({"ps": spec.entry()}) == specs
    assert not check_local_copy(spec, None)
    text = parse_datasets(
        {"t": {"path": "a/b.txt", "sha256": "ab" * 32, "tokenizer": "bpe", "vocab_size": 300}}
    )
    assert parse_datasets({"t": text["t"].entry()}) == text


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"synthetic": "mqr"}, r"unknown synthetic task 'mqr' \(did you mean 'mqar'\?\)"),
        ({"synthetic": "mqar", "n_pair": 2}, r"unknown option 'n_pair' .*did you mean 'n_pairs'"),
        ({"synthetic": "mqar", "sha256": "ab"}, r"unknown option 'sha256' for synthetic task"),
        ({"synthtic": "mqar"}, r"unknown key 'synthtic' \(did you mean 'synthetic'\?\)"),
        ({"synthetic": "mqar", "n_pairs": 40}, r"n_pairs=40 needs .* 31 keys and 31 values"),
        ({"synthetic": "mqar", "seq_len": 20}, r"seq_len=20 is too short .* at least 33"),
        ({"synthetic": "path_star", "n_nodes": 8}, r"n_nodes=8 is too small: .* need 9 labels"),
        ({"synthetic": "path_star", "degree": 1}, r"option 'degree': 1 is out of range"),
        ({"synthetic": "path_star", "degree": "x"}, r"option 'degree': 'x' is not a valid int"),
        ({"synthetic": "mqar", "seed": -1}, r"datasets.s.seed: must be an integer from 0 to"),
        # two entropy words: data seed 2**32's train split would be data seed 0's val split
        ({"synthetic": "mqar", "seed": 2**32}, r"datasets.s.seed: .* to 4294967295, got 4294"),
    ],
)
def test_bad_synthetic_entries_name_the_entry_and_key(entry: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=r"test.yaml: datasets.s") as err:
        parse_datasets({"s": entry}, source="test.yaml")
    assert err.match(message)


# --- prepared files -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared path-star data set: 64 train and 16 val instances of 19 tokens."""
    out = tmp_path_factory.mktemp("path_star")
    entry = {"synthetic": "path_star", "seed": 2, "degree": 2, "path_length": 2, "n_nodes": 9}
    prepare_dataset(parse_datasets({"ps": {**entry, **SMALL}})["ps"], out)
    return out


def test_prepare_writes_instances_masks_tokenizer_and_meta(prepared: Path, tmp_path: Path) -> None:
    meta = load_meta(prepared)
    task = make_task("path_star", {"degree": 2, "path_length": 2, "n_nodes": 9, **SMALL})
    assert meta["task"] == "path_star" and meta["instance_length"] == 19 == task.instance_length()
    assert meta["vocab_size"] == 13 and meta["n_train_tokens"] == 64 * 19
    assert meta["seed"] == 2 and meta["knobs"]["n_nodes"] == 9
    assert sorted(MASK_FILES.values()) == ["train_mask.bin", "val_mask.bin"]
    for split in ("train", "val"):
        expected, loaded = task.generate(2, split), load_instances(prepared, split)
        assert np.array_equal(loaded.ids, expected.ids)
        assert np.array_equal(loaded.mask, expected.mask)
        assert (prepared / MASK_FILES[split]).stat().st_size == expected.ids.size
    words = load_tokenizer(prepared).decode(load_instances(prepared, "val").ids[0].tolist())
    assert words.startswith("<bos> ") and " / " in words and len(words.split()) == 19
    again = tmp_path / "again"
    prepare_dataset(
        parse_datasets(
            {
                "ps": {
                    "synthetic": "path_star",
                    "seed": 2,
                    "degree": 2,
                    "path_length": 2,
                    "n_nodes": 9,
                    **SMALL,
                }
            }
        )["ps"],
        again,
    )
    for name in ("train.bin", "val_mask.bin", "meta.json", "tokenizer.json"):
        assert (again / name).read_bytes() == (prepared / name).read_bytes()


def test_preparation_counts_validation_instances_that_occur_in_training(
    prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Few distinct instances (3 labels, 2 arms of 1 node: at most 24) let validation repeat
    training, which preparation records and warns about; the varied fixture has none."""

    def seen(data_dir: Path) -> int:  # here (one edge per arm) identical rows are the repeats
        train = {tuple(row) for row in load_instances(data_dir, "train").ids.tolist()}
        return sum(tuple(row) in train for row in load_instances(data_dir, "val").ids.tolist())

    capsys.readouterr()
    entry = {"synthetic": "path_star", "seed": 2, "degree": 2, "path_length": 1, "n_nodes": 3}
    prepare_dataset(parse_datasets({"few": {**entry, **SMALL}})["few"], tmp_path)
    repeated = load_meta(tmp_path)["n_val_in_train"]
    assert repeated == seen(tmp_path) > 0
    assert f"warning: {repeated} of 16 validation instances of 'few'" in capsys.readouterr().err
    assert load_meta(prepared)["n_val_in_train"] == seen(prepared) == 0


@pytest.mark.parametrize(
    ("name", "knobs"),
    [
        ("path_star", {"degree": 3, "path_length": 2, "n_nodes": 9}),
        ("mqar", {"vocab_size": 12, "n_pairs": 3, "n_queries": 4, "seq_len": 24}),
    ],
)
def test_a_problem_is_the_same_whatever_order_its_parts_are_listed_in(
    name: str, knobs: dict
) -> None:
    """`problems` drops only what decides no answer: the listed order of the pairs or edges (and
    MQAR's filler places); changing an answer-deciding part changes the problem."""
    task = make_task(name, {**knobs, "n_train": 1, "n_val": 1})
    instances = task.generate(0, "train")
    ids, mask = instances.ids[0], instances.mask[0]
    shuffled, changed = ids.copy(), ids.copy()
    if name == "path_star":  # edges "u v" at 1 + 3e, 2 + 3e, listed in reverse; another goal
        for first in (1, 2):
            shuffled[first : 3 * task.n_edges : 3] = ids[first : 3 * task.n_edges : 3][::-1]
        changed[3 * task.n_edges + 2] += 1
    else:  # pairs "k v" at 1, 2, 3, ..., listed in reverse; another first query
        pairs = ids[1 : 1 + 2 * task.n_pairs].reshape(-1, 2)
        shuffled[1 : 1 + 2 * task.n_pairs] = pairs[::-1].ravel()
        changed[np.flatnonzero(mask)[0] - 1] += 1
    assert not np.array_equal(shuffled, ids)
    for other, same in ((shuffled, True), (changed, False)):
        rows = task.problems(Instances(np.stack([ids, other]), np.stack([mask, mask])))
        assert np.array_equal(rows[0], rows[1]) == same


def test_repeats_of_a_problem_in_another_listed_order_are_counted(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A path-star graph of 7 labels: few instances repeat row for row, but most validation
    problems recur in training with their edges listed in another order."""
    entry = {"synthetic": "path_star", "degree": 2, "path_length": 3, "n_nodes": 7}
    spec = parse_datasets({"g": {**entry, "n_train": 20_000, "n_val": 500}})["g"]
    prepare_dataset(spec, tmp_path)
    train, val = (load_instances(tmp_path, split).ids for split in ("train", "val"))
    rows = {tuple(row) for row in train.tolist()}
    identical = sum(tuple(row) in rows for row in val.tolist())
    repeated = load_meta(tmp_path)["n_val_in_train"]
    assert repeated > 400 > 10 > identical
    assert f"warning: {repeated} of 500 validation instances of 'g'" in capsys.readouterr().err


def test_a_synthetic_entry_that_is_not_a_task_name_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"datasets.x.synthetic: must be the name of a task"):
        parse_datasets({"x": {"synthetic": ["mqar"]}})


def test_load_instances_refuses_text_data_and_a_truncated_mask(
    tiny_data: Path, prepared: Path, tmp_path: Path
) -> None:
    with pytest.raises(DataError, match="is not synthetic"):
        load_instances(tiny_data, "train")
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in prepared.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    (broken / "val_mask.bin").write_bytes(b"\x01" * 10)
    with pytest.raises(DataError, match="val_mask.bin is truncated"):
        load_instances(broken, "val")


# --- batches and masked losses ------------------------------------------------------------------


def test_instance_batches_are_pure_whole_instances_with_masked_targets(prepared: Path) -> None:
    train = load_instances(prepared, "train")
    x, y = instance_batch_at(train, 5, 7, 6, "answers")
    x2, y2 = instance_batch_at(train, 5, 7, 6, "answers")
    assert torch.equal(x, x2) and torch.equal(y, y2) and x.shape == y.shape == (6, 18)
    assert not torch.equal(instance_batch_at(train, 5, 8, 6, "answers")[0], x)
    assert not torch.equal(instance_batch_at(train, 6, 7, 6, "answers")[0], x)
    for row_x, row_y in zip(x, y, strict=True):
        (match,) = [i for i, ids in enumerate(train.ids) if np.array_equal(ids[:-1], row_x)]
        kept = train.mask[match, 1:]
        assert row_y[~torch.from_numpy(kept)].eq(IGNORE_INDEX).all()
        assert np.array_equal(row_y[torch.from_numpy(kept)].numpy(), train.ids[match, 1:][kept])
        assert int(kept.sum()) == 3  # path of length 2: three answer tokens
    _, y_all = instance_batch_at(train, 5, 7, 6, "all")
    assert torch.equal(y_all[y != IGNORE_INDEX], y[y != IGNORE_INDEX]) and (y_all >= 0).all()


def test_loss_mask_option_is_validated() -> None:
    assert make_train_config({"loss_mask": "all"}).loss_mask == "all"
    with pytest.raises(ConfigError, match="option 'loss_mask': 'answer' is not one of answers"):
        make_train_config({"loss_mask": "answer"})


def masked_batch(vocab: int, length: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random inputs (2, length), full targets, and the targets with only 5 answers kept."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (2, length), generator=generator)
    full = torch.randint(0, vocab, (2, length), generator=generator)
    keep = torch.zeros(2, length, dtype=torch.bool)
    keep[0, [3, 9, 15]] = keep[1, [0, 12]] = True
    return x, full, full.masked_fill(~keep, IGNORE_INDEX)


def answer_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the targets that are not IGNORE_INDEX, one by one."""
    losses = [
        -torch.log_softmax(logits[b, t], dim=-1)[targets[b, t]]
        for b, t in (targets != IGNORE_INDEX).nonzero().tolist()
    ]
    return torch.stack(losses).mean()


def tiny(arch: str, **options: object) -> nn.Module:
    """A small float64 model with every weight redrawn from N(0, 0.3), so that its predictions
    differ from position to position (some initialisations start out near uniform)."""
    torch.manual_seed(0)
    model = build_model(arch, 23, 16, **SHAPE, **options).double().eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)
    return model


@pytest.mark.parametrize("arch", ["gpt", "hourglass", "future_attention", "mtp", "futureformer"])
def test_next_token_loss_counts_the_answers_only(arch: str) -> None:
    model = tiny(arch)
    x, _, masked = masked_batch(23)
    other = masked.clone()
    other[0, 3] = (other[0, 3] + 1) % 23  # another answer
    with torch.no_grad():
        for targets in (masked, other):
            _, parts = model.loss(x, targets)
            expected = answer_ce(model(x), targets)
            # Some losses are computed in float32 whatever the model's precision.
            torch.testing.assert_close(parts["next_token"].double(), expected, rtol=1e-6, atol=0)
    assert not torch.isclose(answer_ce(model(x), masked), expected, rtol=1e-4)


def test_fractalformer_next_token_loss_counts_the_answers_only() -> None:
    model = tiny("fractalformer")
    x, _, masked = masked_batch(23)
    with torch.no_grad():
        _, parts = model.loss(x, masked)
        expected = answer_ce(model(x), masked)
    torch.testing.assert_close(parts["next_token"].double(), expected, rtol=1e-6, atol=1e-6)


def test_mtp_future_heads_count_the_answers_only() -> None:
    model = tiny("mtp", n_future=3)
    x, _, masked = masked_batch(23)
    with torch.no_grad():
        _, parts = model.loss(x, masked)
        trunk = model.trunk_states(x)
        for k in (2, 3):
            logits = model.unembed(model.norm_out(model.heads[k - 1](trunk)))
            expected = answer_ce(logits[:, : 16 - k + 1], masked[:, k - 1 :])
            torch.testing.assert_close(parts[f"future_{k}"].double(), expected, rtol=1e-6, atol=0)


def test_bag_loss_leaves_ignored_ids_out_of_the_bag() -> None:
    logits = torch.tensor([[0.5, -1.0, 2.0, 0.0], [1.0, 0.0, -2.0, 0.5]], dtype=torch.float64)
    offset = torch.tensor(-0.5, dtype=torch.float64)
    ids = torch.tensor([[IGNORE_INDEX, 2, IGNORE_INDEX], [IGNORE_INDEX] * 3])
    z = logits + offset
    softplus = torch.log1p(torch.exp(z))
    expected_bce = torch.stack([softplus[0].sum() - z[0, 2], softplus[1].sum()])  # bags {2}, {}
    torch.testing.assert_close(bag_loss(logits, ids, "bce", offset), expected_bce)
    expected_ce = torch.stack([-torch.log_softmax(logits[0], 0)[2], torch.tensor(0.0).double()])
    torch.testing.assert_close(bag_loss(logits, ids, "softmax_ce", None), expected_ce)


@pytest.mark.parametrize("future_loss", ["bce", "softmax_ce"])
def test_futureformer_span_losses_use_the_answer_tokens_only(future_loss: str) -> None:
    """Each span loss recomputed position by position: bags of the kept tokens only, positions
    without a kept token (or without the whole span) left out."""
    model = tiny("futureformer", future_loss=future_loss, future_levels=2)
    x, _, masked = masked_batch(23)
    with torch.no_grad():
        _, spans = model.states(x, masked)
        h = model.embed(x)
        for block in model.body:
            h = block(h)
        for level, pool, k in zip(model.levels, model.pools, (2, 1), strict=True):
            logits = model.head(h)
            offset, length = model.config.span_layout()[k - 1]
            bias = model.bag_bias[k - 1] if future_loss == "bce" else None
            rows = []
            for b in range(2):
                for t in range(16 - offset - length + 2):
                    window = masked[b, t + offset - 1 : t + offset - 1 + length]
                    kept = window[window != IGNORE_INDEX]
                    if len(kept):
                        rows.append(bag_loss(logits[b, t][None], kept[None], future_loss, bias))
            torch.testing.assert_close(spans[k], torch.cat(rows).mean(), rtol=1e-12, atol=1e-12)
            top, weights, _ = model.read_span(h, k, None)
            h = level(h, pool(model.norm_memory(model.embed(top)) * weights.unsqueeze(-1), h))


def test_validation_loss_skips_ignored_targets() -> None:
    model = tiny("gpt")
    x, _, masked = masked_batch(23)
    runtime = type("CPU", (), {"put": staticmethod(lambda t: t), "autocast": torch.no_grad})()
    batches = [(x[:1], masked[:1]), (x[1:], masked[1:])]
    with torch.no_grad():
        expected = answer_ce(model(x), masked)
    assert estimate_val_loss(model, batches, runtime) == pytest.approx(float(expected), rel=1e-6)


# --- training on a synthetic data set -----------------------------------------------------------


def synthetic_spec(**train: object) -> dict:
    return {
        "experiment": "ps",
        "arch": "gpt",
        "dataset": "ps",
        "seed": 0,
        "model": SHAPE,
        "train": {
            "block_size": 18,
            "batch_size": 4,
            "token_budget": 18 * 4 * 6,
            "warmup_steps": 1,
            "eval_every": 3,
            "eval_batches": 2,
            **train,
        },
    }


@pytest.fixture(scope="module")
def trained(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of 6 steps on `prepared`."""
    out = tmp_path_factory.mktemp("run")
    train_run(synthetic_spec(), prepared, out, show_progress=False)
    return out


def test_training_counts_instance_tokens_and_refuses_a_short_block(
    trained: Path, prepared: Path, tmp_path: Path
) -> None:
    summary = read_json(trained / "train_summary.json")
    assert summary["train_steps"] == 6 and summary["train_tokens"] == 6 * 4 * 18
    assert np.isfinite(summary["final_val_loss"])
    with pytest.raises(ConfigError, match="instances of 19 tokens: block_size=17 must be at least"):
        train_run(synthetic_spec(block_size=17, token_budget=400), prepared, tmp_path)


@pytest.mark.parametrize(
    ("arch", "model", "message"),
    [
        ("futureformer", {"future_levels": 4}, "look 31 tokens ahead, but a training window of 18"),
        ("mtp", {"n_future": 19}, "n_future=19 exceeds the training window of 18 tokens"),
    ],
)
def test_training_refuses_auxiliary_losses_that_instances_are_too_short_for(
    prepared: Path, tmp_path: Path, arch: str, model: dict, message: str
) -> None:
    """Instances of 19 tokens train on windows of 18 whatever the block: a span or head that
    looks farther would never have a target, and its loss would be 0 at every step."""
    spec = synthetic_spec(block_size=64) | {"arch": arch, "model": SHAPE | model}
    with pytest.raises(ConfigError, match=f"instances of 19 tokens: .*{message}"):
        train_run(spec, prepared, tmp_path)


@pytest.mark.parametrize(
    ("row", "cells", "changed", "message"),
    [
        (
            "gpt_path_star",
            "gpt\tpath_star\tblock_size=32 ",
            "gpt\tpath_star\tblock_size=16 ",
            "has instances of 26 tokens: block_size=16 must be at least",
        ),
        (
            "futureformer_path_star",
            "futureformer\tpath_star\tn_layer=2 block_size=32 ",
            "futureformer\tpath_star\tn_layer=2 block_size=64 future_levels=4 ",
            "look 31 tokens ahead, but a training window of 25 tokens",
        ),
    ],
)
def test_validate_refuses_a_synthetic_row_its_instances_do_not_fit(
    tmp_path: Path, capsys: pytest.CaptureFixture, row: str, cells: str, changed: str, message: str
) -> None:
    """A block that cannot hold an instance, or a span that looks past the instances' window,
    stops the workflow before any job."""
    root = Path(__file__).resolve().parents[1]
    shutil.copytree(root / "configs", tmp_path / "configs")
    shutil.copytree(root / "workflow/schemas", tmp_path / "workflow/schemas")
    table = tmp_path / "configs/experiments.tsv"
    rows = table.read_text().replace(f"{row}\t{cells}", f"{row}\t{changed}", 1)
    assert rows != table.read_text()
    table.write_text(rows)
    assert main(["validate", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert re.search(rf"experiment '{row}' \(table line \d+, column 'overrides'\) in suite", err)
    assert message in err


# --- evaluation ---------------------------------------------------------------------------------


class Oracle(nn.Module):
    """Knows the instances: at every position it predicts the instance's next token (the one
    whose non-answer tokens match the input), except at the answers of instances in `wrong`,
    where it predicts token 0."""

    def __init__(self, ids: np.ndarray, mask: np.ndarray, vocab: int, wrong: set[int]):
        super().__init__()
        self.ids, self.mask = torch.from_numpy(ids), torch.from_numpy(mask)
        self.vocab, self.wrong = vocab, wrong
        self.config = type("Config", (), {"block_size": ids.shape[1] - 1})()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        length = idx.shape[1]
        logits = torch.zeros(*idx.shape, self.vocab, dtype=torch.float64)
        for b, row in enumerate(idx):
            same = (self.ids[:, :length] == row) | self.mask[:, :length]
            (i,) = torch.nonzero(same.all(dim=1)).flatten().tolist()
            target = self.ids[i, 1 : length + 1].clone()
            if i in self.wrong:
                target[self.mask[i, 1 : length + 1]] = 0
            logits[b, torch.arange(len(target)), target] = 1.0
        return logits


@pytest.mark.parametrize(("name", "knobs"), [("mqar", {"seq_len": 40}), ("path_star", {})])
def test_scores_of_right_half_right_and_wrong_models(name: str, knobs: dict) -> None:
    task = make_task(name, {**knobs, **SMALL})
    val = task.generate(0, "val")
    vocab = len(task.symbols())
    scores = {
        label: score_instances(Oracle(val.ids, val.mask, vocab, wrong), val, name, batch_size=5)
        for label, wrong in (
            ("right", set()),
            ("half", set(range(0, 16, 2))),
            ("wrong", set(range(16))),
        )
    }
    keys = [f"{name}_accuracy", f"{name}_token_accuracy", f"{name}_exact_match"]
    assert [scores["right"][k] for k in keys] == [1.0, 1.0, 1.0]
    assert [scores["half"][k] for k in keys] == [0.5, 0.5, 0.5]
    assert [scores["wrong"][k] for k in keys] == [0.0, 0.0, 0.0]


def test_path_star_greedy_answers_equal_greedy_generation() -> None:
    task = make_task("path_star", {"degree": 2, "path_length": 2, "n_nodes": 9, **SMALL})
    val = task.generate(0, "val")
    model = build_model("gpt", 13, 18, **SHAPE).eval()
    ids, mask = torch.from_numpy(val.ids), torch.from_numpy(val.mask)
    prompt_length = val.ids.shape[1] - 3
    expected = generate(model, ids[:, :prompt_length], 3, temperature=0.0)
    assert torch.equal(greedy_answers(model, ids, mask), expected)


def test_evaluate_task_cli_writes_flat_numbers_and_refuses_text_data(
    trained: Path, prepared: Path, tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "task.json"
    args = ["evaluate-task", "--run", str(trained), "--data", str(prepared), "--out", str(out)]
    assert main([*args, "--limit", "5", "--batch-size", "2"]) == 0
    metrics = json.loads(out.read_text())
    assert set(metrics) == {
        "path_star_accuracy",
        "path_star_token_accuracy",
        "path_star_exact_match",
        "task_eval_seconds",
    }
    assert all(0.0 <= value <= 1.0 for key, value in metrics.items() if key.startswith("path"))
    assert metrics["path_star_exact_match"] in {k / 5 for k in range(6)}
    capsys.readouterr()
    text = ["evaluate-task", "--run", str(trained), "--data", str(tiny_data), "--out", str(out)]
    assert main(text) == 2
    assert "belongs to data set 'ps', but" in capsys.readouterr().err  # the run's own data set
    with pytest.raises(SystemExit) as usage_error:
        main([*args, "--limit", "0"])
    assert usage_error.value.code == 2 and "--limit: 0 is not >= 1" in capsys.readouterr().err


def test_evaluate_task_scores_every_nested_submodel(prepared: Path, tmp_path: Path) -> None:
    spec = {
        **synthetic_spec(),
        "arch": "fractalformer",
        "model": {**SHAPE, "d_model": 32, "levels": 2},
    }
    train_run(spec, prepared, tmp_path / "run", show_progress=False)
    metrics = evaluate_task(tmp_path / "run", prepared, tmp_path / "task.json", limit=4)
    assert read_json(tmp_path / "task.json") == metrics
    task_metrics = {"path_star_accuracy", "path_star_token_accuracy", "path_star_exact_match"}
    assert set(metrics[SUBMODELS]) == {"L1.0", "L1.1"}
    model = load_run(tmp_path / "run")
    instances = load_instances(prepared, "val")
    instances = Instances(instances.ids[:4], instances.mask[:4])
    for name, scores in metrics[SUBMODELS].items():
        assert set(scores) == task_metrics
        view = SubModelView(model, *parse_submodel(name, model.config))
        assert scores == score_instances(view, instances, "path_star")


def test_prepare_cli_generates_a_synthetic_data_set(tmp_path: Path) -> None:
    entry = json.dumps(
        {
            "synthetic": "mqar",
            "n_train": 8,
            "n_val": 4,
            "vocab_size": 10,
            "n_pairs": 2,
            "n_queries": 2,
        }
    )
    out = tmp_path / "mqar"
    assert main(["prepare", "--dataset", "m", "--dataset-spec", entry, "--out", str(out)]) == 0
    assert load_meta(out)["instance_length"] == 9 and load_instances(out, "val").ids.shape == (4, 9)
