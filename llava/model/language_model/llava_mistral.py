"""LLaVA on a Mistral language model (llava-v1.6-mistral-7b)."""

from __future__ import annotations

from torch import nn
from transformers import MistralConfig, MistralForCausalLM, MistralModel
from transformers.models.mistral.modeling_mistral import MistralPreTrainedModel

from llava.model.language_model import pruning
from llava.model.llava_arch import LlavaMetaForCausalLM, LlavaMetaModel


class LlavaMistralConfig(MistralConfig):
    model_type = "llava_mistral"


class LlavaMistralModel(LlavaMetaModel, MistralModel):
    config_class = LlavaMistralConfig

    def forward(self, input_ids=None, **kwargs):
        """The backbone's forward, pruning visual tokens inside it for an in-LLM method (`pruning`)."""
        return pruning.decoder_forward(self, super().forward, input_ids=input_ids, **kwargs)


class LlavaMistralForCausalLM(LlavaMetaForCausalLM, MistralForCausalLM):
    config_class = LlavaMistralConfig

    def __init__(self, config: LlavaMistralConfig):
        # Skip MistralForCausalLM.__init__, which would build a plain MistralModel first.
        MistralPreTrainedModel.__init__(self, config)
        self.model = LlavaMistralModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
