"""Typed settings of the model-based generators (``posttrain synth self-instruct | answers | pairs``).

Each command's options are the fields of one pydantic model: ``add_arguments`` turns the fields into
command-line options (``min_words`` -> ``--min-words``, the description as help) and ``from_args``
validates what was given, so an option exists, is typed, documented and checked in one place only.
This module imports nothing heavy: the CLI builds its parser from it on every start.
"""

from __future__ import annotations

import argparse
import types
import typing
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticUndefined

from posttrain.errors import ConfigError


class SamplingSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    engine: Literal["auto", "transformers", "vllm"] = Field(
        "auto", description="generation engine; auto: vLLM when it is installed and a GPU is present")
    batch_size: int = Field(16, ge=1, description="prompts per generate call")
    seed: int = Field(0, description="seed of the sampling and of every random choice: same seed, same file")
    max_new_tokens: int = Field(256, ge=1, description="longest response in tokens")
    temperature: float = Field(0.0, ge=0, description="sampling temperature; 0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling: keep the smallest token set of this mass")
    keep_truncated: bool = Field(
        False, description="keep responses cut off at --max-new-tokens (by default they are dropped and counted)")
    progress: bool | None = Field(None, description="show a progress bar with ETA (default: when stderr is a terminal)")


class SelfInstructSettings(SamplingSettings):
    n: int = Field(ge=1, description="new tasks to keep")
    max_attempts: int | None = Field(
        None, ge=1, description="stop after this many generated instructions even if fewer than --n were kept "
        "(default: 10 x --n)")
    examples: int = Field(8, ge=1, description="example instructions shown in each prompt")
    generated_examples: int = Field(
        2, ge=0, description="how many of the examples come from the tasks generated so far (when there are any); "
        "the rest are seed tasks")
    similarity: float = Field(0.7, gt=0, le=1, description="drop an instruction whose ROUGE-L F1 with a seed or "
                              "a kept instruction is at least this")
    ngram: int = Field(3, ge=1, description="word n-gram length of the near-duplicate check")
    ngram_overlap: float = Field(0.6, gt=0, le=1, description="drop an instruction whose word n-gram Jaccard "
                                 "similarity with a seed or a kept instruction is at least this")
    min_words: int = Field(3, ge=1, description="drop instructions shorter than this many words")
    max_words: int = Field(150, ge=1, description="drop instructions longer than this many words")
    blocked_word: list[str] = Field(
        default_factory=list, description="drop instructions containing this word (case-insensitive); repeatable, "
        "e.g. --blocked-word image for a text-only model")
    max_new_tokens: int = Field(64, ge=1, description="longest instruction in tokens")
    temperature: float = Field(0.7, ge=0, description="sampling temperature of the instructions; 0 = greedy")
    answer_max_new_tokens: int = Field(256, ge=1, description="longest answer in tokens")
    answer_temperature: float = Field(0.0, ge=0, description="sampling temperature of the answers; 0 = greedy")
    format: Literal["alpaca", "messages"] = Field("alpaca", description="format of the rows written")

    @model_validator(mode="after")
    def _consistent(self):
        if self.max_attempts is not None and self.max_attempts < self.n:
            raise ValueError(f"--max-attempts ({self.max_attempts}) is below --n ({self.n}): every kept task is "
                             "one attempt; raise --max-attempts or lower --n")
        if self.generated_examples >= self.examples:
            raise ValueError(f"--generated-examples ({self.generated_examples}) must be below --examples "
                             f"({self.examples}) so that every prompt shows at least one seed task")
        if self.min_words > self.max_words:
            raise ValueError(f"--min-words ({self.min_words}) is above --max-words ({self.max_words}); "
                             "no instruction could pass")
        return self

    @property
    def attempts(self) -> int:
        return self.max_attempts if self.max_attempts is not None else 10 * self.n


class AnswerSettings(SamplingSettings):
    samples: int = Field(1, ge=1, description="answers per prompt, each written as its own row")
    format: Literal["messages", "alpaca"] = Field("messages", description="format of the rows written")

    @model_validator(mode="after")
    def _consistent(self):
        if self.samples > 1 and self.temperature == 0:
            raise ValueError(f"--samples {self.samples} with --temperature 0 (greedy) gives {self.samples} identical "
                             "answers per prompt; set --temperature > 0 or --samples 1")
        return self


class PairSettings(SamplingSettings):
    samples: int = Field(4, ge=2, description="responses sampled per prompt; the best and the worst form the pair")
    temperature: float = Field(1.0, gt=0, description="sampling temperature (> 0: the responses must differ)")


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, settings: type[BaseModel]) -> None:
    """One option per field of ``settings``; options not given stay out of the namespace (the model's default)."""
    for name, field in settings.model_fields.items():
        annotation = field.annotation
        args = typing.get_args(annotation)
        if typing.get_origin(annotation) in (typing.Union, types.UnionType):
            annotation = next(a for a in args if a is not type(None))
            args = typing.get_args(annotation)
        kw: dict = {"default": argparse.SUPPRESS, "help": field.description or ""}
        if field.is_required():
            kw["required"] = True
        elif field.default is not PydanticUndefined and field.default is not None and annotation is not bool:
            kw["help"] += f" (default: {field.default})"
        if annotation is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(annotation) is Literal:
            kw["choices"] = args
        elif typing.get_origin(annotation) is list:
            kw.update(action="append", type=args[0], metavar=name.split("_")[-1].upper())
        else:
            kw["type"] = annotation
        parser.add_argument(_option(name), **kw)


def from_args(settings: type[BaseModel], args: argparse.Namespace):
    """The settings given on the command line, validated; a ``ConfigError`` naming each bad option."""
    given = {name: getattr(args, name) for name in settings.model_fields if hasattr(args, name)}
    try:
        return settings.model_validate(given)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            message = err["msg"].removeprefix("Value error, ")
            loc = ".".join(str(part) for part in err["loc"])
            lines.append(f"{_option(loc)}: {message}" if loc else message)
        raise ConfigError("; ".join(lines)) from None
