"""A Bradley-Terry reward model over text, in two roles: the proxy that PPO and RRHF optimise, and the
judge that evaluates. It reads prompt + response through its own tokenizer, so it scores policies
whose tokenizers differ from its own. Also the loading of a saved or off-the-shelf reward model, checked to be
one and to suit the role it is used in."""

import logging
from pathlib import Path
from typing import Literal

import torch
from jsonargparse.typing import NonNegativeFloat, PositiveFloat
from tqdm.auto import tqdm
from transformers import AutoConfig

from bench.core import precision
from bench.core.errors import BenchError, ConfigError
from bench.core.models import load_reward_backbone, load_tokenizer, read_model_config
from bench.core.models import resolve as resolve_model
from datamodules.formatting import RewardFormatter
from modules.base import NonFiniteLossPolicy, TrainedHFModel
from modules.losses import bradley_terry_loss

log = logging.getLogger(__name__)

Role = Literal["proxy", "judge", "shared", "gold"]
ROLE_KEY = "bench_reward_role"  # written into the saved config.json, so a loader can check the role
FORMAT_KEY = "bench_reward_format"  # the input format it was trained on, likewise
MAX_LENGTH_KEY = "bench_reward_max_length"  # the length it was trained at: scoring longer inputs leaves its training distribution


class RewardModel(TrainedHFModel):
    """r(x, y) from an HF sequence-classification backbone with one output.

    The optimizer settings (`lr`, `optimizer`, `weight_decay`, `warmup_steps`) are TrainedHFModel's, as for the
    policy modules; only the default `lr` is the reward model's own.

    Args:
        backbone: model spec of the backbone (``all-minilm-l6-v2``, a hub id or a folder).
        role: proxy or judge, each trained on its own half of the train split; shared (one model for
            both roles, trained on the whole split) must be chosen explicitly, and is recorded; gold (the
            simulated labeller of `bench label`, trained on the whole split, never optimised against).
        center_rewards_coefficient: c in c * mean((r+ + r-)^2), keeping rewards centred.
        max_length: transcripts are cut from the left to this many backbone tokens.
        train_on: which train pairs a proxy or judge reads: its own half of the train split ("half"), or all of
            them ("all": where no judge is trained from the same pairs, as in a gold world whose gold is given).
        nonfinite_loss: as for the policy modules ("error" or "skip").
    """

    name = "rm"
    data_view = "reward"
    output_name = "reward_model"
    model_key = "backbone"
    trained_roles = ("proxy", "judge")  # a comparison's two reward models, each on its own half of the train split

    def __init__(
        self,
        backbone: str = "all-minilm-l6-v2",
        role: Role = "proxy",
        lr: PositiveFloat = 5e-5,  # declared again only for this default (documented and checked in TrainedHFModel)
        center_rewards_coefficient: NonNegativeFloat = 0.0,
        max_length: int = 512,
        train_on: Literal["half", "all"] = "half",
        trust_remote_code: bool = False,
        nonfinite_loss: NonFiniteLossPolicy = "error",
        **kwargs,  # the optimizer's other settings (TrainedHFModel)
    ):
        super().__init__(lr=lr, **kwargs)
        resolve_model(backbone)
        self.model: torch.nn.Module | None = None

    def configure_model(self) -> None:
        if self.model is None:
            hp = self.hparams
            self.tokenizer = load_tokenizer(hp.backbone, hp.trust_remote_code)
            self.model = load_reward_backbone(hp.backbone, hp.trust_remote_code).train()
            self.model.config.pad_token_id = self.tokenizer.pad_token_id

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits.squeeze(-1).float()

    def _step(self, stage: str, batch: dict) -> torch.Tensor:
        chosen, rejected = self(batch["input_ids"], batch["attention_mask"]).chunk(2)
        loss = bradley_terry_loss(chosen, rejected, self.hparams.center_rewards_coefficient).mean()
        on_step, pairs = stage == "train", self.examples_in(batch)
        self.log(f"{stage}/loss", loss.detach(), batch_size=pairs, on_step=on_step, on_epoch=not on_step,
                 prog_bar=True, sync_dist=True)
        if stage == "val":
            self.log("val/accuracy", (chosen > rejected).float().mean(), batch_size=pairs, sync_dist=True)
            self.log("val/margin", (chosen - rejected).mean().detach(), batch_size=pairs, sync_dist=True)
        return loss

    def examples_in(self, batch: dict) -> int:
        return batch["input_ids"].shape[0] // 2  # chosen and rejected rows of each pair

    @property
    def trained_model(self) -> torch.nn.Module:
        return self.model

    input_format = "transcript"  # what this harness trains on; a loaded off-the-shelf model may read another

    def on_train_end(self) -> None:
        setattr(self.model.config, ROLE_KEY, self.hparams.role)  # saved in config.json
        setattr(self.model.config, FORMAT_KEY, self.input_format)
        setattr(self.model.config, MAX_LENGTH_KEY, self.hparams.max_length)
        super().on_train_end()

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str], batch_size: int = 32, desc: str | None = None) -> torch.Tensor:
        """Rewards of HH prompts with responses, read in `input_format` (`datamodules.formatting.RewardFormatter`:
        this harness's own reward models read transcripts). Batches of similar length; the model must be
        configured."""
        formatter = RewardFormatter(self.tokenizer, self.hparams.max_length, self.input_format)
        encoded = formatter.encode_responses(prompts, responses)
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]["input_ids"]))
        was_training = self.model.training
        self.model.eval()  # no dropout when scoring
        scores = torch.empty(len(encoded))
        starts = range(0, len(order), batch_size)
        for start in tqdm(starts, desc=desc, unit="batch", disable=desc is None or len(starts) < 2):
            rows = order[start : start + batch_size]
            batch = self.tokenizer.pad([encoded[i] for i in rows], return_tensors="pt")
            scores[rows] = self.model(**{k: v.to(self.device) for k, v in batch.items()}).logits.squeeze(-1).float().cpu()
        self.model.train(was_training)
        return scores


def check_reward_model(path: str, role: str) -> str:
    """The role a reward model was trained for here (`unknown` for an off-the-shelf one); an error naming the
    spec if it is not a sequence classifier with one output. Reads the config only (a local config.json, or
    the hub's), so it is cheap enough to check before anything else runs."""
    try:
        source = resolve_model(path)
    except BenchError as err:
        raise ConfigError(f"{role} reward model {path}: {err}") from err
    if Path(source).exists() and not (Path(source) / "config.json").exists():
        raise ConfigError(f"{role} reward model {path}: no config.json, so it is not a saved reward model")
    config = read_model_config(source, f"{role} reward model {path}")
    architectures = config.architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures) or config.num_labels != 1:
        raise ConfigError(
            f"{role} reward model {path} is not a reward model: architectures {architectures}, "
            f"num_labels {config.num_labels} (expected a ...ForSequenceClassification with one output)"
        )
    return getattr(config, ROLE_KEY, "unknown")


def input_format_of(module, trained_role: str, requested: str = "auto") -> str:
    """How a reward model reads (prompt, response): as asked, else as it was trained here (`transcript`, or
    what its config.json records), else, for an off-the-shelf model, through its chat template when its
    tokenizer has one and as a text pair when not (OpenAssistant's DeBERTa reward models)."""
    if requested != "auto":
        return requested
    if trained_role != "unknown":
        return getattr(module.model.config, FORMAT_KEY, "transcript")
    return "chat" if module.tokenizer.chat_template is not None else "pair"


def load_reward_model(path: str, role: str, input_format: str = "auto", device: torch.device | str | None = None):
    """A RewardModel module around a reward model (a folder of this harness's, or any sequence classifier
    with one output: folder or hub id), checked to be one, on `device` (default: `inference_device()`); `role`
    is the role it is used in, which its `used_as` records (the role it was trained for, if any, is
    `trained_role`)."""
    trained_role = check_reward_model(path, role)
    trained_length = getattr(AutoConfig.from_pretrained(resolve_model(str(path))), MAX_LENGTH_KEY, None)
    module = RewardModel(backbone=str(path), **({"max_length": trained_length} if trained_length else {}))
    module.configure_model()
    module.trained_role, module.used_as = trained_role, role
    module.input_format = input_format_of(module, trained_role, input_format)
    RewardFormatter(module.tokenizer, module.hparams.max_length, module.input_format)  # checks the format now
    return module.to(precision.inference_device() if device is None else device)


def check_proxy(path: str, allow_judge_as_proxy: bool = False) -> None:
    """PPO and RRHF optimise the proxy. Optimising the judge (or the gold model) would make the evaluation
    grade the policy with the model it was trained against, so they are refused unless asked for explicitly."""
    if path == "latest":
        raise ConfigError("proxy 'latest' means the newest proxy of the recipe's experiment, which `bench train` "
                          "resolves; outside it, pass a reward-model folder")
    trained_role = check_reward_model(path, "proxy")
    if trained_role in ("judge", "gold") and not allow_judge_as_proxy:
        raise ConfigError(
            f"proxy reward model {path} was trained as the {trained_role}; optimising it would make the evaluation "
            "grade itself. Pass a proxy, or set allow_judge_as_proxy=true to do this on purpose"
        )


def load_proxy(path: str, allow_judge_as_proxy: bool = False, device: torch.device | str | None = None):
    check_proxy(path, allow_judge_as_proxy)
    return load_reward_model(path, role="proxy", device=device).requires_grad_(False)
