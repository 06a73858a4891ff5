"""lm-eval adapter: log-likelihoods against direct forward passes, windows, generation, the BLiMP
tie rule, embedded/mirror data, bits-per-byte against the perplexity script, and no network."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import socket
from pathlib import Path
from types import SimpleNamespace

import datasets
import huggingface_hub.constants
import lm_eval.evaluator
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import tiny_spec
from lm_eval.api.instance import Instance
from lm_eval.utils import get_rolling_token_windows
from torch import nn

from archbench.cli import build_parser
from archbench.data import load_token_bytes, load_tokenizer, load_tokens, train_tokenizer
from archbench.data.blimp import check_blimp_mirror
from archbench.errors import ConfigError, DataError
from archbench.evaluate.lm_eval_adapter import (
    OFFLINE_VARIABLES,
    TASK_GROUPS,
    ArchbenchLM,
    evaluate_lm,
    plan_windows,
    run_lm_eval,
)
from archbench.evaluate.perplexity import evaluate_perplexity
from archbench.evaluate.tasks import TASKS_DIR
from archbench.evaluate.tasks.utils import (
    FIELD_ALIASES,
    _embedded_blimp,
    blimp_checksums,
    blimp_process_results,
    heldout_dataset,
    read_blimp,
)
from archbench.models import ARCHITECTURES, build_model
from archbench.runs import load_run
from archbench.train import train_run

N_PARADIGMS = 67


class Bigram(nn.Module):
    """Logits from the current token only, so any window split gives the same log-probs."""

    def __init__(self, vocab: int, block_size: int):
        super().__init__()
        self.config = SimpleNamespace(block_size=block_size)
        self.table = nn.Parameter(
            torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0))
        )

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.shape[1] > self.config.block_size:
            raise ValueError("sequence longer than block_size")
        return self.table[idx]


class NextLetter(nn.Module):
    """Always predicts the next letter of 'abcdefghij' (cyclically) after the current one."""

    def __init__(self, block_size: int):
        super().__init__()
        self.config = SimpleNamespace(block_size=block_size)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.shape[1] > self.config.block_size:
            raise ValueError("sequence longer than block_size")
        return F.one_hot((idx + 1) % 10, 266).double() * 50.0


def requests(kind: str, *args: tuple) -> list[Instance]:
    """lm-eval Instances of one request type."""
    return [Instance(kind, {}, arguments, i) for i, arguments in enumerate(args)]


@pytest.fixture(autouse=True)
def no_environment_report(monkeypatch: pytest.MonkeyPatch) -> None:
    """lm-eval's environment report runs pip and git in subprocesses (seconds): not needed here."""
    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)


@pytest.fixture(scope="module")
def trained_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny gpt trained long enough on the repetitive tiny text that context matters."""
    run = tmp_path_factory.mktemp("run")
    spec = tiny_spec(token_budget=16 * 8 * 60, batch_size=8, lr=1e-2)
    train_run(spec, tiny_data, run, show_progress=False)
    return run


# --- windows ------------------------------------------------------------------------------------


@pytest.mark.parametrize("block_size", [1, 4, 7])
@pytest.mark.parametrize("n_tokens", [1, 2, 5, 30])
@pytest.mark.parametrize("first", [0, 1, 3, 12])
def test_windows_score_every_target_once_within_block_size(
    block_size: int, n_tokens: int, first: int
) -> None:
    for stride in range(1, block_size + 1):
        scored = []
        for start, end, n in plan_windows(n_tokens, first, block_size, stride):
            assert 1 <= end - start - 1 <= block_size and 1 <= n <= end - start - 1
            scored += range(end - n, end)
            for target in range(end - n, end):  # a full block of context, or all there is
                assert target - start >= min(target, block_size - stride + 1)
        assert scored == list(range(max(first, 1), n_tokens))
        for start, end, n in plan_windows(n_tokens, first, block_size, stride)[:1]:
            assert end - n - start == min(end - n, block_size)  # the first target: a full block


def test_a_long_continuation_keeps_its_context() -> None:
    """A continuation longer than a stride still sees its context (the first window started
    at the context's last token, which dropped the rest of it)."""
    windows = plan_windows(60, 20, 32, 32)
    assert windows == [(0, 33, 13), (27, 60, 27)]


@pytest.mark.parametrize(("block_size", "context_len"), [(4, 1), (4, 3), (8, 1), (8, 5), (8, 8)])
def test_rolling_windows_are_lm_evals(block_size: int, context_len: int) -> None:
    doc = list(range(100, 137))
    prefix = 99
    expected = list(get_rolling_token_windows(doc, prefix, block_size, context_len))
    tokens = [prefix, *doc]
    stride = block_size - context_len + 1
    ours = [
        (tokens[start : end - 1], tokens[end - n : end])
        for start, end, n in plan_windows(len(tokens), 1, block_size, stride)
    ]
    assert ours == expected


# --- loglikelihood, rolling, generation ---------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_loglikelihood_matches_a_direct_forward_pass(arch: str, tiny_data: Path) -> None:
    """Every architecture, in padded batches of mixed lengths; the model is handed over in
    training mode with dropout, which the adapter must switch off."""
    tok = load_tokenizer(tiny_data)
    torch.manual_seed(0)
    model = build_model(
        arch, tok.get_vocab_size(), 64, n_layer=2, n_head=2, d_model=16, dropout=0.5
    ).double()
    lm = ArchbenchLM(model, tok, batch_size=1)  # 64 tokens a batch: padded rows of mixed lengths
    pairs = [
        ("", "Speak, speak."),
        ("First Citizen:", "\nBefore we proceed"),
        ("All: ", "Speak"),  # the trailing space moves to the continuation
        ("You are all resolved", " rather to die than to famish?"),
        ("", "x"),
    ]
    got = lm.loglikelihood(requests("loglikelihood", *pairs))
    model.eval()  # for the direct passes below; the adapter had to switch dropout off itself
    for (context, continuation), (logprob, greedy) in zip(pairs, got, strict=True):
        context_ids = tok.encode(context.rstrip()).ids or tok.encode("\n").ids
        ids = context_ids + tok.encode(context[len(context.rstrip()) :] + continuation).ids
        logits = model(torch.tensor([ids[:-1]]))[0]
        targets = torch.tensor(ids[len(context_ids) :])
        picked = logits[len(context_ids) - 1 :]
        expected = picked.log_softmax(-1).gather(-1, targets[:, None]).sum().item()
        assert logprob == pytest.approx(expected, rel=1e-12, abs=1e-12)
        assert greedy == bool((picked.argmax(-1) == targets).all())


def test_greedy_flag_and_long_requests_through_windows() -> None:
    tok = train_tokenizer("char", "abcdefghij")
    lm = ArchbenchLM(NextLetter(block_size=4), tok)
    got = lm.loglikelihood(requests("loglikelihood", ("abc", "defghijabc"), ("abc", "dd")))
    assert got[0] == (pytest.approx(0.0, abs=1e-6), True)
    assert got[1][0] < -5 and got[1][1] is False


class WidthNoise(Bigram):
    """Bigram logits shifted by 1e-4 per padded column: like float rounding that depends on the
    batch's padded width, which real models have at about 1e-6."""

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return super().forward(idx) + 1e-4 * idx.shape[1]


def test_equal_requests_score_identically_whatever_batch_they_fall_in() -> None:
    tok = train_tokenizer("char", "abcdefghij x")
    lm = ArchbenchLM(WidthNoise(tok.get_vocab_size(), block_size=64), tok, batch_size=2)
    sentence = "abc def ghij"
    # Longest first: the filler and one copy share a batch padded to the filler's width.
    got = lm.loglikelihood(
        requests("loglikelihood", ("", "x" * 30), ("", sentence), ("", sentence))
    )
    assert got[1] == got[2]
    assert blimp_process_results({}, got[1:]) == {"acc": 0.5}
    texts = ("abcabc", "x" * 30, "abcabc")
    rolling = lm.loglikelihood_rolling(requests("loglikelihood_rolling", *((t,) for t in texts)))
    assert rolling[0] == rolling[2]


class Uniform(nn.Module):
    """All-zero logits: every token ties."""

    def __init__(self, block_size: int):
        super().__init__()
        self.config = SimpleNamespace(block_size=block_size)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*idx.shape, 266)


def test_greedy_flag_is_what_greedy_generation_picks_among_tied_tokens() -> None:
    lm = ArchbenchLM(Uniform(block_size=8), train_tokenizer("char", "abcdefghij"))
    (generated,) = lm.generate_until(requests("generate_until", ("abc", {"max_gen_toks": 3})))
    other = "j" if generated[0] != "j" else "i"
    got = lm.loglikelihood(requests("loglikelihood", ("abc", generated), ("abc", other * 3)))
    assert [greedy for _, greedy in got] == [True, False]


def test_a_token_across_the_boundary_falls_back_to_encoding_the_continuation_alone() -> None:
    tok = train_tokenizer("bpe", "hello hello hello world " * 20, vocab_size=270)
    context, continuation = " hel", "lo"
    context_ids = tok.encode(context).ids
    assert tok.encode(context + continuation).ids[: len(context_ids)] != context_ids  # merged
    model = Bigram(tok.get_vocab_size(), block_size=16)
    ids = context_ids + tok.encode(continuation).ids
    log_probs = model(torch.tensor([ids[:-1]]))[0].log_softmax(-1)
    first = len(context_ids)
    expected = log_probs[first - 1 :].gather(-1, torch.tensor(ids[first:])[:, None]).sum()
    lm = ArchbenchLM(model, tok)
    ((logprob, _),) = lm.loglikelihood(requests("loglikelihood", (context, continuation)))
    assert logprob == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("stride", [1, 3, 8])
def test_windows_do_not_change_a_context_free_model(stride: int) -> None:
    tok = train_tokenizer("char", "abcdefghij")
    lm = ArchbenchLM(Bigram(266, block_size=8), tok, batch_size=2, stride=stride)
    text = "abcdefghij" * 7
    ids = [tok.encode("\n").ids[0], *tok.encode(text).ids]  # the start token, then the text
    log_probs = Bigram(266, block_size=len(ids))(torch.tensor([ids[:-1]]))[0].log_softmax(-1)
    per_token = log_probs.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    for context_len in (1, 25):  # context within one window, and longer than block_size
        request = (text[:context_len], text[context_len:])
        ((logprob, _),) = lm.loglikelihood(requests("loglikelihood", request))
        assert logprob == pytest.approx(per_token[context_len:].sum().item(), rel=1e-5)
    (total,) = lm.loglikelihood_rolling(requests("loglikelihood_rolling", (text,)))
    assert total == pytest.approx(per_token.sum().item(), rel=1e-5)


def test_generate_until_honours_stop_strings_and_max_length() -> None:
    tok = train_tokenizer("char", "abcdefghij")
    lm = ArchbenchLM(NextLetter(block_size=4), tok, batch_size=2, max_gen_toks=5)
    got = lm.generate_until(
        requests(
            "generate_until",
            ("abc", {"until": ["f"], "max_gen_toks": 10}),
            ("a", {"until": ["zz"], "max_gen_toks": 3}),
            ("abcdefghijabc", {"until": "c", "max_gen_toks": 20}),  # longer than block_size
            ("a", {"until": ["hi", "gh"], "max_gen_toks": 10, "do_sample": False}),
            ("", {"until": []}),  # from the start text ("\n" -> "b" here), max_gen_toks=5
            ("b", {"until": ["c"]}),  # stops at once
        )
    )
    assert got == ["de", "bcd", "defghijab", "bcdef", "bcdef", ""]
    with pytest.raises(ConfigError, match="greedy"):
        lm.generate_until(requests("generate_until", ("a", {"do_sample": True})))


def test_bad_settings_are_config_errors() -> None:
    tok = train_tokenizer("char", "abcdefghij")
    with pytest.raises(ConfigError, match="stride"):
        ArchbenchLM(NextLetter(block_size=4), tok, stride=5)
    with pytest.raises(ConfigError, match="batch_size"):
        ArchbenchLM(NextLetter(block_size=4), tok, batch_size=0)
    with pytest.raises(ConfigError, match="start_text"):
        ArchbenchLM(NextLetter(block_size=4), tok, start_text="")
    with pytest.raises(ConfigError, match="task group"):
        evaluate_lm(ArchbenchLM(NextLetter(block_size=4), tok), "hellaswag", Path("."))


# --- BLiMP ----------------------------------------------------------------------------------------


def test_tie_rule() -> None:
    assert blimp_process_results({}, [(-3.0, False), (-3.0, False)]) == {"acc": 0.5}
    assert blimp_process_results({}, [(-2.0, False), (-3.0, False)]) == {"acc": 1.0}
    assert blimp_process_results({}, [(-4.0, True), (-3.0, False)]) == {"acc": 0.0}


class ConstantLM(ArchbenchLM):
    """The same log-likelihood for every sentence: plain `acc` would call every pair a win."""

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        return [(-10.0, False)] * len(requests)


def test_constant_model_scores_exactly_half_on_blimp(tiny_data: Path) -> None:
    tok = load_tokenizer(tiny_data)
    lm = ConstantLM(NextLetter(block_size=4), tok)
    metrics = evaluate_lm(lm, "blimp", tiny_data, limit=2)
    assert metrics["blimp_pairs"] == 2 * N_PARADIGMS
    accuracies = {key: value for key, value in metrics.items() if key.startswith("blimp_")}
    del accuracies["blimp_pairs"]
    assert len(accuracies) == N_PARADIGMS + 4 + 1  # paradigms, fields, overall
    assert set(accuracies.values()) == {0.5}


def test_embedded_blimp_is_complete_and_matches_the_task_files() -> None:
    sums = blimp_checksums()
    assert len(sums) == N_PARADIGMS
    field_of = {}
    for group in yaml.safe_load((TASKS_DIR / "archbench_blimp.yaml").read_text())["task"]:
        field = group.removeprefix("archbench_blimp_")
        spec = yaml.safe_load((TASKS_DIR / "blimp" / f"_field_{field}.yaml").read_text())
        assert spec["group"] == group
        field_of.update(dict.fromkeys(spec["task"], field))
    assert sorted(field_of) == sorted(f"archbench_blimp_{p}" for p in sums)
    for paradigm in sums:
        task = yaml.safe_load((TASKS_DIR / "blimp" / f"{paradigm}.yaml").read_text())
        assert task["task"] == f"archbench_blimp_{paradigm}"
        assert task["dataset_kwargs"] == {"paradigm": paradigm}
        records = read_blimp(paradigm)  # checks the sha256
        assert len(records) == 1000
        assert {r["UID"] for r in records} == {paradigm}
        assert {FIELD_ALIASES.get(r["field"], r["field"]) for r in records} == {
            field_of[task["task"]]
        }


def test_a_set_mirror_is_used(
    trained_run: Path, tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ARCHBENCH_DATA_MIRROR", str(tmp_path))  # a mirror without BLiMP
    with pytest.raises(DataError, match="not found in the data mirror"):
        run_lm_eval(trained_run, tiny_data, "blimp", tmp_path / "out.json", limit=1)
    assert not (tmp_path / "out.json").exists()


def test_a_mirrors_blimp_is_checked_whole(tmp_path: Path) -> None:
    (tmp_path / "blimp").mkdir()
    for paradigm, raw in _embedded_blimp().items():
        (tmp_path / "blimp" / f"{paradigm}.jsonl").write_bytes(raw)
    check_blimp_mirror(tmp_path)
    (tmp_path / "blimp" / "wh_island.jsonl").write_bytes(b"{}\n")
    with pytest.raises(DataError, match="sha256 mismatch for BLiMP paradigm wh_island"):
        check_blimp_mirror(tmp_path)
    (tmp_path / "blimp" / "wh_island.jsonl").unlink()
    with pytest.raises(DataError, match="wh_island.jsonl not found in the data mirror"):
        check_blimp_mirror(tmp_path)


def test_mirror_copy_is_read_and_verified(tmp_path: Path) -> None:
    raw = _embedded_blimp()["wh_island"]
    (tmp_path / "blimp").mkdir()
    (tmp_path / "blimp" / "wh_island.jsonl").write_bytes(raw)
    assert read_blimp("wh_island", tmp_path) == read_blimp("wh_island")
    (tmp_path / "blimp" / "wh_island.jsonl").write_bytes(raw.replace(b"Who", b"How", 1))
    with pytest.raises(DataError, match="sha256 mismatch for BLiMP paradigm wh_island"):
        read_blimp("wh_island", tmp_path)
    with pytest.raises(DataError, match="not found in the data mirror"):
        read_blimp("wh_vs_that_with_gap", tmp_path)
    with pytest.raises(ConfigError, match="unknown BLiMP paradigm"):
        read_blimp("wh_islands")
    assert hashlib.sha256(raw).hexdigest() == blimp_checksums()["wh_island"]


# --- rolling perplexity and the full runs -------------------------------------------------------


def test_rolling_bits_per_byte_agrees_with_the_perplexity_script(
    trained_run: Path, tiny_data: Path, tmp_path: Path
) -> None:
    model = load_run(trained_run)
    block_size = model.config.block_size
    val, token_bytes = load_tokens(tiny_data, "val"), load_token_bytes(tiny_data)
    out = tmp_path / "lm_eval_rolling_ppl.json"
    metrics = run_lm_eval(trained_run, tiny_data, "rolling_ppl", out)
    assert json.loads(out.read_text()) == pytest.approx(metrics)
    # The backbone's number for the checkpoint: within 1%. Its windows start at the split's
    # first token (which it does not score), lm-eval's at the start token; and lm-eval's last
    # window reaches back a full block instead of starting at a multiple of block_size.
    backbone = evaluate_perplexity(model, val, token_bytes, block_size)
    assert metrics["lm_eval_rolling_bpb"] == pytest.approx(backbone["val_bpb"], rel=0.01)
    assert backbone["val_bpb"] < 0.8 * math.log2(len(token_bytes))  # trained: context matters
    assert metrics["lm_eval_byte_perplexity"] == pytest.approx(2 ** metrics["lm_eval_rolling_bpb"])
    assert metrics["lm_eval_rolling_ppl_seconds"] > metrics["lm_eval_rolling_ppl_model_seconds"] > 0
    # Like with like: a text of whole blocks after the start token gives the very same windows.
    n_blocks = len(val) // block_size
    same = run_lm_eval(
        trained_run, tiny_data, "rolling_ppl", out, max_tokens=n_blocks * block_size - 1
    )
    start = load_tokenizer(tiny_data).encode("\n").ids
    windows = np.concatenate([start, val[: n_blocks * block_size]])
    expected = evaluate_perplexity(model, windows, token_bytes, block_size)
    assert same["lm_eval_rolling_bpb"] == pytest.approx(expected["val_bpb"], rel=1e-6)


def test_blimp_run_is_offline(
    trained_run: Path, tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    attempts = []

    def no_network(*args: object, **kwargs: object) -> None:
        attempts.append(args)  # recorded in case a library swallows the error
        raise OSError("network access attempted during an offline evaluation")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.delenv("ARCHBENCH_DATA_MIRROR", raising=False)
    out = tmp_path / "lm_eval_blimp.json"
    metrics = run_lm_eval(trained_run, tiny_data, "blimp", out, limit=1)
    assert attempts == []
    assert all(os.environ[name] == "1" for name in OFFLINE_VARIABLES)
    assert datasets.config.HF_DATASETS_OFFLINE and huggingface_hub.constants.HF_HUB_OFFLINE
    written = json.loads(out.read_text())
    assert written == pytest.approx(metrics)
    assert all(isinstance(v, float) for v in written.values())
    assert written["blimp_pairs"] == N_PARADIGMS
    assert {"blimp_morphology", "blimp_syntax", "blimp_semantics", "blimp_syntax_semantics"} <= set(
        written
    )
    paradigms = [written[f"blimp_{p}"] for p in blimp_checksums()]
    assert written["blimp_overall"] == pytest.approx(sum(paradigms) / N_PARADIGMS)
    assert written["lm_eval_blimp_seconds"] >= written["lm_eval_blimp_model_seconds"] > 0


def test_a_cut_inside_a_character_drops_its_bytes_from_the_rolling_text(tmp_path: Path) -> None:
    """'é' is not in the train split, so it is two byte-fallback tokens; a cut between them must
    not turn the first into U+FFFD (3 other bytes) in the text the harness scores."""
    from archbench.data import DatasetSpec, prepare_dataset

    raw = ("abc " * 225 + "é" * 50).encode()
    (tmp_path / "mirror" / "t").mkdir(parents=True)
    (tmp_path / "mirror" / "t" / "input.txt").write_bytes(raw)
    spec = DatasetSpec(name="t", path="t/input.txt", sha256=hashlib.sha256(raw).hexdigest())
    prepare_dataset(spec, tmp_path / "data", mirror=tmp_path / "mirror")
    val, tokenizer = load_tokens(tmp_path / "data", "val"), load_tokenizer(tmp_path / "data")
    first = next(i for i, t in enumerate(val) if tokenizer.id_to_token(int(t)).startswith("<0x"))
    assert first > 0
    for max_tokens, expected_e in ((first + 1, 1), (first, 0), (first + 2, 1), (first + 3, 2)):
        text = heldout_dataset(str(tmp_path / "data"), max_tokens)["test"]["text"][0]
        assert "\ufffd" not in text and text.count("é") == expected_e, (max_tokens, text[-5:])


def test_a_synthetic_task_is_refused_with_the_command_that_scores_it(
    tiny_data: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    meta = json.loads((data / "meta.json").read_text())
    (data / "meta.json").write_text(json.dumps({**meta, "instance_length": 25}))
    with pytest.raises(ConfigError, match="synthetic task.*archbench evaluate-task"):
        run_lm_eval(tmp_path / "run", data, "blimp", tmp_path / "out.json")


def test_the_cli_and_the_suite_schema_offer_the_adapters_task_groups() -> None:
    """`--tasks` and a suite's lm_eval.tasks list the task groups the adapter has, no more."""
    commands = next(a for a in build_parser()._actions if a.dest == "command")
    lm_eval = commands.choices["lm-eval"]
    tasks = next(a for a in lm_eval._actions if a.dest == "tasks")
    schema = yaml.safe_load(
        (Path(__file__).resolve().parents[1] / "workflow/schemas/suite.schema.yaml").read_text()
    )
    enum = schema["properties"]["lm_eval"]["properties"]["tasks"]["items"]["enum"]
    assert tuple(tasks.choices) == tuple(enum) == tuple(TASK_GROUPS)
