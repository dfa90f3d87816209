"""The server's side of a federated run, free of Flower: the global adapter's evaluation, saving and logs.

Every round the aggregated adapter is evaluated with the config's eval suites (a perplexity suite gives the
held-out loss, a generation suite the accuracy) and saved as ``rounds/round-N/``, a normal peft adapter folder;
the last one is also ``final/``. ``metrics.jsonl`` gets one line per global evaluation and one per client reply.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from posttrain.federated.config import FederatedConfig
from posttrain.federated.local import adapter_model
from posttrain.federated.runner import update_run_json
from posttrain.io import atomic_dir
from posttrain.tuning.weights import adapter_state, load_adapter_state


class GlobalAdapter:
    """The server's copy of the model, holding the current global adapter."""

    def __init__(self, cfg: FederatedConfig, log=print):
        from accelerate.utils import set_seed

        from posttrain.data.templates import resolve_chat_template
        from posttrain.models.load import load_tokenizer

        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.log = log
        self.weights = {c.name: c.weight for c in cfg.clients}
        # The initial adapter (LoRA's random A, zero B) is drawn here and sent to every client.
        set_seed(cfg.training.seed)
        self.tokenizer = load_tokenizer(cfg.model)
        if cfg.method != "pretrain":
            resolve_chat_template(self.tokenizer, cfg.model.chat_template)
        self.model = adapter_model(cfg).to("cuda" if torch.cuda.is_available() else "cpu")
        self.model.eval()

    def initial_state(self) -> dict[str, torch.Tensor]:
        return adapter_state(self.model)

    def client_weight(self, name: str | None) -> float:
        return self.weights.get(name, 1.0)

    def on_round(self, server_round: int, state: dict[str, torch.Tensor]) -> dict[str, float]:
        """Evaluate the global adapter after ``server_round`` (0: the start) and save it; returns its metrics."""
        load_adapter_state(self.model, state)
        metrics: dict[str, float] = {}
        if self.cfg.eval is not None:
            from posttrain.eval.runner import evaluate

            results = evaluate(self.model, self.tokenizer, self.cfg.eval, max_seq_len=self.cfg.data.max_seq_len,
                               samples_dir=self.out / "eval_samples" / f"round-{server_round}", log=self.log)
            for suite, result in results.items():
                if not result.skipped:
                    metrics.update({f"{suite}/{k}": float(v) for k, v in result.metrics.items()})
        self.write({"round": server_round, "scope": "global", **metrics})
        if server_round > 0:
            self.save(self.out / "rounds" / f"round-{server_round}")
        return metrics

    def client_report(self, server_round: int, phase: str, report: dict) -> None:
        self.write({"round": server_round, "scope": "client", "phase": phase, **report})

    def client_error(self, server_round: int, phase: str, node_id: int, reason: str) -> None:
        self.log(f"round {server_round}: a client (node {node_id}) failed in {phase}: {reason}")
        self.write({"round": server_round, "scope": "client", "phase": phase, "node_id": node_id, "error": reason})

    def save(self, folder: Path) -> None:
        from posttrain.models.checkpoint import save_model

        with atomic_dir(folder) as tmp:
            save_model(self.model, self.tokenizer, tmp)
            self.model.get_base_model().generation_config.save_pretrained(str(tmp))

    def finish(self, state: dict[str, torch.Tensor], rounds: int) -> Path:
        load_adapter_state(self.model, state)
        final = self.out / "final"
        self.save(final)
        update_run_json(self.out, status="completed", rounds=rounds, final=str(final),
                        ended=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        return final

    def write(self, record: dict) -> None:
        clean = {k: v for k, v in record.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}
        with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(clean) + "\n")
