"""Off-the-shelf reward models in each input format give the scores of calling the model directly, as its
authors show; a spec that is not a one-output classifier is refused by name."""

import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
)

from bench.core.errors import ConfigError
from bench.core.models import load_tokenizer, resolve
from datamodules.formatting import pair_question, reward_text
from datamodules.hh_rlhf import hh_to_messages
from modules.reward_model import check_proxy, load_reward_model

PROMPTS = ["\n\nHuman: How do I bake bread?\n\nAssistant:",
           "\n\nHuman: Hi there.\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke about cats.\n\nAssistant:"]
RESPONSES = [" Mix flour, water, yeast and salt, knead, let it rise and bake it at 220 C.", " Why did the cat sit on "
             "the computer? To keep an eye on the mouse!"]


@pytest.fixture(scope="module")
def pair_model(tmp_path_factory):
    """A tiny BERT classifier with one output and MiniLM's (BERT) tokenizer: no chat template, so `pair`."""
    folder = tmp_path_factory.mktemp("pair_rm")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, num_labels=1)
    BertForSequenceClassification(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(resolve("all-minilm-l6-v2")).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny Llama classifier with SmolLM2's tokenizer, which has a chat template: `chat`."""
    folder = tmp_path_factory.mktemp("chat_rm")
    tokenizer = load_tokenizer("tiny")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def direct(folder, encode) -> list[float]:
    """The model's scores, one (prompt, response) at a time, as its model card calls it."""
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        return [model(**encode(tokenizer, p, r)).logits[0, 0].item() for p, r in zip(PROMPTS, RESPONSES)]


def test_pair_format_is_a_text_pair(pair_model):
    module = load_reward_model(str(pair_model), role="judge")
    assert module.input_format == "pair" and module.trained_role == "unknown" and module.used_as == "judge"
    expected = direct(pair_model, lambda t, p, r: t(pair_question(p), r.strip(), return_tensors="pt"))
    assert module.score(PROMPTS, RESPONSES).tolist() == pytest.approx(expected, abs=1e-5)


def test_chat_format_goes_through_the_models_chat_template(chat_model):
    module = load_reward_model(str(chat_model), role="gold")
    assert module.input_format == "chat"

    def encode(tokenizer, prompt, response):
        messages = hh_to_messages(prompt) + [{"role": "assistant", "content": response.strip()}]
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        return tokenizer(text, add_special_tokens=False, return_tensors="pt")

    assert module.score(PROMPTS, RESPONSES).tolist() == pytest.approx(direct(chat_model, encode), abs=1e-5)


def test_transcript_format_is_this_harnesses_own(reward_models):
    module = load_reward_model(reward_models["judge"], role="judge")
    assert module.input_format == "transcript" and module.trained_role == "judge"
    model, tokenizer = module.model.eval(), module.tokenizer
    with torch.no_grad():
        expected = [model(**tokenizer(reward_text(p, r), return_tensors="pt")).logits[0, 0].item()
                    for p, r in zip(PROMPTS, RESPONSES)]
    assert module.score(PROMPTS, RESPONSES).tolist() == pytest.approx(expected, abs=1e-5)


def test_a_format_can_be_asked_for(pair_model, chat_model):
    assert load_reward_model(str(chat_model), role="judge", input_format="transcript").input_format == "transcript"
    with pytest.raises(ConfigError, match="input format 'chat' needs a tokenizer with a chat template"):
        load_reward_model(str(pair_model), role="judge", input_format="chat")
    with pytest.raises(ConfigError, match="input format 'xml' is unknown"):
        load_reward_model(str(pair_model), role="judge", input_format="xml")


@pytest.mark.slow  # over 3 s: left out of `make test-fast`
def test_a_spec_that_is_not_a_one_output_classifier_is_refused(tmp_path, chat_model):
    policy = resolve("tiny")
    with pytest.raises(ConfigError, match=rf"judge reward model {policy} is not a reward model: architectures "
                                          r"\['LlamaForCausalLM'\]"):
        load_reward_model(policy, role="judge")
    two = tmp_path / "two_outputs"
    config = BertConfig(vocab_size=100, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                        intermediate_size=8, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(two)
    with pytest.raises(ConfigError, match="num_labels 2"):
        load_reward_model(str(two), role="gold")
    with pytest.raises(ConfigError, match="gold reward model no/such-model could not be read"):
        load_reward_model("no/such-model", role="gold")
    check_proxy(str(chat_model))  # an off-the-shelf model may be a proxy: it was trained as nothing here
