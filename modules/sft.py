"""Supervised fine-tuning on the chosen responses: the usual first stage before preference learning."""

from modules.base import AlignmentModule


class SFT(AlignmentModule):
    """Token-mean negative log-likelihood of the chosen response, prompt tokens masked."""

    name = "sft"
    data_view = "sft"
    needs_reference = False
    aligned = False  # a starting point that `bench compare` trains first, not a compared stage
    pruning_metric = "val/logps/chosen"
    colour = "#8c564b"

    def loss_and_metrics(self, batch):
        logps = self.policy_logps(batch)
        loss = -logps.total.sum() / logps.tokens.sum().clamp(min=1)
        return loss, {"logps/chosen": logps.total.detach().mean()}
