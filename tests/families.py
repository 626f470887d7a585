"""Tiny random checkpoints of many model families, saved as the hub holds them (save_pretrained,
sharded), with what the tests need to know about each: where its decoder layers are and which of
its matrices are routers. Test data only: the engine asks the model itself."""
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from offload_prune.demo import byte_tokenizer, demo_text

H, I, LAYERS, VOCAB = 64, 128, 2, 260
LLAMA_LIKE = dict(hidden_size=H, intermediate_size=I, num_hidden_layers=LAYERS, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512)
MOE = dict(num_experts_per_tok=2)

# model_type -> (config arguments, decoder layer list, router matrices inside a layer)
FAMILIES = {
    "llama": (LLAMA_LIKE, "model.layers", ()),
    "mistral": (LLAMA_LIKE, "model.layers", ()),
    "qwen2": (LLAMA_LIKE, "model.layers", ()),
    "qwen3": ({**LLAMA_LIKE, "head_dim": 16}, "model.layers", ()),
    "gemma2": ({**LLAMA_LIKE, "head_dim": 16}, "model.layers", ()),
    "gemma3_text": ({**LLAMA_LIKE, "head_dim": 16}, "model.layers", ()),
    "phi3": (LLAMA_LIKE, "model.layers", ()),
    "opt": (dict(hidden_size=H, ffn_dim=I, num_hidden_layers=LAYERS, num_attention_heads=4,
                 max_position_embeddings=512, word_embed_proj_dim=H), "model.decoder.layers", ()),
    "gpt_neox": (dict(hidden_size=H, intermediate_size=I, num_hidden_layers=LAYERS, num_attention_heads=4,
                      max_position_embeddings=512), "gpt_neox.layers", ()),
    "gpt2": (dict(n_embd=H, n_inner=I, n_layer=LAYERS, n_head=4, n_positions=512), "transformer.h", ()),
    "falcon": (dict(hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=4, new_decoder_architecture=True,
                    num_kv_heads=2), "transformer.h", ()),
    "mixtral": ({**LLAMA_LIKE, **MOE, "num_local_experts": 4}, "model.layers", ("mlp.gate",)),
    "qwen3_moe": ({**LLAMA_LIKE, **MOE, "head_dim": 16, "num_experts": 4, "moe_intermediate_size": 32},
                  "model.layers", ("mlp.gate",)),
    "olmoe": ({**LLAMA_LIKE, **MOE, "num_experts": 4}, "model.layers", ("mlp.gate",)),
    "qwen2_moe": ({**LLAMA_LIKE, **MOE, "num_experts": 4, "moe_intermediate_size": 32,
                   "shared_expert_intermediate_size": 64}, "model.layers", ("mlp.gate", "mlp.shared_expert_gate")),
    "gpt_oss": ({**LLAMA_LIKE, **MOE, "head_dim": 16, "num_local_experts": 4,
                 "layer_types": ["sliding_attention", "full_attention"]}, "model.layers", ("mlp.router",)),
}
# Beyond the list: a hybrid Mamba/attention/MoE model, whose Mamba mixer holds a 3-D
# convolution weight and a projection it reads as a weight instead of calling.
EXTRA = {
    "jamba": ({**LLAMA_LIKE, "num_experts": 4, "num_experts_per_tok": 2, "attn_layer_period": 2,
               "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1}, "model.layers", ("router",)),
    # DeepSeek-V3's shape: a dense first block, then blocks of routed experts (8, 3 per token), a shared expert
    # and multi-head latent attention.
    "deepseek_v3": ({**LLAMA_LIKE, "num_hidden_layers": 3, "num_key_value_heads": 4, "moe_intermediate_size": 32,
                     "n_routed_experts": 8, "num_experts_per_tok": 3, "first_k_dense_replace": 1, "n_shared_experts": 1,
                     "q_lora_rank": 16, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
                     "v_head_dim": 8, "n_group": 1, "topk_group": 1}, "model.layers", ("mlp.gate",)),
}
DENSE = [f for f, (_, _, routers) in FAMILIES.items() if not routers]
MIXTURE = [f for f, (_, _, routers) in FAMILIES.items() if routers]


def build_family(folder: Path, family: str) -> Path:
    config = AutoConfig.for_model(family, **{**FAMILIES, **EXTRA}[family][0], vocab_size=VOCAB, bos_token_id=256, eos_token_id=257,
                                  pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # default init is tiny (std 0.02): scale up so activations are not all ~0
        for name, param in model.named_parameters():
            if param.dim() >= 2 and "emb" not in name and "wte" not in name and "wpe" not in name:
                param.normal_(0, H ** -0.5)
    model.save_pretrained(folder, max_shard_size="100KB")
    byte_tokenizer().save_pretrained(folder)
    (folder / "demo.txt").write_text(demo_text(seed=0))
    return folder
