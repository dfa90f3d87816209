"""Show rendered samples as the model sees them, with the trained tokens marked."""

from __future__ import annotations

from posttrain.config import RunConfig
from posttrain.data.preference import FeedbackExample, PreferenceExample
from posttrain.data.report import DataReport
from posttrain.data.templates import IGNORE_INDEX, ChatEncoder, resolve_chat_template
from posttrain.data.validate import load_examples

_GREEN, _RESET = "\x1b[32m", "\x1b[0m"


def mark_trained(tokenizer, input_ids: list[int], labels: list[int], color: bool) -> str:
    """Decode with trained runs wrapped in green (terminal) or [[double brackets]]."""
    out, run, trained = [], [], False
    for tok, lab in zip(input_ids, labels):
        t = lab != IGNORE_INDEX
        if t != trained and run:
            out.append(_wrap(tokenizer.decode(run), trained, color))
            run = []
        run.append(tok)
        trained = t
    if run:
        out.append(_wrap(tokenizer.decode(run), trained, color))
    return "".join(out)


def _wrap(text: str, trained: bool, color: bool) -> str:
    if not trained:
        return text
    return f"{_GREEN}{text}{_RESET}" if color else f"[[{text}]]"


def preview(cfg: RunConfig, n: int = 3, color: bool = False) -> str:
    from posttrain.models.load import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    if cfg.method != "pretrain":
        resolve_chat_template(tokenizer, cfg.model.chat_template)
    enc = ChatEncoder(tokenizer, cfg.data.train_on)
    legend = "trained tokens in green" if color else "trained tokens in [[double brackets]]"
    blocks = [f"preview of {cfg.data.train[0].path} ({legend})"]
    report = DataReport()
    examples, _ = load_examples(cfg.data.train[0].path, cfg.data.train[0].format, role_map=cfg.data.train[0].role_map, report=report)
    for ex in examples[:n]:
        for label, sample in _samples(enc, ex):
            n_tok, n_trained = len(sample.input_ids), sample.n_trained
            over = f" (over max_seq_len={cfg.data.max_seq_len})" if n_tok > cfg.data.max_seq_len else ""
            blocks.append(f"--- {ex.file}:{ex.row}{label}  tokens {n_tok}{over}, trained {n_trained}")
            blocks.append(mark_trained(tokenizer, sample.input_ids, sample.labels, color))
    if report.total_dropped:
        blocks.append(report.format())
    return "\n".join(blocks)


def _samples(enc: ChatEncoder, ex) -> list[tuple[str, object]]:
    """(label, encoded sample) for each sequence a row becomes: chosen and rejected for a pair."""
    if isinstance(ex, PreferenceExample):
        start = len(ex.prompt)
        return [(" chosen", enc.encode_messages(ex.prompt + ex.chosen, train_from=start)),
                (" rejected", enc.encode_messages(ex.prompt + ex.rejected, train_from=start))]
    if isinstance(ex, FeedbackExample):
        label = " desirable" if ex.desirable else " undesirable"
        return [(label, enc.encode_messages(ex.prompt + ex.completion, train_from=len(ex.prompt)))]
    return [("", enc.encode_text(ex.text) if ex.text is not None else enc.encode_messages(ex.messages))]
