"""LLaVA on a Qwen2 language model (LLaVA-OneVision: `lmms-lab/llava-onevision-qwen2-{0.5b,7b}-ov`).

The original checkpoints' `config.json` names the architecture `LlavaQwenForCausalLM` (model_type
`llava`, Qwen2's keys at top level); their weights use Qwen2's names under the LLaVA prefixes
(`model.layers.N.self_attn.q_proj.bias`, `model.mm_projector.*`, `model.vision_tower.*`,
`model.image_newline`, `lm_head.weight`), which is the module tree built here. Qwen2's q/k/v
projections carry biases, so loading such a checkpoint as Llama would drop them.
"""

from __future__ import annotations

from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Model
from transformers.models.qwen2.modeling_qwen2 import Qwen2PreTrainedModel

from llava.model.language_model import pruning
from llava.model.llava_arch import LlavaMetaForCausalLM, LlavaMetaModel


class LlavaQwenConfig(Qwen2Config):
    model_type = "llava_qwen"


class LlavaQwenModel(LlavaMetaModel, Qwen2Model):
    config_class = LlavaQwenConfig

    def forward(self, input_ids=None, **kwargs):
        """The backbone's forward, pruning visual tokens inside it for an in-LLM method (`pruning`)."""
        return pruning.decoder_forward(self, super().forward, input_ids=input_ids, **kwargs)


class LlavaQwenForCausalLM(LlavaMetaForCausalLM, Qwen2ForCausalLM):
    config_class = LlavaQwenConfig

    def __init__(self, config: LlavaQwenConfig):
        # Skip Qwen2ForCausalLM.__init__, which would build a plain Qwen2Model first. A config with
        # tie_word_embeddings (0.5B) shares lm_head with the embeddings through Qwen2's _tied_weights_keys.
        Qwen2PreTrainedModel.__init__(self, config)
        self.model = LlavaQwenModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
