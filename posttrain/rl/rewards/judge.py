"""An LLM as the judge (RLAIF): a pointwise score or a pairwise preference.

The judge is any object with ``chat(messages) -> str``: ``JudgeClient`` talks to an
OpenAI-compatible ``/chat/completions`` endpoint (vLLM, TGI, llama.cpp, ``posttrain serve``,
a hosted API) with temperature 0; ``LocalJudge`` generates greedily with a local
transformers model, so a judge works without any server.

Replies are parsed leniently but never guessed: a reply without a usable score or
choice gives ``None``, and so does an endpoint that keeps failing (after retries),
so one bad call masks one sample instead of stopping the run. The reasons are kept
in ``last_errors`` for ``CombinedReward`` to report.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPException
from pathlib import Path

from posttrain.errors import PosttrainError
from posttrain.rl.rewards.base import RewardInput

_LOOPBACK = ("localhost", "127.0.0.1", "::1")


class JudgeError(PosttrainError):
    """The judge could not produce a reply (endpoint down, HTTP error, malformed answer)."""


class JudgeClient:
    """Chat completions from an OpenAI-compatible endpoint: POST ``{base_url}/chat/completions``.

    Connection errors, timeouts, HTTP 429 and 5xx are retried ``max_retries`` times with
    exponential backoff (``retry_backoff`` seconds, doubling); other HTTP errors are not.
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 30,
                 max_retries: int = 2, retry_backoff: float = 0.5):
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise PosttrainError(f"JudgeClient: base_url {base_url!r} is not an http(s) URL, e.g. http://localhost:8000/v1")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key = api_key
        self.timeout = timeout
        self.max_retries = max_retries
        self.retry_backoff = retry_backoff
        # A proxy from the environment cannot reach this machine's own server.
        handlers = [urllib.request.ProxyHandler({})] if parts.hostname in _LOOPBACK else []
        self._opener = urllib.request.build_opener(*handlers)

    def chat(self, messages: list[dict]) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": 0}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        failure = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.retry_backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with self._opener.open(request, timeout=self.timeout) as response:
                    return _content(response.read(), self.url)
            except urllib.error.HTTPError as exc:
                detail = exc.read(200).decode("utf-8", "replace").strip()
                failure = f"HTTP {exc.code} {detail}".strip()
                if exc.code != 429 and exc.code < 500:
                    raise JudgeError(f"judge endpoint {self.url} answered {failure}") from None
            except (OSError, HTTPException) as exc:  # URLError, refused connections and timeouts are OSErrors
                failure = f"{type(exc).__name__}: {exc}"
        raise JudgeError(f"judge endpoint {self.url} failed {self.max_retries + 1} time(s); last: {failure}")


def _content(raw: bytes, url: str) -> str:
    try:
        content = json.loads(raw)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise JudgeError(f"judge endpoint {url} returned no choices[0].message.content: {raw[:200]!r}") from None
    return content or ""


class LocalJudge:
    """A local causal LM as the judge: the chat template, greedy decoding, ``max_new_tokens`` tokens."""

    def __init__(self, model, tokenizer=None, max_new_tokens: int = 16, device: str | None = None):
        import torch

        if isinstance(model, (str, Path)):
            from transformers import AutoModelForCausalLM, AutoTokenizer

            try:
                tokenizer = tokenizer or AutoTokenizer.from_pretrained(str(model))
                model = AutoModelForCausalLM.from_pretrained(str(model))
            except (OSError, ValueError) as exc:
                raise PosttrainError(f"LocalJudge: cannot load a causal LM from {model}: {exc}") from None
        if tokenizer is None:
            raise PosttrainError("LocalJudge: a model object needs its tokenizer (tokenizer=...)")
        if not getattr(tokenizer, "chat_template", None):
            raise PosttrainError("LocalJudge: the tokenizer has no chat template; a judge needs a chat model")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.context = getattr(model.config, "max_position_embeddings", None)
        self._lock = threading.Lock()  # JudgeReward asks from several threads; one generate at a time

    def chat(self, messages: list[dict]) -> str:
        import torch

        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(self.device)
        if self.context and ids.shape[1] + self.max_new_tokens > self.context:
            raise JudgeError(
                f"judge prompt of {ids.shape[1]} tokens + {self.max_new_tokens} new tokens exceeds the "
                f"judge model's context of {self.context}"
            )
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with self._lock, torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=self.max_new_tokens, pad_token_id=pad)
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _conversation(prompt: list[dict] | str) -> str:
    if isinstance(prompt, str):
        return f"user: {prompt}"
    return "\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in prompt)


def _section(title: str, text: str) -> str:
    return f"[{title}]\n{text}\n[End of {title}]"


# The whole instruction goes in one user message: some chat templates refuse a system role.
def score_prompt(rubric: str, prompt: list[dict] | str, completion: str, reference: str | None,
                 scale: tuple[float, float]) -> list[dict]:
    parts = [
        "You are an impartial judge. Rate the assistant's response to the conversation below.",
        f"Rubric:\n{rubric}",
        _section("Conversation", _conversation(prompt)),
    ]
    if reference is not None:
        parts.append(_section("Reference answer", reference))
    parts.append(_section("Response", completion))
    lo, hi = scale
    parts.append(f'Give a score from {lo:g} to {hi:g} (higher is better). Reply with "Score: N" and nothing else.')
    return [{"role": "user", "content": "\n\n".join(parts)}]


def pairwise_prompt(rubric: str, prompt: list[dict] | str, a: str, b: str) -> list[dict]:
    parts = [
        "You are an impartial judge. Compare two assistant responses to the conversation below.",
        f"Rubric:\n{rubric}",
        _section("Conversation", _conversation(prompt)),
        _section("Response A", a),
        _section("Response B", b),
        "Which response is better? Reply with a single letter: A or B.",
    ]
    return [{"role": "user", "content": "\n\n".join(parts)}]


_LABELLED_SCORE = re.compile(r"score\W{0,3}(-?\d+(?:\.\d+)?)", re.IGNORECASE)
_ANY_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def parse_score(reply: str, scale: tuple[float, float]) -> float | None:
    """The reply's score mapped to [0, 1]: the first "Score: N" in range, else the first number in range."""
    lo, hi = scale
    for raw in [m.group(1) for m in _LABELLED_SCORE.finditer(reply)] + _ANY_NUMBER.findall(reply):
        value = float(raw)
        if lo <= value <= hi:
            return (value - lo) / (hi - lo)
    return None


_NAMED_CHOICE = re.compile(r"\b(?:[Rr]esponse|[Aa]nswer|[Oo]utput|[Cc]hoice|[Vv]erdict|[Ww]inner)\W{0,3}([AB])\b")
_LEADING_CHOICE = re.compile(r"^\W*([AB])(?:[^\w\s]|\s*$|\s*\n)")


def parse_choice(reply: str) -> str | None:
    """"A" or "B" from a reply such as "B", "**A**", "[[B]]", "A.\\n...", "Response B is better"; else None.

    A leading "A" followed by a word is an article ("A clear winner is B"), not a choice.
    """
    bare = re.sub(r"[\W_]+", "", reply)
    if bare in ("A", "B"):
        return bare
    leading = _LEADING_CHOICE.match(reply.strip())
    if leading:
        return leading.group(1)
    named = set(_NAMED_CHOICE.findall(reply))
    return named.pop() if len(named) == 1 else None


class _Asker:
    """Sends judge prompts concurrently; failures become None with the reason in ``last_errors``."""

    def __init__(self, client, max_concurrency: int):
        if not callable(getattr(client, "chat", None)):
            raise PosttrainError(f"judge client {client!r} has no chat(messages) method; use JudgeClient or LocalJudge")
        self.client = client
        self.max_concurrency = max(1, max_concurrency)
        self.last_errors: list[str] = []

    def _ask(self, messages: list[dict]) -> str | None:
        try:
            return self.client.chat(messages)
        except JudgeError as exc:
            self.last_errors.append(str(exc))
            return None

    def ask_all(self, prompts: list[list[dict]]) -> list[str | None]:
        self.last_errors = []
        if len(prompts) <= 1 or self.max_concurrency == 1:
            return [self._ask(p) for p in prompts]
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(prompts))) as pool:
            return list(pool.map(self._ask, prompts))


class JudgeReward(_Asker):
    """Pointwise judge: a score on ``scale`` for each completion given the ``rubric``, normalised to [0, 1].

    The sample's reference answer, when it has one, is shown to the judge.
    """

    name = "judge"

    def __init__(self, client, rubric: str, scale: tuple[float, float] = (1, 10), max_concurrency: int = 8):
        super().__init__(client, max_concurrency)
        lo, hi = scale
        if not lo < hi:
            raise PosttrainError(f"JudgeReward: scale must be (low, high) with low < high, got {scale}")
        self.rubric = rubric
        self.scale = (lo, hi)

    def __call__(self, inputs: list[RewardInput]) -> list[float | None]:
        prompts = [score_prompt(self.rubric, x.prompt, x.completion, x.reference, self.scale) for x in inputs]
        replies = self.ask_all(prompts)
        scores = [None if r is None else parse_score(r, self.scale) for r in replies]
        self.last_errors += [f"judge reply has no score in {self.scale}: {r[:80]!r}"
                             for r, s in zip(replies, scores) if r is not None and s is None]
        return scores


class PairwiseJudge(_Asker):
    """Which of two completions is better: 0 for ``a``, 1 for ``b``, None when undecided.

    Judges favour whichever response comes first (or second), so each pair is asked twice,
    with the order swapped; when the two verdicts disagree the judge has no real preference
    and the answer is None, as it is for an unparsable reply or a failed call.
    """

    def __init__(self, client, rubric: str, max_concurrency: int = 8):
        super().__init__(client, max_concurrency)
        self.rubric = rubric

    def compare(self, prompt: list[dict] | str, a: str, b: str) -> int | None:
        return self.compare_many([(prompt, a, b)])[0]

    def compare_many(self, pairs: list[tuple[list[dict] | str, str, str]]) -> list[int | None]:
        prompts = []
        for prompt, a, b in pairs:
            prompts += [pairwise_prompt(self.rubric, prompt, a, b), pairwise_prompt(self.rubric, prompt, b, a)]
        replies = self.ask_all(prompts)
        verdicts = []
        for i in range(len(pairs)):
            first, second = (None if r is None else parse_choice(r) for r in replies[2 * i : 2 * i + 2])
            in_order = {"A": 0, "B": 1}.get(first)
            swapped = {"A": 1, "B": 0}.get(second)
            verdicts.append(in_order if in_order is not None and in_order == swapped else None)
        return verdicts
