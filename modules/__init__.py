"""Alignment algorithms as LightningModules behind one interface, and their pure loss functions."""

from modules.base import AlignmentModule
from modules.dpo import DPO
from modules.ipo import IPO
from modules.kto import KTO
from modules.reward_model import RewardModel
from modules.sft import SFT

ALGORITHMS: dict[str, type[AlignmentModule]] = {"sft": SFT, "dpo": DPO, "ipo": IPO, "kto": KTO}
# Everything `bench train` can train: the policy algorithms and the reward model.
TRAINABLE = {**ALGORITHMS, "rm": RewardModel}
