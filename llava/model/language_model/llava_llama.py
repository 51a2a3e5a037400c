"""LLaVA on a Llama/Vicuna language model (also the Yi-based 34B, which is Llama-shaped)."""

from __future__ import annotations

from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel
from transformers.models.llama.modeling_llama import LlamaPreTrainedModel

from llava.model.language_model import pruning
from llava.model.llava_arch import LlavaMetaForCausalLM, LlavaMetaModel


class LlavaConfig(LlamaConfig):
    model_type = "llava_llama"


class LlavaLlamaModel(LlavaMetaModel, LlamaModel):
    config_class = LlavaConfig

    def forward(self, input_ids=None, **kwargs):
        """The backbone's forward, pruning visual tokens inside it for an in-LLM method (`pruning`)."""
        return pruning.decoder_forward(self, super().forward, input_ids=input_ids, **kwargs)


class LlavaLlamaForCausalLM(LlavaMetaForCausalLM, LlamaForCausalLM):
    config_class = LlavaConfig

    def __init__(self, config: LlavaConfig):
        # Skip LlamaForCausalLM.__init__, which would build a plain LlamaModel first.
        LlamaPreTrainedModel.__init__(self, config)
        self.model = LlavaLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
