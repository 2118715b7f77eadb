"""What a training run consumed: tokens, examples and wall time, so that algorithms can be compared
on equal budgets (`bench compare`) and by speed (`bench table`)."""

import time

import lightning.pytorch as L
import torch


class TrainingThroughput(L.Callback):
    """Counts the tokens (`module.tokens_in`) and examples (`module.examples_in`) of every training batch,
    summed over devices, and logs `train/tokens`, `train/examples`, `train/wall_time_s` and
    `train/tokens_per_s` when training ends."""

    def __init__(self):
        self.tokens = self.examples = 0
        self.earlier_seconds = 0.0  # trained before a resume: a resumed run counts its whole length

    def on_train_start(self, trainer, pl_module) -> None:
        self.started = time.perf_counter()

    def state_dict(self) -> dict:  # saved in checkpoints
        return {"tokens": self.tokens, "examples": self.examples,
                "seconds": self.earlier_seconds + time.perf_counter() - self.started}

    def load_state_dict(self, state: dict) -> None:
        self.tokens, self.examples, self.earlier_seconds = state["tokens"], state["examples"], state["seconds"]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.tokens += pl_module.tokens_in(batch)
        self.examples += pl_module.examples_in(batch)

    def on_train_end(self, trainer, pl_module) -> None:
        # Measurements taken during training (`ScoresAlongTraining`) are not training time.
        measuring = sum(getattr(callback, "seconds_outside_training", 0.0) for callback in trainer.callbacks)
        wall_time = self.earlier_seconds + time.perf_counter() - self.started - measuring
        counts = torch.tensor([self.tokens, self.examples], dtype=torch.float64, device=pl_module.device)
        totals = trainer.strategy.reduce(counts, reduce_op="sum")
        tokens, examples = (float(v) for v in totals)
        metrics = {"train/tokens": tokens, "train/examples": examples, "train/wall_time_s": wall_time,
                   "train/tokens_per_s": tokens / wall_time if wall_time > 0 else 0.0}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
