"""Text generation from a trained run: the backend of `archbench generate` and report samples.

Every architecture generates through `model(idx)`, the same next-token logits (B, T, vocab) that
evaluation scores, so what a reader sees is what was measured; auxiliary heads never take part.
Each step feeds the last `block_size` tokens (the context is cropped, as in nanoGPT), takes the
logits at the last position and picks the next token:

- temperature 0: greedy, the argmax;
- otherwise: softmax(logits / temperature), restricted to the `top_k` most likely tokens when
  given, sampled with a `torch.Generator` seeded by `seed` (same seed, same text).

A fractalformer sub-model generates through the same loop, wrapped as a model whose `forward` is
that sub-model's forward (`SubModelView`), exactly as it would be scored.

There is no key/value cache: every step reruns the cropped context, which keeps one code path for
all architectures and is fast enough at this suite's sizes (a few hundred tokens).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch import nn

from archbench.data import decode, encode, load_tokenizer
from archbench.errors import ArchbenchError, ConfigError
from archbench.io import read_json, write_json
from archbench.options import suggest
from archbench.runs import load_run

DEFAULT_PROMPT = "ROMEO:\n"
DEFAULT_LENGTH = 200
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_K = 40


def check_sampling(length: int, temperature: float, top_k: int | None) -> None:
    """Raise ConfigError naming the argument when a sampling setting is out of range."""
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise ConfigError(f"length must be an integer >= 0, got {length!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)):
        raise ConfigError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if temperature < 0:
        raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ConfigError(f"top_k must be an integer >= 1 or None, got {top_k!r}")


def next_token(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row of `logits` (B, vocab): argmax at temperature 0, else a sample
    from softmax(logits / temperature) over the `top_k` largest logits. Returns (B, 1)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt: torch.Tensor,
    length: int,
    temperature: float = DEFAULT_TEMPERATURE,
    top_k: int | None = DEFAULT_TOP_K,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Extend `prompt` (LongTensor (B, T0), T0 >= 1) by `length` tokens; return (B, T0 + length).

    The model runs in eval mode (no dropout) and is put back in its previous mode afterwards.
    """
    check_sampling(length, temperature, top_k)
    if prompt.dim() != 2 or prompt.shape[1] < 1:
        shape = tuple(prompt.shape)
        raise ConfigError(f"prompt must be a (batch, length >= 1) tensor, got shape {shape}")
    block_size = model.config.block_size
    was_training = model.training
    model.eval()
    try:
        idx = prompt
        for _ in range(length):
            logits = model(idx[:, -block_size:])[:, -1, :]
            idx = torch.cat([idx, next_token(logits, temperature, top_k, generator)], dim=1)
    finally:
        model.train(was_training)
    return idx


def generate_text(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompt: str,
    length: int,
    temperature: float = DEFAULT_TEMPERATURE,
    top_k: int | None = DEFAULT_TOP_K,
    seed: int = 0,
) -> str:
    """The continuation (without the prompt) of `prompt` by `length` tokens, as text."""
    ids = encode(tokenizer, prompt)
    if ids.size == 0:
        raise ConfigError("prompt must not be empty (generation needs at least one token)")
    vocab_size = model.config.vocab_size
    if int(ids.max()) >= vocab_size:
        raise ArchbenchError(
            f"the tokenizer produced id {int(ids.max())}, but the model has only {vocab_size} "
            f"tokens: the tokenizer does not belong to this run's data set"
        )
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)  # multinomial needs its device
    prompt_ids = torch.from_numpy(ids).unsqueeze(0).to(device)
    out = generate(model, prompt_ids, length, temperature, top_k, generator)
    return decode(tokenizer, out[0, len(ids) :].cpu().numpy())


def submodels(model: nn.Module) -> dict[str, nn.Module]:
    """Nested sub-models worth sampling, by name: for a model with `forward_submodel`
    (fractalformer), the first sub-model of every level below the whole model, each wrapped so
    that its `forward` gives that sub-model's logits, as evaluation scores it; else {}."""
    if not hasattr(model, "forward_submodel"):
        return {}
    from archbench.models.fractalformer import SubModelView, submodel_name

    return {
        submodel_name(level, 0): SubModelView(model, level, 0)
        for level in range(1, model.config.levels)
    }


def select_submodel(model: nn.Module, name: str | None) -> nn.Module:
    """`model` itself (name None), or its sub-model `name` (e.g. "L1.0" of a fractalformer) as a
    model whose `forward` gives that sub-model's next-token logits."""
    if name is None:
        return model
    if not hasattr(model, "forward_submodel"):
        raise ConfigError(f"submodel {name!r}: this architecture has no nested sub-models")
    from archbench.models.fractalformer import SubModelView, parse_submodel

    return SubModelView(model, *parse_submodel(name, model.config))


def generate_from_run(
    run_dir: Path,
    data_dir: Path,
    prompt: str,
    length: int = DEFAULT_LENGTH,
    temperature: float = DEFAULT_TEMPERATURE,
    top_k: int | None = DEFAULT_TOP_K,
    seed: int = 0,
    submodel: str | None = None,
) -> str:
    """The continuation of `prompt` by a finished run's model (or one of its sub-models)."""
    check_sampling(length, temperature, top_k)
    model = select_submodel(load_run(Path(run_dir)), submodel)
    tokenizer = load_tokenizer(Path(data_dir))
    return generate_text(model, tokenizer, prompt, length, temperature, top_k, seed)


def locate_run(results_dir: Path, suite: str, experiment: str, seed: int) -> tuple[Path, Path]:
    """(run directory, prepared-data directory) of one row and seed of a suite.

    The run is results/<suite>/<experiment>/seed<k>; its data set is read from the run's
    train_config.json and prepared in results/data/<dataset>.
    """
    suite_dir = Path(results_dir) / suite
    run_dir = suite_dir / experiment / f"seed{seed}"
    config = run_dir / "train_config.json"
    trained = sorted(d.name for d in suite_dir.glob("*") if any(d.glob("seed*/model.safetensors")))
    if trained and experiment not in trained:
        raise ArchbenchError(
            f"no run of experiment '{experiment}'{suggest(experiment, trained)} in {suite_dir}; "
            f"trained there: {', '.join(trained)}"
        )
    if not config.is_file():
        elsewhere = sorted(
            other.parents[2].name
            for other in Path(results_dir).glob(f"*/{experiment}/seed{seed}/train_config.json")
        )
        hint = (
            f" (trained in suite {', '.join(elsewhere)}: pass --suite {elsewhere[0]})"
            if elsewhere
            else ""
        )
        raise ArchbenchError(
            f"no finished run at {run_dir} (missing train_config.json): train experiment "
            f"'{experiment}' seed {seed} of suite '{suite}' first{hint}"
        )
    return run_dir, workflow_data_dir(run_dir)


def workflow_data_dir(run_dir: Path) -> Path:
    """The prepared data of a run in the workflow's layout: results/<suite>/<experiment>/seed<k>
    reads results/data/<dataset>, its data set named by the run's train_config.json.
    ArchbenchError when the run has no train_config.json or that directory does not exist."""
    config = Path(run_dir) / "train_config.json"
    if not config.is_file():
        raise ArchbenchError(f"{run_dir} is not a finished run (no train_config.json)")
    parents = Path(run_dir).absolute().parents
    if len(parents) < 3:
        raise ArchbenchError(
            f"{run_dir} is not in the workflow's layout results/<suite>/<experiment>/seed<k>: "
            "pass --data"
        )
    data_dir = parents[2] / "data" / read_json(config)["dataset"]
    if not data_dir.is_dir():
        raise ArchbenchError(
            f"no prepared data at {data_dir} (where the workflow puts this run's data set): "
            "pass --data"
        )
    return data_dir


def write_samples(
    run_dir: Path,
    data_dir: Path,
    out_json: Path,
    prompt: str = DEFAULT_PROMPT,
    length: int = DEFAULT_LENGTH,
    seed: int = 0,
    temperature: float = DEFAULT_TEMPERATURE,
    top_k: int | None = DEFAULT_TOP_K,
) -> dict:
    """Write a greedy and a sampled continuation of `prompt` by the run's model to `out_json`.

    The file holds prompt, length, temperature, top_k, sample_seed, greedy and sampled (the
    continuations without the prompt) and, for models with nested sub-models, `submodels`:
    {name: {"greedy", "sampled"}} for the first sub-model of each level. Returns the object.
    """
    check_sampling(length, temperature, top_k)
    model = load_run(Path(run_dir))
    tokenizer = load_tokenizer(Path(data_dir))

    def continuations(source: nn.Module) -> dict[str, str]:
        return {
            "greedy": generate_text(source, tokenizer, prompt, length, 0.0, None, seed),
            "sampled": generate_text(source, tokenizer, prompt, length, temperature, top_k, seed),
        }

    sample = {
        "prompt": prompt,
        "length": length,
        "temperature": temperature,
        "top_k": top_k,
        "sample_seed": seed,
        **continuations(model),
    }
    nested = submodels(model)
    if nested:
        sample["submodels"] = {name: continuations(view) for name, view in nested.items()}
    write_json(out_json, sample)
    return sample
