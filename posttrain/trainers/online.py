"""Online methods: the rollout -> reward -> update cycle (GRPO, online DPO, RFT).

One step of the loop is one rollout batch: the step's prompts (a global batch of
prompt rows, split over processes as usual) are sampled from the current policy,
scored by the rewards, turned into a loss and trained on (GRPO may make several
updates per rollout, ``online.grpo.epochs``). RFT alternates rounds of sampling and
filtering with ordinary SFT steps on what was kept.

Advantage estimators and the policy losses are pure functions (``rl/advantages.py``,
``losses/policy.py``); this file only moves tensors between them. A sample whose reward
cannot be computed (the reward raised, timed out or returned None/NaN) is masked: it
takes no part in the loss or in its group's statistics, and is counted in ``masked_frac``.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import torch

from posttrain.config import RunConfig
from posttrain.data.collate import collate
from posttrain.data.templates import IGNORE_INDEX
from posttrain.errors import PosttrainError
from posttrain.generation import sampling_params
from posttrain.io import atomic_write_text
from posttrain.losses.dpo import dpo_loss
from posttrain.losses.policy import aggregate, clipped_surrogate, entropy_from_logits, token_kl
from posttrain.models.logprobs import per_token_logps
from posttrain.rl.advantages import group_advantages
from posttrain.rl.rewards.base import RewardInput
from posttrain.trainers.loop import Trainer, _MetricSums, gather_lists
from posttrain.trainers.reference import Reference, forward_inputs, unwrap


class _PromptsMethod:
    """The loop's view of a prompt set: rows are prompts, collated into nothing but a list."""

    def collate(self, rows):
        return rows

    def count(self, batch):
        return len(batch)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


class OnlineTrainer(Trainer):
    """GRPO and online DPO: one rollout batch per step."""

    def __init__(self, cfg: RunConfig, accelerator, model, tokenizer, prompts, eval_prompts, *, rewards, engine,
                 reference: Reference | None, stop_ids: list[int], judge=None, log=print):
        o = cfg.online
        self.updates_per_step = {"grpo": o.grpo.epochs, "ppo": o.ppo.epochs * o.ppo.mini_batches}.get(cfg.method, 1)
        super().__init__(cfg, accelerator, model, tokenizer, _PromptsMethod(), prompts, eval_prompts, log=log)
        self.ocfg = cfg.online
        self.rewards = rewards
        self.engine = engine
        self.reference = reference
        self.stop_ids = stop_ids
        self.judge = judge
        self.temperature = self.ocfg.generation.temperature

    # ---- rollouts ---------------------------------------------------------------------

    def _my_prompts(self, global_batch: list[int]) -> list[dict]:
        from posttrain.data.collate import split_global_batch

        parts = split_global_batch(global_batch, self.lengths, self.tcfg.gradient_accumulation_steps, self.world,
                                   self.acc.process_index)
        return [self.train_set.row(r) for part in parts for r in part]

    def _sample(self, prompts: list[dict], n: int, greedy: bool = False) -> list[list]:
        params = sampling_params(self.ocfg.generation, greedy=greedy, n=n)
        self.engine.sync_weights(unwrap(self.model))
        return self.engine.generate([p["prompt_ids"] for p in prompts], params)

    def _score(self, prompts: list[dict], samples: list[list]) -> tuple[list[float | None], dict]:
        inputs = [RewardInput(prompt=p["prompt"], completion=g.text, reference=p.get("reference"),
                              metadata=p.get("metadata") or {}) for p, gs in zip(prompts, samples) for g in gs]
        result = self.rewards(inputs)
        for err in result.errors[:3]:
            self.log(f"reward masked a sample: {err}")
        return result.total, result.components

    def _sequences(self, prompts: list[dict], samples: list[list]) -> list[tuple[list[int], list[int]]]:
        out = []
        for p, gs in zip(prompts, samples):
            for g in gs:
                ids = p["prompt_ids"] + g.completion_ids
                out.append((ids, [IGNORE_INDEX] * len(p["prompt_ids"]) + list(g.completion_ids)))
        return out

    @staticmethod
    def _engine_logps(scored: torch.Tensor, engine_lp: list[list[float]]) -> torch.Tensor:
        """The engine's log-probs of each sample's tokens, laid out like the trainer's per-token log-probs."""
        lp = torch.zeros_like(scored)
        for r, vals in enumerate(engine_lp):
            if scored[r].any():
                start = int(scored[r].nonzero()[0])
                lp[r, start : start + len(vals)] = torch.tensor(vals, dtype=torch.float32)
        return lp

    def _ref_logps(self, batch: dict) -> torch.Tensor:
        """Per-token reference log-probs at the sampling temperature."""
        return self.reference.token_logps(self.model, forward_inputs(batch), batch["labels"], self.temperature)

    def _logps(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probs of the sampled tokens at the sampling temperature, and the logits."""
        logits = model(**forward_inputs(batch), use_cache=False).logits
        if self.temperature != 1.0:
            logits = logits / self.temperature
        return per_token_logps(logits, batch["labels"]), logits

    # ---- one step -------------------------------------------------------------------------

    def _train_step(self, global_batch: list[int]) -> dict:
        started = time.perf_counter()
        prompts = self._my_prompts(global_batch)
        if self.cfg.method == "online_dpo":
            return self._online_dpo_step(prompts, started)
        return self._grpo_step(prompts, started)

    def _grpo_step(self, prompts: list[dict], started: float) -> dict:
        g = self.ocfg.grpo
        samples = self._sample(prompts, g.group_size)
        totals, components = self._score(prompts, samples)
        valid = torch.tensor([t is not None for t in totals])
        raw = torch.tensor([t if t is not None else 0.0 for t in totals], dtype=torch.float32)
        adv = self._group_advantages(raw, valid, g.group_size, g.scale_by_std)
        keep = valid.clone()
        if g.drop_equal_groups:
            for k in range(0, len(raw), g.group_size):
                grp = raw[k : k + g.group_size][valid[k : k + g.group_size]]
                if len(grp) and bool((grp == grp[0]).all()):
                    keep[k : k + g.group_size] = False
        seqs = self._sequences(prompts, samples)
        engine_lp = [s.logprobs for gs in samples for s in gs]
        micro = self._micro(seqs, adv, keep, engine_lp)

        self.model.train()
        with torch.no_grad(), self.acc.autocast():
            for b in micro:
                on = {k: v.to(self.acc.device) for k, v in b.items()}
                if self.updates_per_step > 1:
                    b["old_logp"] = self._logps(self.model, on)[0].float().cpu()
                if g.kl_coef > 0:
                    b["ref_logp"] = self._ref_logps(on).float().cpu()

        mode = g.loss_aggregation
        units_local = sum(aggregate(torch.zeros_like(b["mask"]), b["mask"], mode,
                                    max_tokens=self.ocfg.generation.max_new_tokens)[1] for b in micro)
        rollout_stats = self._rollout_stats(raw, valid, samples, components)
        (global_units,) = self._global_sum([float(units_local)])
        if global_units == 0:  # every group dropped or masked: nothing to learn from this batch
            self.log(f"step {self.state.step + 1}: no sample carried a learning signal; no update")
            return {"skipped_steps": self.state.skipped_steps}
        result = {}
        for update in range(self.updates_per_step):
            sums = _MetricSums()
            loss_sum = tokens = 0.0
            for j, b in enumerate(micro):
                on = {k: v.to(self.acc.device) for k, v in b.items()}
                sync = self.acc.no_sync(self.model) if j < len(micro) - 1 else contextlib.nullcontext()
                with sync, self.acc.autocast():
                    logp, logits = self._logps(self.model, on)
                    old = on["old_logp"] if "old_logp" in on else logp.detach()
                    per_tok, clipped = clipped_surrogate(logp, old, on["adv"], clip_low=g.clip_low,
                                                         clip_high=g.clip_high)
                    mask = on["mask"]
                    metrics = {}
                    if g.kl_coef > 0:
                        kl = token_kl(logp, on["ref_logp"], kind=g.kl_estimator)
                        per_tok = per_tok + g.kl_coef * kl
                        metrics["kl"] = ((kl.detach() * mask).sum(), mask.sum())
                    loss, _ = aggregate(per_tok, mask, mode, max_tokens=self.ocfg.generation.max_new_tokens)
                    self.acc.backward(loss * (self.world / global_units))
                ent = entropy_from_logits(logits.detach()[:, :-1])
                metrics["entropy"] = ((ent * mask).sum(), mask.sum())
                metrics["clip_frac"] = ((clipped.float() * mask).sum(), mask.sum())
                if update == 0:  # the engine against the trainer on the same weights, before any update
                    metrics["logprob_mismatch"] = (
                        ((logp.detach() - on["engine_logp"]).abs() * on["gen_mask"]).sum(), on["gen_mask"].sum()
                    )
                sums.add(metrics)
                loss_sum += float(loss.detach())
                tokens += float(mask.sum())
            reduced = self._global_sum([loss_sum, tokens, *sums.flat()])
            step_metrics = {**sums.means(reduced[2:], global_units), **rollout_stats}
            result = self._apply_update(reduced[0] / global_units, step_metrics, reduced[1], started)
        return result

    @staticmethod
    def _group_advantages(raw: torch.Tensor, valid: torch.Tensor, size: int, scale_by_std: bool) -> torch.Tensor:
        """Group-normalised advantages over the valid samples of each group; masked samples get 0."""
        adv = torch.zeros_like(raw)
        for k in range(0, len(raw), size):
            v = valid[k : k + size]
            if int(v.sum()) < 2:
                continue
            adv[k : k + size][v] = group_advantages(raw[k : k + size][v], int(v.sum()), scale_by_std=scale_by_std)
        return adv

    def _micro(self, seqs, adv, keep, engine_lp) -> list[dict]:
        """Micro-batches of the rollout (one per accumulation step), with per-token masks and advantages."""
        n_micro = max(1, min(self.tcfg.gradient_accumulation_steps, len(seqs)))
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
        chunks = [order[j::n_micro] for j in range(n_micro)]
        out = []
        for idx in chunks:
            b = collate([[seqs[i]] for i in idx], self.tokenizer.pad_token_id)
            scored = (b["labels"][:, 1:] != IGNORE_INDEX).float()
            b["mask"] = scored * keep[idx].float()[:, None]
            b["gen_mask"] = scored
            b["adv"] = adv[idx]
            b["engine_logp"] = self._engine_logps(scored, [engine_lp[i] for i in idx])
            out.append(b)
        return out

    def _rollout_stats(self, raw, valid, samples, components) -> dict:
        vals = raw[valid]
        lengths = [len(s.completion_ids) for gs in samples for s in gs]
        stats = {"masked_frac": float(1 - valid.float().mean()), "response_length": float(_mean(lengths) or 0.0)}
        if len(vals):
            stats["reward"] = float(vals.mean())
            stats["reward_std"] = float(vals.std()) if len(vals) > 1 else 0.0
        for name, values in components.items():
            ok = [v for v in values if v is not None and math.isfinite(v)]
            if ok:
                stats[f"reward/{name}"] = float(_mean(ok))
        return stats

    # ---- online DPO ------------------------------------------------------------------------

    def _online_dpo_step(self, prompts: list[dict], started: float) -> dict:
        d = self.ocfg.online_dpo
        samples = self._sample(prompts, d.samples_per_prompt)
        pairs, stats = self._label_pairs(prompts, samples)
        units_local = len(pairs)
        (global_units,) = self._global_sum([float(units_local)])
        if global_units == 0:
            self.log(f"step {self.state.step + 1}: no prompt gave a labelled pair; no update")
            return {"skipped_steps": self.state.skipped_steps}
        self.model.train()
        sums = _MetricSums()
        loss_sum = tokens = 0.0
        if pairs:
            seqs = [c for c, _ in pairs] + [r for _, r in pairs]
            b = collate([[s] for s in seqs], self.tokenizer.pad_token_id)
            on = {k: v.to(self.acc.device) for k, v in b.items()}
            with self.acc.autocast():
                with torch.no_grad():
                    ref = self._ref_logps(on).sum(-1)
                logp = per_token_logps(self.model(**forward_inputs(on), use_cache=False).logits, on["labels"]).sum(-1)
                pc, pr = logp.chunk(2)
                rc, rr = ref.chunk(2)
                losses, cr, rjr = dpo_loss(pc, pr, rc, rr, beta=d.beta)
                loss = losses.sum()
                self.acc.backward(loss * (self.world / global_units))
            margin = cr - rjr
            sums.add({"rewards/chosen": cr.sum(), "rewards/rejected": rjr.sum(), "rewards/margin": margin.sum(),
                      "rewards/accuracy": (margin > 0).float().sum()})
            loss_sum, tokens = float(loss.detach()), float((on["labels"][:, 1:] != IGNORE_INDEX).sum())
        sums.align(self.world)
        reduced = self._global_sum([loss_sum, tokens, *sums.flat()])
        step_metrics = {**sums.means(reduced[2:], global_units), **stats}
        return self._apply_update(reduced[0] / global_units, step_metrics, reduced[1], started)

    def _label_pairs(self, prompts, samples) -> tuple[list, dict]:
        """(chosen, rejected) sequences: by the pairwise judge, or best vs worst reward of each prompt."""
        seqs = self._sequences(prompts, samples)
        n = self.ocfg.online_dpo.samples_per_prompt
        pairs = []
        stats: dict = {}
        if self.judge is not None:
            undecided = 0
            for k, (p, gs) in enumerate(zip(prompts, samples)):
                a, b = gs[0], gs[1]
                if a.text == b.text:
                    continue
                verdict = self.judge.compare(p["prompt"], a.text, b.text)
                if verdict is None:
                    undecided += 1
                    continue
                win, lose = (k * n, k * n + 1) if verdict == 0 else (k * n + 1, k * n)
                pairs.append((seqs[win], seqs[lose]))
            stats["judge_undecided_frac"] = undecided / max(1, len(prompts))
            return pairs, stats
        totals, components = self._score(prompts, samples)
        valid = torch.tensor([t is not None for t in totals])
        raw = torch.tensor([t if t is not None else 0.0 for t in totals], dtype=torch.float32)
        for k in range(len(prompts)):
            cands = [(float(raw[k * n + i]), k * n + i) for i in range(n) if valid[k * n + i]]
            if len(cands) < 2:
                continue
            best, worst = max(cands), min(cands)
            if best[0] > worst[0]:
                pairs.append((seqs[best[1]], seqs[worst[1]]))
        stats.update(self._rollout_stats(raw, valid, samples, components))
        stats["pair_frac"] = len(pairs) / max(1, len(prompts))
        return pairs, stats

    # ---- evaluation ---------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Greedy responses to the eval prompts, scored by the rewards: eval_reward and each component.

        ``eval_loss`` is minus the mean reward, so best-checkpoint tracking and early stopping work as for SFT.
        """
        if self.rewards is None:  # a judge-labelled online DPO run has no reward to evaluate with
            return {}
        prompts = [self.eval_set.row(r) for r in range(len(self.eval_set))][self.acc.process_index :: self.world]
        samples = self._sample(prompts, 1, greedy=True) if prompts else []
        totals, components = self._score(prompts, samples) if prompts else ([], {})
        names = self.rewards.names  # the same on every process, even one with no eval prompt
        local = [sum(t for t in totals if t is not None), float(sum(t is not None for t in totals)), float(len(totals))]
        for name in names:
            ok = [v for v in components.get(name, []) if v is not None]
            local += [sum(ok), float(len(ok))]
        reduced = self._global_sum(local)
        out = {}
        if reduced[1] > 0:
            out["eval_reward"] = reduced[0] / reduced[1]
            out["eval_loss"] = -out["eval_reward"]
        out["eval_masked_frac"] = 1 - reduced[1] / max(reduced[2], 1)
        for i, name in enumerate(names):
            s, c = reduced[3 + 2 * i], reduced[4 + 2 * i]
            if c > 0:
                out[f"eval_reward/{name}"] = s / c
        if self.acc.is_main_process and prompts:
            self._save_samples(prompts, samples, totals)
        return out

    def _save_samples(self, prompts, samples, totals) -> None:
        rows = [{"step": self.state.step, "prompt": p["prompt"][-1]["content"], "reference": p.get("reference"),
                 "completion": gs[0].text, "reward": t} for p, gs, t in zip(prompts, samples, totals)]
        path = Path(self.cfg.output_dir) / "samples" / f"step-{self.state.step}.jsonl"
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[:64]))


class RftTrainer(OnlineTrainer):
    """Rejection-sampling fine-tuning (ReST-EM): rounds of sample -> keep the best -> SFT on what was kept.

    Each round samples every prompt ``samples_per_prompt`` times with the current policy, keeps
    samples at or above ``threshold`` (and/or the best of each prompt), writes them to
    ``rounds/round-N/kept.jsonl`` (messages rows any SFT stage can reuse), then trains
    ``steps_per_round`` ordinary SFT steps on them. Responses that were cut at ``max_new_tokens``
    or are empty are never kept.
    """

    def __init__(self, cfg: RunConfig, accelerator, model, tokenizer, prompts, eval_prompts, **kw):
        r = cfg.online.rft
        cfg = cfg.model_copy(deep=True)
        cfg.training.max_steps = r.rounds * r.steps_per_round
        super().__init__(cfg, accelerator, model, tokenizer, prompts, eval_prompts, **kw)
        from posttrain.trainers.supervised import SupervisedMethod

        self.sft = SupervisedMethod(tokenizer.pad_token_id, chunked=cfg.training.chunked_head)
        self.round = -1
        self.kept = None

    def _train_step(self, global_batch: list[int]) -> dict:
        r = self.ocfg.rft
        round_idx = self.state.step // r.steps_per_round
        if round_idx != self.round:
            self._start_round(round_idx)
        lengths = self.kept.row_lengths()
        batch = self._kept_batch(self.state.step % r.steps_per_round, round_idx, lengths)
        saved = self.train_set, self.lengths, self.method
        self.train_set, self.lengths, self.method = self.kept, lengths, self.sft
        try:
            return Trainer._train_step(self, batch)
        finally:
            self.train_set, self.lengths, self.method = saved

    def _kept_batch(self, index: int, round_idx: int, lengths: list[int]) -> list[int]:
        """The index-th global batch of this round's kept samples (repeated when fewer than one batch)."""
        from posttrain.data.collate import epoch_plan

        n, size = len(lengths), self.global_batch
        if n < size:
            return [(index * size + i) % n for i in range(size)]
        epoch, k = divmod(index, n // size)
        return epoch_plan(lengths, size, epoch, self.tcfg.seed * 1000 + round_idx, self.tcfg.group_by_length)[k]

    def _start_round(self, round_idx: int) -> None:
        import numpy as np

        from posttrain.data.dataset import TokenizedSet

        r = self.ocfg.rft
        prompts = [self.train_set.row(i) for i in range(len(self.train_set))][self.acc.process_index :: self.world]
        samples = self._sample(prompts, r.samples_per_prompt)
        totals, _ = self._score(prompts, samples)
        kept_local = []
        n = r.samples_per_prompt
        for k, (p, gs) in enumerate(zip(prompts, samples)):
            # A response cut at max_new_tokens or empty would teach the model not to stop, or to say nothing.
            scored = [(totals[k * n + i], i) for i in range(n) if totals[k * n + i] is not None
                      and gs[i].finish_reason == "stop" and gs[i].text.strip()]
            if r.threshold is not None:
                scored = [(t, i) for t, i in scored if t >= r.threshold]
            if r.best_of and scored:
                scored = [max(scored, key=lambda x: (x[0], -x[1]))]
            for t, i in scored:
                g = gs[i]
                kept_local.append({"prompt_ids": p["prompt_ids"], "completion_ids": list(g.completion_ids),
                                   "messages": [*p["prompt"], {"role": "assistant", "content": g.text}],
                                   "reward": t, "source": p.get("source")})
        valid = [t for t in totals if t is not None]
        stats_local = [float(len(kept_local)), float(len(totals)), float(sum(valid)), float(len(valid))]
        kept = gather_lists(kept_local, self.world)
        n_kept, n_total, reward_sum, n_valid = self._global_sum(stats_local)
        if not kept:
            raise PosttrainError(
                f"RFT round {round_idx + 1}: no sample passed the filter (threshold={r.threshold}); "
                f"lower online.rft.threshold or train the starting model further"
            )
        ids = [np.asarray(x["prompt_ids"] + x["completion_ids"], np.int32) for x in kept]
        labels = [np.asarray([IGNORE_INDEX] * len(x["prompt_ids"]) + x["completion_ids"], np.int32) for x in kept]
        self.kept = TokenizedSet(ids, labels, [[i] for i in range(len(ids))])
        self.round = round_idx
        if self.acc.is_main_process:
            folder = Path(self.cfg.output_dir) / "rounds" / f"round-{round_idx + 1}"
            rows = [{"messages": x["messages"], "reward": x["reward"], "source": x["source"]} for x in kept]
            atomic_write_text(folder / "kept.jsonl", "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in rows))
            info = {"round": round_idx + 1, "kept": int(n_kept), "sampled": int(n_total),
                    "mean_reward": reward_sum / n_valid if n_valid else None, "masked": int(n_total - n_valid)}
            atomic_write_text(folder / "stats.json", json.dumps(info, indent=2))
        self.log(f"RFT round {round_idx + 1}: kept {int(n_kept)} of {int(n_total)} samples")
        w = self.state.window
        for k, v in {"rft_round": round_idx + 1.0, "kept_frac": n_kept / max(n_total, 1),
                     "reward": reward_sum / max(n_valid, 1), "masked_frac": 1 - n_valid / max(n_total, 1)}.items():
            w[k] = (v, 1)


class PpoTrainer(OnlineTrainer):
    """PPO for RLHF (Ouyang et al. 2022): a policy and a value model, GAE, clipped surrogate and value losses.

    Each step samples the step's prompts, scores the responses (the sequence reward lands on
    the last response token), adds a per-token KL penalty to the reference in the reward (or a
    KL term in the loss), estimates advantages with GAE from the value model, then makes
    ``epochs x mini_batches`` updates of both models over the rollout.
    """

    def __init__(self, cfg: RunConfig, accelerator, model, tokenizer, prompts, eval_prompts, *, critic, **kw):
        p = cfg.online.ppo
        super().__init__(cfg, accelerator, model, tokenizer, prompts, eval_prompts, **kw)
        critic_opt = torch.optim.AdamW([q for q in critic.parameters() if q.requires_grad],
                                       lr=p.value_learning_rate or self.tcfg.learning_rate,
                                       betas=(self.tcfg.adam_beta1, self.tcfg.adam_beta2), eps=self.tcfg.adam_eps)
        self.critic, self.critic_opt = accelerator.prepare(critic, critic_opt)

    def _whiten_scores(self, raw: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The rollout's scores at mean 0 and std 1 over the valid samples of every process."""
        vals = raw[valid].double()
        n, total, squares = self._global_sum([float(len(vals)), float(vals.sum()), float((vals**2).sum())])
        if n < 2:
            return raw
        mean = total / n
        std = math.sqrt(max(squares / n - mean**2, 0.0) * n / (n - 1))
        return (raw - mean) / (std + 1e-6)

    def _train_step(self, global_batch: list[int]) -> dict:
        from posttrain.losses.policy import value_loss
        from posttrain.rl.advantages import gae, whiten

        started = time.perf_counter()
        p = self.ocfg.ppo
        prompts = self._my_prompts(global_batch)
        samples = self._sample(prompts, p.samples_per_prompt)
        totals, components = self._score(prompts, samples)
        valid = torch.tensor([t is not None for t in totals])
        raw = torch.tensor([t if t is not None else 0.0 for t in totals], dtype=torch.float32)
        seqs = self._sequences(prompts, samples)
        engine_lp = [s.logprobs for gs in samples for s in gs]
        rollout = collate([[s] for s in seqs], self.tokenizer.pad_token_id)
        scored = (rollout["labels"][:, 1:] != IGNORE_INDEX).float()
        mask = scored * valid.float()[:, None]

        # Old log-probs, reference log-probs and values, without gradients, in chunks.
        self.model.train()
        old, ref, values = torch.zeros_like(scored), torch.zeros_like(scored), torch.zeros_like(scored)
        chunk = self.tcfg.batch_size
        with torch.no_grad(), self.acc.autocast():
            for k in range(0, len(seqs), chunk):
                part = {key: v[k : k + chunk].to(self.acc.device) for key, v in rollout.items()}
                old[k : k + chunk] = self._logps(self.model, part)[0].float().cpu()
                if self.reference is not None:
                    ref[k : k + chunk] = self._ref_logps(part).float().cpu()
                values[k : k + chunk] = self._values(part).float().cpu()
        kl_tok = token_kl(old, ref, kind=p.kl_estimator) * mask if self.reference is not None else torch.zeros_like(old)
        scores = self._whiten_scores(raw, valid) if p.whiten_rewards else raw
        rewards = torch.zeros_like(old)
        if p.kl_in == "reward":
            rewards -= p.kl_coef * kl_tok
        last = (scored.cumsum(-1) == scored.sum(-1, keepdim=True)) & (scored > 0)  # the last response token
        rewards += last.float() * scores[:, None] * valid.float()[:, None]
        adv, returns = self._gae(rewards, values, mask, gae, p)
        if p.whiten_advantages and mask.sum() > 1:
            adv = whiten(adv, mask)

        rollout.update(old_logp=old, ref_logp=ref, adv=adv, returns=returns, old_values=values, mask=mask,
                       gen_mask=scored, engine_logp=self._engine_logps(scored, engine_lp))
        stats = self._rollout_stats(raw, valid, samples, components)
        stats["kl"] = float(kl_tok.sum() / mask.sum().clamp(min=1))
        # The engine against the trainer on the same weights (later updates have moved the policy on).
        mismatch = ((old - rollout["engine_logp"]).abs() * scored).sum() / scored.sum().clamp(min=1)
        stats["logprob_mismatch"] = float(mismatch)
        result = {}
        order_rng = torch.Generator().manual_seed(self.tcfg.seed * 100003 + self.state.step)
        for _ in range(p.epochs):
            order = torch.randperm(len(seqs), generator=order_rng).tolist()
            for m in range(p.mini_batches):
                rows = order[m :: p.mini_batches]
                result = self._ppo_update(rollout, rows, value_loss, stats, started)
                started = time.perf_counter()
        return result

    def _gae(self, rewards, values, mask, gae, p):
        """GAE over each row's response tokens (shifted to the row's start, as ``gae`` expects)."""
        n, width = mask.shape
        starts = [int(row.nonzero()[0]) if row.any() else 0 for row in mask]
        lengths = [int(row.sum()) for row in mask]
        length = max(lengths + [1])
        r, v, mk = torch.zeros(n, length), torch.zeros(n, length), torch.zeros(n, length)
        for i, (s, ln) in enumerate(zip(starts, lengths)):
            r[i, :ln], v[i, :ln], mk[i, :ln] = rewards[i, s : s + ln], values[i, s : s + ln], 1.0
        a, ret = gae(r, v, mk, gamma=p.gamma, lam=p.lam)
        adv, returns = torch.zeros(n, width), torch.zeros(n, width)
        for i, (s, ln) in enumerate(zip(starts, lengths)):
            adv[i, s : s + ln], returns[i, s : s + ln] = a[i, :ln], ret[i, :ln]
        return adv, returns

    def _values(self, batch: dict) -> torch.Tensor:
        """V(s_t) per position t, aligned with the per-token log-probs (position t predicts token t + 1)."""
        out = self.critic(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False)
        return out.logits[..., 0][:, :-1]

    def _ppo_update(self, rollout: dict, rows: list[int], value_loss, stats: dict, started: float) -> dict:
        p = self.ocfg.ppo
        mb_mask = rollout["mask"][rows]
        (units,) = self._global_sum([float(mb_mask.sum())])
        if units == 0:
            return {"skipped_steps": self.state.skipped_steps}
        sums = _MetricSums()
        loss_sum = 0.0
        chunk = self.tcfg.batch_size
        self.model.train()
        self.critic.train()
        for k in range(0, len(rows), chunk):
            idx = rows[k : k + chunk]
            part = {key: v[idx].to(self.acc.device) for key, v in rollout.items()}
            with self.acc.autocast():
                logp, logits = self._logps(self.model, part)
                per_tok, clipped = clipped_surrogate(logp, part["old_logp"], part["adv"], clip_low=p.clip,
                                                     clip_high=p.clip)
                mask = part["mask"]
                if p.kl_in == "loss" and self.reference is not None:
                    per_tok = per_tok + p.kl_coef * token_kl(logp, part["ref_logp"], kind=p.kl_estimator)
                loss, _ = aggregate(per_tok, mask, "token")
                v_tok = value_loss(self._values(part), part["old_values"], part["returns"], clip=p.value_clip)
                v_loss, _ = aggregate(v_tok, mask, "token")
                self.acc.backward((loss + v_loss) * (self.world / units))
            ent = entropy_from_logits(logits.detach()[:, :-1])
            sums.add({"entropy": ((ent * mask).sum(), mask.sum()),
                      "clip_frac": ((clipped.float() * mask).sum(), mask.sum()),
                      "value_loss": (v_loss.detach(), mask.sum())})
            loss_sum += float(loss.detach())
        sums.align(self.world)
        reduced = self._global_sum([loss_sum, float(mb_mask.sum()), *sums.flat()])
        if self.tcfg.max_grad_norm:
            self.acc.clip_grad_norm_(self.critic.parameters(), self.tcfg.max_grad_norm)
        self.critic_opt.step()
        self.critic_opt.zero_grad(set_to_none=True)
        step_metrics = {**sums.means(reduced[2:], units), **stats}
        return self._apply_update(reduced[0] / units, step_metrics, reduced[1], started)

    def _save_extra(self, folder: Path) -> None:
        self.acc.unwrap_model(self.critic).save_pretrained(str(folder / "value_model"))
        torch.save(self.critic_opt.state_dict(), folder / "value_optimizer.pt")

    def _load_extra(self, folder: Path) -> None:
        from posttrain.models.checkpoint import load_weights

        load_weights(self.acc.unwrap_model(self.critic), folder / "value_model")
        self.critic_opt.load_state_dict(torch.load(folder / "value_optimizer.pt", map_location="cpu",
                                                   weights_only=False))
