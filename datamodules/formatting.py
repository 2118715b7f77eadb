"""Prompt/response formatting and tokenization.

The prompt and each response are tokenized separately and concatenated, so a response's tokens are
exactly the tokens of its text (no BPE merge across the boundary), followed by EOS / end of turn.
Truncation follows the DPO reference code: keep the end of the prompt, then cut the responses.
"""

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from bench.core.errors import ConfigError
from datamodules.hh_rlhf import Pair, hh_to_messages


@dataclass(frozen=True)
class Formatter:
    tokenizer: PreTrainedTokenizerBase
    chat_template: bool = True
    max_length: int = 512
    max_prompt_length: int = 256

    def __post_init__(self):
        if not 0 < self.max_prompt_length < self.max_length:
            raise ConfigError(
                f"need 0 < max_prompt_length < max_length, got max_prompt_length={self.max_prompt_length}, "
                f"max_length={self.max_length}"
            )

    @property
    def uses_chat_template(self) -> bool:
        return self.chat_template and self.tokenizer.chat_template is not None

    def prompt_text(self, prompt: str) -> str:
        if self.uses_chat_template:
            return self.tokenizer.apply_chat_template(
                hh_to_messages(prompt), tokenize=False, add_generation_prompt=True
            )
        return prompt

    def response_text(self, response: str) -> str:
        # Chat turns carry no leading space; raw HH responses keep theirs (" Sure, ...").
        return response.strip() if self.uses_chat_template else response

    def prompt_ids(self, prompt: str) -> list[int]:
        # The chat template writes its own special tokens; raw text gets the tokenizer's BOS, if any.
        return self.tokenizer(self.prompt_text(prompt), add_special_tokens=not self.uses_chat_template).input_ids

    def generation_prompt_ids(self, prompt: str) -> list[int]:
        """The prompt a policy samples a response to: its last `max_prompt_length` tokens."""
        return self.prompt_ids(prompt)[-self.max_prompt_length :]

    def response_ids(self, response: str) -> list[int]:
        ids = self.tokenizer(self.response_text(response), add_special_tokens=False).input_ids
        return ids + [self.tokenizer.eos_token_id]

    def truncate(self, prompt: list[int], responses: list[list[int]]) -> tuple[list[int], list[list[int]]]:
        longest = max(len(r) for r in responses)
        if len(prompt) + longest > self.max_length:
            prompt = prompt[-self.max_prompt_length :]
        if len(prompt) + longest > self.max_length:
            responses = [r[: self.max_length - self.max_prompt_length] for r in responses]
        return prompt, responses

    def pair(self, pair: Pair) -> dict[str, list[int]]:
        prompt, (chosen, rejected) = self.truncate(
            self.prompt_ids(pair.prompt), [self.response_ids(pair.chosen), self.response_ids(pair.rejected)]
        )
        return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}

    def fit_completion(self, prompt_ids: list[int], completion_ids: list[int]) -> list[int]:
        """Cut a completion borrowed from another pair so that it fits after this prompt."""
        return completion_ids[: self.max_length - len(prompt_ids)]


def reward_text(prompt: str, response: str) -> str:
    """What a reward model reads in the `transcript` format: the raw HH transcript, whatever the policy's chat
    format, so that one reward model scores policies with any tokenizer."""
    return f"{prompt} {response.strip()}"


def pair_question(prompt: str) -> str:
    """The first text of the `pair` format: the HH dialogue up to the last human turn, without the empty
    Assistant tag that the response would follow."""
    return prompt.strip().removesuffix("Assistant:").strip()


REWARD_INPUT_FORMATS = ("transcript", "pair", "chat")


@dataclass(frozen=True)
class RewardFormatter:
    """Tokenizes (prompt, response) for a reward model in one of three input formats, cutting from the left
    so that the response survives truncation:

    - ``transcript``: the raw HH transcript, prompt and response as one text (how this harness trains its own);
    - ``pair``: the dialogue and the response as a text pair, as OpenAssistant's DeBERTa reward models read
      them (`tokenizer(question, answer)`, with its token types);
    - ``chat``: the dialogue and the response as chat messages, through the reward model's own chat template.
    """

    tokenizer: PreTrainedTokenizerBase
    max_length: int = 512
    input_format: str = "transcript"

    def __post_init__(self):
        if self.input_format not in REWARD_INPUT_FORMATS:
            raise ConfigError(f"reward-model input format {self.input_format!r} is unknown; choose one of "
                              f"{', '.join(REWARD_INPUT_FORMATS)}")
        if self.input_format == "chat" and self.tokenizer.chat_template is None:
            raise ConfigError("reward-model input format 'chat' needs a tokenizer with a chat template; this one "
                              "has none (use 'pair' or 'transcript')")

    def encode(self, texts: list[str]) -> list[list[int]]:
        side, self.tokenizer.truncation_side = self.tokenizer.truncation_side, "left"
        try:
            return self.tokenizer(texts, truncation=True, max_length=self.max_length).input_ids
        finally:
            self.tokenizer.truncation_side = side

    def encode_responses(self, prompts: list[str], responses: list[str]) -> list[dict[str, list[int]]]:
        """One encoding per (prompt, response): input_ids, and token_type_ids where the format has them."""
        side, self.tokenizer.truncation_side = self.tokenizer.truncation_side, "left"
        try:
            if self.input_format == "transcript":
                texts = [reward_text(p, r) for p, r in zip(prompts, responses)]
                encoded = self.tokenizer(texts, truncation=True, max_length=self.max_length)
            elif self.input_format == "pair":
                encoded = self.tokenizer([pair_question(p) for p in prompts], [r.strip() for r in responses],
                                         truncation="longest_first", max_length=self.max_length)
            else:
                texts = [self.tokenizer.apply_chat_template(
                    hh_to_messages(p) + [{"role": "assistant", "content": r.strip()}], tokenize=False)
                    for p, r in zip(prompts, responses)]
                encoded = self.tokenizer(texts, add_special_tokens=False, truncation=True, max_length=self.max_length)
        finally:
            self.tokenizer.truncation_side = side
        keys = [key for key in ("input_ids", "token_type_ids") if key in encoded]
        return [{key: encoded[key][i] for key in keys} for i in range(len(prompts))]

    def pair(self, pair: Pair) -> dict[str, list[int]]:
        chosen, rejected = self.encode([reward_text(pair.prompt, pair.chosen), reward_text(pair.prompt, pair.rejected)])
        return {"chosen_ids": chosen, "rejected_ids": rejected}
